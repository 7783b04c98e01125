"""keyface.files: outputs appear atomically, with the permissions a plain open() would give them."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from keyface.errors import InputError, KeyFaceError
from keyface.files import AtomicOutput, atomic_write, file_identity
from keyface.media import write_image
from keyface.video import Mp4Writer


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_honour_the_umask_not_the_temporary_files_0600(tmp_path, umask_022):
    with atomic_write(tmp_path / "plain.bin", "test output") as temp:
        temp.write_bytes(b"data")
    image = write_image(tmp_path / "frame.png", np.zeros((16, 16, 3), np.uint8))
    with Mp4Writer(tmp_path / "clip.mp4") as writer:
        writer.write_frames(np.zeros((3, 32, 32, 3), np.uint8))
    assert [mode(tmp_path / name) for name in ("plain.bin", image.name, "clip.mp4")] == [0o644] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "frame.png", "plain.bin"]


def test_a_failed_write_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "kept.txt"
    target.write_text("old")
    with pytest.raises(KeyFaceError, match="writing .*kept.txt failed"), atomic_write(target, "test output") as temp:
        temp.write_text("half")
        raise OSError(28, "No space left on device")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["kept.txt"]


def test_a_folder_as_output_is_named_as_a_folder(tmp_path):
    with pytest.raises(InputError, match="is a folder; give a file name such as"):
        AtomicOutput(tmp_path, (".mp4",), "video output")


def test_file_identity_changes_with_content_and_not_with_location(tmp_path):
    first, second = tmp_path / "a" / "weights", tmp_path / "b" / "weights"
    for folder in (first, second):
        folder.mkdir(parents=True)
        (folder / "w.bin").write_bytes(b"1234")
        os.utime(folder / "w.bin", ns=(10**18, 10**18))
    assert file_identity(first) == file_identity(second)
    (second / "w.bin").write_bytes(b"12345")
    assert file_identity(first) != file_identity(second)
