"""On-disk cache of audio features, memory-mapped on reading.

An entry is a folder ``<root>/<key>/`` with ``keyframe.npy`` ``(F, 2, Dk)``, ``interpolation.npy``
``(F, 2, Di)`` (float32) and ``meta.json``. The key is a hash of the 16 kHz waveform the encoders see, the
encoder weights' identities (path, size, mtime: :func:`keyface.audio.weights.file_identity`), the channel
mode, the dtype and the window settings (see :class:`keyface.audio.features.AudioFeatureExtractor`).

Entries are written block by block (:class:`FeatureFiles`: ordinary reads and writes of row ranges, no
writable memory map, so writing an hour of features holds one block, not the arrays) under a temporary name
and renamed when complete, so an interrupted extraction leaves
nothing usable behind. The cache is capped: after each write the least recently used entries are deleted
until the total size is under ``max_bytes`` (the entry just written is always kept, even when it alone is
larger). Default folder: ``features/`` under :func:`keyface.paths.default_cache_root`.

An entry's arrays never change once it is complete, so the tensors made of them (:func:`entry_tensor`) carry
an identity, :func:`entry_digest` (the key, the array name and the entry's creation time): the pipeline's job
fingerprint uses it instead of hashing the arrays, which would read every page of the map and keep it resident
(2.2 GB per hour of audio with the released encoders).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..paths import default_cache_root

DEFAULT_MAX_BYTES = 8 * 1024**3  # about 3.5 hours of audio with the full-size encoders (2.2 GB per hour)
FEATURE_ARRAYS = ("keyframe", "interpolation")
_META = "meta.json"
_PARTIAL = ".partial-"
# id of a live tensor from entry_tensor -> (its entry digest, its version counter then or None); removed when
# the tensor is freed (before its id can be reused)
_ENTRY_TENSORS: dict[int, tuple[str, int | None]] = {}


def default_cache_dir() -> Path:
    """``features/`` under the KeyFace cache root (``$KEYFACE_CACHE_DIR`` or ``~/.cache/keyface``)."""
    return default_cache_root() / "features"


class FeatureCache:
    """A folder of feature entries with a size cap.

    Args:
        root: the folder (created when first written); default :func:`default_cache_dir`.
        max_bytes: size cap of all entries together.
    """

    def __init__(self, root: str | os.PathLike | None = None, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.max_bytes = int(max_bytes)

    def open(self, key: str) -> tuple[dict[str, np.ndarray], dict] | None:
        """The arrays of entry ``key`` memory-mapped (copy-on-write) and its metadata, or ``None`` if absent."""
        entry = self.root / key
        try:
            meta = json.loads((entry / _META).read_text())
            arrays = {name: np.load(entry / f"{name}.npy", mmap_mode="c") for name in FEATURE_ARRAYS}
        except (OSError, ValueError):
            return None
        os.utime(entry / _META)  # last use, for least-recently-used eviction
        return arrays, meta

    @contextmanager
    def write(self, key: str, shapes: dict[str, tuple[int, ...]], meta: dict) -> Iterator[FeatureFiles]:
        """Create entry ``key``: yields its zero-filled arrays as :class:`FeatureFiles`, committed when the block
        exits normally."""
        self.root.mkdir(parents=True, exist_ok=True)
        partial = self.root / f"{key}{_PARTIAL}{uuid.uuid4().hex[:8]}"
        partial.mkdir()
        try:
            with FeatureFiles(partial, shapes) as files:
                yield files
            (partial / _META).write_text(json.dumps({**meta, "created": time.time()}))
            try:
                partial.rename(self.root / key)
            except OSError:  # the same entry was written meanwhile (another process): keep that one
                pass
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        self.evict(keep=key)

    def staging_folder(self) -> Path:
        """A new empty folder in the cache root for temporary files of one extraction (removed by the caller)."""
        self.root.mkdir(parents=True, exist_ok=True)
        folder = self.root / f"staging{_PARTIAL}{uuid.uuid4().hex[:8]}"
        folder.mkdir()
        return folder

    def entries(self) -> list[tuple[Path, float, int]]:
        """Complete entries as ``(folder, last use time, size in bytes)``, least recently used first."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            meta = entry / _META
            if _PARTIAL in entry.name or not meta.is_file():
                continue
            size = sum(file.stat().st_size for file in entry.iterdir() if file.is_file())
            found.append((entry, meta.stat().st_mtime, size))
        return sorted(found, key=lambda item: item[1])

    def size_bytes(self) -> int:
        return sum(size for _, _, size in self.entries())

    def evict(self, keep: str | None = None) -> None:
        """Delete least recently used entries until the cache is within ``max_bytes`` (never ``keep``)."""
        entries = self.entries()
        total = sum(size for _, _, size in entries)
        for entry, _, size in entries:
            if total <= self.max_bytes:
                break
            if entry.name == keep:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            total -= size

    def clear(self) -> None:
        """Delete every entry."""
        for entry, _, _ in self.entries():
            shutil.rmtree(entry, ignore_errors=True)


