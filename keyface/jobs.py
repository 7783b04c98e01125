"""The job folder: finished work of a generation kept on disk, so that an interrupted run resumes.

Layout::

    <job>/job.json                                   what the job is (descriptions and their fingerprints)
    <job>/keyframes/batch_000012.safetensors         keyframe latents of batch 12   {"latents": (14, C, h, w)}
    <job>/segments-<fp>/segment_000345.safetensors   latents of segment 345         {"latents": (14, C, h, w)}

The folder belongs to one *keyframe job* (identity, keyframe audio, emotion, keyframe settings and model):
another one empties it. The interpolation settings (steps, guidance, seed, model) select a ``segments-<fp>``
subfolder, so re-running stage 2 with other settings keeps the keyframes (only the most recently used segment
folders are kept: a job folder is a cache of one job, not an archive). A segment file also records a digest of the two keyframe
latents it was interpolated from: when a keyframe is replaced (an artist's edit), the segments that used the
old one are recomputed rather than reused. Every file is written under a temporary name and renamed, so a file
that exists is complete.

Job folders without an explicit path live under a jobs root (:func:`default_jobs_root`, or the host's: ComfyUI's
user folder), named by fingerprint. Opening one marks it used (:meth:`JobFolder.touch`) and prunes the root: the
least recently used job folders are deleted beyond a size cap (:func:`prune_jobs`), never the one being opened.
A folder deleted while a job still uses it (pruned, or removed after its video was written) is set up again on
the job's next save, so the job recomputes what it needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoints.formats import read_safetensors
from .errors import CheckpointError, KeyFaceError
from .files import atomic_write
from .paths import default_cache_root

logger = logging.getLogger(__name__)

JOB_FORMAT = "keyface-job-v1"
DEFAULT_JOBS_MAX_BYTES = 20 * 1024**3  # about 3.5 hours of full-size latents (5.9 GB per hour of video)
_MANIFEST = "job.json"
_LATENTS = "latents"
_KEYFRAME_DIGEST = "keyframes"
# Segment folders (other stage-2 settings) kept per job besides the newest: re-rolls stay cheap to revisit.
_SEGMENT_FOLDERS_KEPT = 3


def default_jobs_root() -> Path:
    return default_cache_root() / "jobs"


def tensor_digest(*tensors: torch.Tensor) -> str:
    """SHA-256 (hex) of the float32 bytes of ``tensors`` in order (shapes included)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        array = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
        digest.update(repr(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def fingerprint(description: dict) -> str:
    """A short stable digest of a JSON-serialisable description."""
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def prune_jobs(root: Path, max_bytes: int = DEFAULT_JOBS_MAX_BYTES, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used job folders under ``root`` until all of them total at most ``max_bytes``.

    Last use is a folder's modification time, which :meth:`JobFolder.touch` sets on every open. ``keep`` (the
    job in use) counts towards the total but is never deleted. Returns the deleted folders, least recent first.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    keep = Path(keep).absolute() if keep is not None else None
    jobs, total = [], 0
    for folder in root.iterdir():
        if not folder.is_dir():
            continue
        size = _folder_bytes(folder)
        total += size
        if folder.absolute() != keep:
            jobs.append((folder.stat().st_mtime_ns, folder.name, size, folder))
    removed = []
    for _, _, size, folder in sorted(jobs):
        if total <= max_bytes:
            break
        shutil.rmtree(folder, ignore_errors=True)
        total -= size
        removed.append(folder)
        logger.info("removed the least recently used job folder %s (job folders over %d bytes)", folder, max_bytes)
    return removed


class JobFolder:
    """Finished keyframe batches and segments of one job, on disk.

    Args:
        path: the folder (created if missing); ``None``: ``<jobs root>/<keyframe fingerprint>``.
        keyframe_job: JSON-serialisable description of everything the keyframes depend on.
        segment_job: the same for what the segments depend on besides their two keyframes.
        root: the jobs root for ``path=None`` (default :func:`default_jobs_root`), pruned to ``max_bytes`` on
            every open.
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        keyframe_job: dict,
        segment_job: dict,
        *,
        root: str | os.PathLike | None = None,
        max_bytes: int = DEFAULT_JOBS_MAX_BYTES,
    ):
        self.keyframe_fingerprint = fingerprint(keyframe_job)
        self.segment_fingerprint = fingerprint(segment_job)
        if path is None:
            jobs_root = Path(root).expanduser() if root is not None else default_jobs_root()
            path = jobs_root / self.keyframe_fingerprint
            prune_jobs(jobs_root, max_bytes, keep=path)
        self.path = Path(path).expanduser().absolute()
        self.segments_path = self.path / f"segments-{self.segment_fingerprint}"
        self._jobs = (keyframe_job, segment_job)
        try:
            self._adopt()
        except OSError as error:
            raise KeyFaceError(
                f"cannot use the job folder {self.path}: {error.strerror or error}; choose a writable folder for "
                "the job (it keeps finished work so that an interrupted run resumes)"
            ) from error

    def _adopt(self) -> None:
        keyframe_job, segment_job = self._jobs
        manifest = self.path / _MANIFEST
        try:
            existing = json.loads(manifest.read_text()) if manifest.is_file() else None
        except (OSError, ValueError):
            existing = None
        if not manifest.is_file() and self.path.is_dir() and any(self.path.iterdir()):
            raise KeyFaceError(
                f"the job folder {self.path} is not empty and holds no KeyFace job ({_MANIFEST}); give a new or "
                "empty folder (nothing in it was touched)"
            )
        if manifest.is_file() and (existing or {}).get("keyframe_fingerprint") != self.keyframe_fingerprint:
            logger.info("job folder %s held another job; starting this one afresh", self.path)
            self._clear()
        (self.path / "keyframes").mkdir(parents=True, exist_ok=True)
        self.segments_path.mkdir(exist_ok=True)
        os.utime(self.segments_path)
        older = sorted(self.path.glob("segments-*"), key=lambda p: p.stat().st_mtime, reverse=True)
        for stale in older[_SEGMENT_FOLDERS_KEPT:]:
            shutil.rmtree(stale, ignore_errors=True)
        description = {
            "format": JOB_FORMAT,
            "keyframe_fingerprint": self.keyframe_fingerprint,
            "segment_fingerprint": self.segment_fingerprint,
            "keyframe_job": keyframe_job,
            "segment_job": segment_job,
        }
        self._write_text(manifest, json.dumps(description, indent=1, sort_keys=True))
        self.touch()

    def touch(self) -> None:
        """Mark the job used now: :func:`prune_jobs` deletes the least recently used job folders first."""
        os.utime(self.path)

    def keyframes(self, batch: int) -> torch.Tensor | None:
        """Latents ``(14, C, h, w)`` of keyframe batch ``batch``, or None when not done yet."""
        stored = self._read(self._keyframe_path(batch))
        return None if stored is None else stored[0]

    def save_keyframes(self, batch: int, latents: torch.Tensor) -> None:
        self._save(self._keyframe_path(batch), latents, {})

    def segment(self, index: int, keyframe_digest: str) -> torch.Tensor | None:
        """Latents ``(14, C, h, w)`` of segment ``index`` if it was made from keyframes with ``keyframe_digest``."""
        stored = self._read(self._segment_path(index))
        if stored is None or stored[1].get(_KEYFRAME_DIGEST) != keyframe_digest:
            return None
        return stored[0]

    def save_segment(self, index: int, keyframe_digest: str, latents: torch.Tensor) -> None:
        self._save(self._segment_path(index), latents, {_KEYFRAME_DIGEST: keyframe_digest})

    def remove(self) -> None:
        """Delete the whole folder (after a finished job whose work need not be kept)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def _keyframe_path(self, batch: int) -> Path:
        return self.path / "keyframes" / f"batch_{batch:06d}.safetensors"

    def _segment_path(self, index: int) -> Path:
        return self.segments_path / f"segment_{index:06d}.safetensors"

    def _read(self, path: Path) -> tuple[torch.Tensor, dict] | None:
        if not path.is_file():
            return None
        try:
            tensors, metadata = read_safetensors(path, what="job file")
            return tensors[_LATENTS], metadata
        except (CheckpointError, KeyError) as error:
            logger.warning("ignoring unreadable job file %s (%s); it will be recomputed", path, error)
            return None

    def _save(self, path: Path, latents: torch.Tensor, metadata: dict[str, str]) -> None:
        try:
            if not (self.path / _MANIFEST).is_file():  # deleted meanwhile (pruned, or removed after the video)
                self._adopt()
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise KeyFaceError(
                f"cannot save finished work to the job folder {self.path}: {error.strerror or error}; "
                "free some disk space or choose another job folder"
            ) from error
        with atomic_write(path, f"job folder {self.path}: file") as temp:
            save_file({_LATENTS: latents.detach().to("cpu", torch.float32).contiguous()}, temp, metadata=metadata)

    def _write_text(self, path: Path, text: str) -> None:
        with atomic_write(path, f"job folder {self.path}: file") as temp:
            temp.write_text(text)

    def _clear(self) -> None:
        for child in self.path.iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
