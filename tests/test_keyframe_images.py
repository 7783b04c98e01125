"""keyface.keyframe_images: the keyframe batch shown between the stages (size under a memory budget, decoding) and
telling an artist's edits from untouched keyframes; keyface.face.centre_square, the portrait fallback."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from keyface.errors import InputError
from keyface.face import centre_square
from keyface.keyframe_images import (
    DECODE_BLOCK,
    KEYFRAME_IMAGES_BUDGET,
    apply_keyframe_edits,
    decode_keyframe_images,
    edited_keyframes,
    keyframe_image_side,
)


class FakeModels:
    image_size = 32

    def __init__(self):
        self.encoded = []

    def encode_image(self, image):
        self.encoded.append(image.clone())
        return image.mean().reshape(1, 1, 1, 1).expand(1, 4, 4, 4)


class FakeJob:
    """What the module uses of a TalkingHeadJob: slots, latents, the keyframe decoder, replacement."""

    def __init__(self, frames: list[int]):
        self.models = FakeModels()
        self.slots = [(frame, 100 + index) for index, frame in enumerate(frames)]
        self.decoder_calls = []
        self.replaced = {}

    def keyframe_slots(self):
        return self.slots

    def slot_latent(self, slot_id):
        return torch.full((4, 4, 4), float(slot_id))

    def decode_keyframes(self, latents):
        self.decoder_calls.append(len(latents))
        ramp = torch.linspace(0, 1, self.models.image_size)
        return (ramp[None, None, :, None] * ramp[None, None, None, :]).expand(len(latents), 3, -1, -1).clone()

    def replace_keyframe(self, frame, latent):
        self.replaced[frame] = latent


def test_keyframe_image_side_is_capped_by_the_model_and_the_budget():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the budget: no warning
        assert keyframe_image_side(10, 512, 64) == 64
        assert keyframe_image_side(10, 48, 64) == 48
        assert keyframe_image_side(1000, 512, 256) == 256
    with pytest.warns(UserWarning, match="^keyframe_image_size: 1154 keyframes; .* 272 px wide"):
        side = keyframe_image_side(1154, 512, 512)
    assert side == 272 and side % 8 == 0 and 1154 * side * side * 3 * 4 <= KEYFRAME_IMAGES_BUDGET
    with pytest.warns(UserWarning):
        assert keyframe_image_side(10**9, 512, 512) == 8  # never below 8 px


def test_decode_keyframe_images_in_frame_order_at_the_given_side():
    job = FakeJob(list(range(0, 13 * 20, 13)))
    progress = []
    images = decode_keyframe_images(job, 16, lambda done, total: progress.append((done, total)))
    assert images.shape == (20, 16, 16, 3) and images.dtype == torch.float32
    assert job.decoder_calls == [DECODE_BLOCK, 20 - DECODE_BLOCK]
    assert progress == [(DECODE_BLOCK, 20), (20, 20)]
    assert images.min() >= 0 and images.max() <= 1 and images[0, -1, -1, 0] > 0.9 > images[0, 0, 0, 0]
    full = decode_keyframe_images(job, 32)
    assert torch.equal(full[3], job.decode_keyframes(torch.zeros(1))[0].permute(1, 2, 0))  # no resize at full size


def test_edits_are_told_from_untouched_keyframes():
    colours = torch.rand(3, 1, 1, 3, generator=torch.Generator().manual_seed(0))
    original = colours.expand(3, 16, 16, 3).clone()  # flat keyframes: any resize keeps them
    edited = (original * 255).round() / 255  # a PNG round trip: not an edit
    edited[2, 4:8, 4:8] = 1.0  # a retouch
    assert edited_keyframes(original, edited) == [2]
    larger = torch.nn.functional.interpolate(edited.permute(0, 3, 1, 2), size=32, mode="nearest").permute(0, 2, 3, 1)
    assert edited_keyframes(original, larger) == [2]  # another size is compared at the keyframes' size
    with pytest.raises(InputError, match="^edited_keyframes: got 2 images; the sampler made 3 keyframes"):
        edited_keyframes(original, edited[:2])
    with pytest.raises(InputError, match="^edited_keyframes: images must be square") as raised:
        edited_keyframes(original, torch.rand(3, 16, 12, 3))
    assert raised.value.input_name == "edited_keyframes"
    with pytest.raises(InputError, match="^edited_keyframes: expected an image batch"):
        edited_keyframes(original, torch.rand(16, 16, 3))


def test_apply_keyframe_edits_encodes_only_the_edited_ones():
    job = FakeJob([0, 13, 26])
    original = decode_keyframe_images(job, 16)
    edited = original.clone()
    edited[1, :4] = 0.0
    with pytest.warns(UserWarning, match="16 px; enlarged to the model's 32 px"):
        replaced = apply_keyframe_edits(job, [0, 13, 26], original, edited)
    assert replaced == [13] and list(job.replaced) == [13]
    assert len(job.models.encoded) == 1 and torch.equal(job.models.encoded[0], edited[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing edited, nothing enlarged: no warning
        assert apply_keyframe_edits(FakeJob([0, 13, 26]), [0, 13, 26], original, original.clone()) == []


def test_centre_square_keeps_a_square_portrait_and_cuts_the_centre_of_others():
    square = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert centre_square(square) is square
    wide = np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    with pytest.warns(UserWarning, match=r"^portrait: the portrait is 60x40, not square; using its centre square"):
        cut = centre_square(wide, "portrait")
    assert np.array_equal(cut, wide[:, 10:50])