def entry_tensor(array: np.ndarray, key: str, name: str, meta: dict) -> torch.Tensor:
    """Array ``name`` of entry ``key`` (memory-mapped by :meth:`FeatureCache.open`) as a tensor sharing its memory,
    known to :func:`entry_digest` while it lives."""
    tensor = torch.from_numpy(array)
    version = None if tensor.is_inference() else tensor._version  # inference tensors keep no version counter
    _ENTRY_TENSORS[id(tensor)] = (f"feature-cache:{key}:{name}:{meta.get('created')}", version)
    weakref.finalize(tensor, _ENTRY_TENSORS.pop, id(tensor), None)
    return tensor


def entry_digest(values: object) -> str | None:
    """The identity of ``values`` if it is a tensor from :func:`entry_tensor`, unchanged (not modified in place,
    as far as its version counter tells), else ``None``. Slices and copies are new tensors: ``None``."""
    known = _ENTRY_TENSORS.get(id(values))
    if known is None:
        return None
    digest, version = known
    if version is not None and values._version != version:
        return None
    return digest


class FeatureFiles:
    """Zero-filled float32 ``.npy`` files being written (``name -> shape``), set block by block.

    :meth:`set_columns` reads a range of rows, sets some of their columns and writes them back (plain file I/O
    at the row offset), so memory holds one block whatever the array size. Used as a context manager: the
    files are closed on exit.
    """

    def __init__(self, folder: Path, shapes: dict[str, tuple[int, ...]]):
        self.shapes = {name: tuple(int(size) for size in shape) for name, shape in shapes.items()}
        self._files = {}
        self._offsets = {}
        for name, shape in self.shapes.items():
            file = open(folder / f"{name}.npy", "w+b")  # noqa: SIM115 - closed by close()
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
            np.lib.format.write_array_header_1_0(file, {**header, "shape": shape})
            self._offsets[name] = file.tell()
            file.truncate(self._offsets[name] + 4 * int(np.prod(shape)))  # sparse zeros
            self._files[name] = file

    def set_columns(self, name: str, first_row: int, column: int, values: np.ndarray) -> None:
        """Set rows ``[first_row, first_row + len(values))``, columns ``[column, column + values.shape[1])`` of
        ``name`` seen as ``(rows, shape[-1])`` (all axes but the last flattened)."""
        width = self.shapes[name][-1]
        file = self._files[name]
        rows = np.zeros((values.shape[0], width), np.float32)
        file.seek(self._offsets[name] + 4 * width * first_row)
        stored = np.frombuffer(file.read(rows.nbytes), np.float32)
        rows.reshape(-1)[: stored.size] = stored
        rows[:, column : column + values.shape[1]] = values
        file.seek(self._offsets[name] + 4 * width * first_row)
        file.write(rows.tobytes())

    def close(self) -> None:
        for file in self._files.values():
            file.close()

    def __enter__(self) -> FeatureFiles:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
