"""Atomic writes: outputs appear whole or not at all, and with the mode the user's umask implies."""

import os
import stat

import pytest

from leanlm.io import atomic_dir, write_json_atomic, write_text_atomic


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=oct)
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_follow_the_umask(tmp_path, umask):
    # tempfile.mkstemp creates 0600 files: a rename alone would leave every output private
    assert mode(write_text_atomic(tmp_path / "a.txt", "x")) == 0o666 & ~umask
    assert mode(write_json_atomic(tmp_path / "b.json", {"a": 1})) == 0o666 & ~umask
    write_json_atomic(tmp_path / "b.json", {"a": 2}, force=True)  # an overwrite too
    assert mode(tmp_path / "b.json") == 0o666 & ~umask


def test_directories_follow_the_umask(tmp_path, umask):
    with atomic_dir(tmp_path / "out") as d:
        (d / "weights.bin").write_bytes(b"1")
    assert mode(tmp_path / "out") == 0o777 & ~umask
    assert (tmp_path / "out" / "weights.bin").read_bytes() == b"1"


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as d:
            (d / "half").write_text("x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
