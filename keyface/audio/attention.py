"""Self-attention with a gated relative position bias (WavLM, BEATs), computed a block of queries at a time.

Both encoders add a learned bias, looked up by a log-bucketed ``key - query`` offset, to every attention score,
scaled by a per-query gate. Computed at once, the bias and its temporaries are several ``(heads, T, T)`` tensors:
for a 60-second window (T = 3000 tokens) of WavLM Base+ that is about 430 MB each. Here the bias is built for
``QUERY_BLOCK`` queries at a time, so the extra memory is ``heads x QUERY_BLOCK x T``; every score is the same
sum as in a single pass, so the result is the same up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

QUERY_BLOCK = 256


def relative_position_buckets(offsets: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional log-spaced buckets of ``key - query`` ``offsets`` (long, any shape) -> the same shape, long.

    Half of the buckets per direction; within each half, offsets below a quarter of ``num_buckets`` get their
    own bucket and larger ones share log-spaced buckets up to ``max_distance`` (the unilm formula).
    """
    half = num_buckets // 2
    exact = half // 2
    distance = offsets.abs()
    log_bucket = exact + (
        torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (half - exact)
    ).to(torch.long)
    log_bucket = log_bucket.clamp(max=half - 1)
    return (offsets > 0).long() * half + torch.where(distance < exact, distance, log_bucket)


class RelativePositionBias:
    """The ``(heads, queries, keys)`` relative position bias of a ``length``-token sequence, built on demand.

    The bias depends only on ``key - query``: it is looked up once per offset (``(heads, 2 * length - 1)``) and
    a block of rows is a copy of a sliding view of that table, so a block costs its own size and nothing more.

    Args:
        embedding: ``nn.Embedding(num_buckets, heads)``, the learned bias per bucket and head.
        length: tokens in the sequence.
        max_distance: offset at which the log-spaced buckets end.
    """

    def __init__(self, embedding: nn.Embedding, length: int, max_distance: int):
        self.length = length
        offsets = torch.arange(1 - length, length, device=embedding.weight.device)  # key - query
        buckets = relative_position_buckets(offsets, embedding.num_embeddings, max_distance)
        # by_start[:, s, k] = bias of offset k - (length - 1 - s): row s holds query length - 1 - s
        self._by_start = embedding(buckets).t().unfold(1, length, 1)

    def rows(self, first: int, last: int) -> torch.Tensor:
        """Bias of queries ``first .. last-1`` against every key: ``(heads, last - first, length)``."""
        return self._by_start[:, self.length - last : self.length - first].flip(1)


def position_gate(gate_input: torch.Tensor, linear: nn.Linear, scale: torch.Tensor) -> torch.Tensor:
    """Per-query gate on the position bias: ``(batch, heads, T, head_dim) -> (batch, heads, T, 1)``.

    ``linear`` gives 8 values per head and token, summed in two groups of 4 -> ``a, b = sigmoid(...)``;
    the gate is ``a * (b * scale - 1) + 2`` (``scale``: ``(1, heads, 1, 1)``).
    """
    batch, heads, tokens, _ = gate_input.shape
    gate_a, gate_b = torch.sigmoid(linear(gate_input).view(batch, heads, tokens, 2, 4).sum(-1)).chunk(2, dim=-1)
    return gate_a * (gate_b * scale - 1.0) + 2.0


def blockwise_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias_rows: Callable[[int, int], torch.Tensor | None],
    block: int | None = None,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias) v`` for ``QUERY_BLOCK`` queries at a time.

    Args:
        query, key, value: ``(batch, heads, T, head_dim)``.
        bias_rows: ``bias_rows(first, last)`` -> the additive bias of those queries, broadcastable to
            ``(batch, heads, last - first, T)``, or ``None``.
        block: queries per block (default :data:`QUERY_BLOCK`).
    Returns:
        ``(batch, heads, T, head_dim)``.
    """
    block = block or QUERY_BLOCK
    tokens = query.shape[2]
    blocks = []
    for first in range(0, tokens, block):
        last = min(first + block, tokens)
        bias = bias_rows(first, last)
        blocks.append(F.scaled_dot_product_attention(query[:, :, first:last], key, value, attn_mask=bias))
    return torch.cat(blocks, dim=2)


class BlockwiseWavLMAttention(nn.Module):
    """Drop-in for a transformers ``WavLMAttention`` (eval only) that attends a block of queries at a time.

    It takes over the original's submodules under the same names (state dicts are unchanged). Between layers
    it passes a :class:`RelativePositionBias` where the original passes the full bias tensor; only the
    encoder's layer loop sees it, and hands it on unchanged.
    """

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.num_heads = attention.num_heads
        self.max_distance = attention.max_distance
        for name in ("q_proj", "k_proj", "v_proj", "out_proj", "gru_rel_pos_linear"):
            setattr(self, name, getattr(attention, name))
        self.gru_rel_pos_const = attention.gru_rel_pos_const
        if hasattr(attention, "rel_attn_embed"):
            self.rel_attn_embed = attention.rel_attn_embed

    def forward(self, hidden_states, attention_mask=None, position_bias=None, index=0, **kwargs):
        """``hidden_states``: (batch, T, dim) -> ``(output (batch, T, dim), None, position bias)``."""
        if attention_mask is not None:
            raise NotImplementedError("padded batches: KeyFace encodes one clip at a time, without a mask")
        batch, tokens, dim = hidden_states.shape
        if position_bias is None:
            position_bias = RelativePositionBias(self.rel_attn_embed, tokens, self.max_distance)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, tokens, self.num_heads, dim // self.num_heads).transpose(1, 2)

        # the gate reads the layer input (not the projected query), split into heads
        gate = position_gate(heads(hidden_states), self.gru_rel_pos_linear, self.gru_rel_pos_const)
        query, key, value = (heads(project(hidden_states)) for project in (self.q_proj, self.k_proj, self.v_proj))
        out = blockwise_attention(query, key, value, lambda a, b: gate[:, :, a:b] * position_bias.rows(a, b)[None])
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, dim)), None, position_bias


def use_blockwise_attention(model: nn.Module) -> nn.Module:
    """Replace every ``WavLMAttention`` of a transformers ``WavLMModel`` by :class:`BlockwiseWavLMAttention`."""
    for layer in model.encoder.layers:
        if not isinstance(layer.attention, BlockwiseWavLMAttention):
            layer.attention = BlockwiseWavLMAttention(layer.attention)
    return model
