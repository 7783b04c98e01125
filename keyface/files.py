"""Files the library writes and the weights it remembers: one atomic write rule, one file identity.

Every file KeyFace produces (videos, images, checkpoints, job latents, cached features, downloads) is written
under a hidden temporary name in the target's folder and renamed onto the target when complete, so a crash or
Ctrl-C never leaves a half-written file under the name the user asked for. The renamed file gets the mode a
plain ``open()`` would have given it (``0o666`` less the umask), not the ``0o600`` of a temporary file, so other
accounts (a web server, ComfyUI running as another user) can read outputs as usual.
"""

from __future__ import annotations

import errno
import os
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, KeyFaceError


@dataclass(frozen=True)
class ModelFiles:
    """Paths of every weight file of a KeyFace setup (``autoguidance`` None: run without autoguidance)."""

    keyframe: Path
    interpolation: Path
    autoguidance: Path | None
    vae: Path
    audio: Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def place_file(finished: Path, target: Path) -> None:
    """Rename a complete file (same file system) onto ``target`` with the mode a plain ``open()`` gives."""
    os.chmod(finished, 0o666 & ~_umask())
    os.replace(finished, target)


class AtomicOutput:
    """A target path plus a hidden temporary file beside it, renamed onto the target on :meth:`commit`.

    Checks the target before any work: not a directory, parent folder exists and is writable and, when
    ``extensions`` is given, the extension is one of them. The temporary file is removed by :meth:`discard`,
    and also if the object is garbage collected or the interpreter exits before :meth:`commit`.

    Args:
        path: the file to produce.
        extensions: allowed lower-case suffixes (``".mp4"``...), or ``None`` for any.
        what: how error messages name the target (``"video output"``, ``"checkpoint output"``...).
    """

    def __init__(self, path: str | os.PathLike, extensions: Iterable[str] | None, what: str) -> None:
        self.path = Path(path).expanduser().absolute()
        self.what = what
        if self.path.is_dir():
            example = self.path / ("out" + (sorted(extensions)[0] if extensions else ""))
            raise InputError(f"{what} {self.path} is a folder; give a file name such as {example}")
        if extensions is not None:
            allowed = sorted(extensions)
            if self.path.suffix.lower() not in allowed:
                raise InputError(
                    f"{what} {self.path}: unsupported extension {self.path.suffix or '(none)'!r}; "
                    f"use one of {', '.join(allowed)}"
                )
        parent = self.path.parent
        if not parent.is_dir():
            raise InputError(f"{what} {self.path}: folder {parent} does not exist; create it first")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"{what} {self.path}: folder {parent} is not writable; choose another folder")
        try:
            handle, temp_name = tempfile.mkstemp(
                prefix=f".{self.path.stem}.", suffix=f".partial{self.path.suffix}", dir=parent
            )
        except OSError as error:
            raise KeyFaceError(f"cannot create a temporary file next to {self.path}: {error}") from error
        os.close(handle)
        self.temp_path = Path(temp_name)
        self._cleanup = weakref.finalize(self, _remove_quietly, self.temp_path)

    def commit(self) -> Path:
        """Give the finished temporary file the usual permissions and move it onto the target path."""
        try:
            place_file(self.temp_path, self.path)
        except OSError as error:
            self.discard()
            raise KeyFaceError(f"cannot move the finished file to {self.path}: {error}") from error
        self._cleanup.detach()
        return self.path

    def discard(self) -> None:
        """Remove the temporary file; the target path is left untouched."""
        self._cleanup()

    def write_error(self, error: OSError) -> KeyFaceError:
        """A KeyFaceError naming the target for an OSError met while writing (disk full, I/O error, ...)."""
        hint = (
            "free some disk space or choose another folder"
            if error.errno in (errno.ENOSPC, errno.EDQUOT)
            else "check the disk and the folder's permissions"
        )
        return KeyFaceError(f"writing {self.path} failed: {error.strerror or error}; {hint}. Nothing was saved.")


@contextmanager
def atomic_write(path: str | os.PathLike, what: str, extensions: Iterable[str] | None = None) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` through; renamed onto ``path`` if the block succeeds.

    An ``OSError`` inside the block becomes a :class:`~keyface.errors.KeyFaceError` naming ``what`` and the
    target; any exception removes the temporary file and leaves ``path`` as it was.
    """
    output = AtomicOutput(path, extensions, what)
    try:
        yield output.temp_path
    except OSError as error:
        output.discard()
        raise output.write_error(error) from error
    except BaseException:
        output.discard()
        raise
    output.commit()


def file_identity(path: str | os.PathLike) -> str:
    """``name:size:mtime_ns`` of a file, or of every file below a folder (names relative to it).

    What caches and job fingerprints remember of a weight file: cheap (no content hash, which would read
    gigabytes on every run) and independent of where the folder lives, so a moved models folder still matches.
    """
    path = Path(path).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    base = path if path.is_dir() else path.parent
    parts = []
    for file in files:
        stat = file.stat()
        parts.append(f"{file.relative_to(base).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}")
    return ";".join(parts)
