"""Atomic writes: outputs appear whole or not at all, and with the mode the user's umask implies."""

import json
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


def test_force_replaces_only_what_leanlm_wrote(tmp_path):
    from leanlm import LeanlmError
    from leanlm.io import MARKER

    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("years of work")
    with pytest.raises(LeanlmError, match="not a directory leanlm wrote"):
        with atomic_dir(mine, force=True) as d:
            (d / "weights.bin").write_bytes(b"1")
    assert (mine / "chapter1.tex").read_text() == "years of work" and not (mine / "weights.bin").exists()
    out = tmp_path / "out"
    with atomic_dir(out) as d:
        (d / "weights.bin").write_bytes(b"1")
    assert json.loads((out / MARKER).read_text())["complete"] is True
    with pytest.raises(LeanlmError, match="already exists; pass --force"):
        with atomic_dir(out) as d:
            pass
    with atomic_dir(out, force=True) as d:  # leanlm's own output: replaced
        (d / "weights.bin").write_bytes(b"2")
    assert (out / "weights.bin").read_bytes() == b"2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "thesis"]  # no temporary sibling left


def test_a_directory_written_before_the_marker_counts_as_leanlm_s(tmp_path):
    from leanlm.io import is_leanlm_output

    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"model_type": "llama", "leanlm_applied": []}))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert is_leanlm_output(old) and not is_leanlm_output(hf)


@pytest.mark.parametrize("case", ["parent-file", "cwd", "file-for-dir", "dir-for-file"])
def test_outputs_that_cannot_be_written_fail_at_the_check(tmp_path, monkeypatch, case):
    from leanlm import LeanlmError
    from leanlm.io import check_writable

    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    monkeypatch.chdir(tmp_path)
    path, directory, message = {"parent-file": ("afile/out", True, "is a file, not a directory"),
                                "cwd": (".", True, "not a directory leanlm wrote"),
                                "file-for-dir": ("afile", True, "is a file; the output is a directory"),
                                "dir-for-file": ("adir", False, "is a directory; the output is a file")}[case]  # fmt: skip
    with pytest.raises(LeanlmError, match=message):
        check_writable(path, force=True, directory=directory)


def test_free_space_is_checked_before_the_work(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from leanlm import LeanlmError
    from leanlm.io import check_writable

    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(10**9, 10**9 - 5 * 2**20, 5 * 2**20))
    check_writable(tmp_path / "small", need_bytes=2**20)
    with pytest.raises(LeanlmError, match="needs about 100 MB.*has 5 MB free"):
        check_writable(tmp_path / "big", need_bytes=100 * 2**20)


def test_stale_temporary_siblings_are_cleaned_and_live_ones_kept(tmp_path):
    import subprocess

    from leanlm.io import TEMP_TAG, clean_stale_temps

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    stale_dir = tmp_path / f".out{TEMP_TAG}{dead.pid}-abc"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"0" * 100)
    stale_file = tmp_path / f".out{TEMP_TAG}{dead.pid}-def"
    stale_file.write_text("x")
    live = tmp_path / f".out{TEMP_TAG}{os.getpid()}-ghi"  # a concurrent write in progress
    live.mkdir()
    unrelated = tmp_path / ".out.keep"
    unrelated.write_text("x")
    assert sorted(clean_stale_temps(tmp_path / "out")) == sorted([stale_dir, stale_file])
    assert live.exists() and unrelated.exists() and not stale_dir.exists() and not stale_file.exists()


def test_sigkill_leaves_no_loadable_partial_and_the_next_run_cleans_it(tiny_dirs, tmp_path):
    """A save killed mid-way leaves a hidden temporary directory that leanlm.load refuses; the next write of
    the same output removes it."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import leanlm
    from leanlm import LeanlmError
    from leanlm.io import TEMP_TAG

    out = tmp_path / "saved"
    child = f"""
import sys, time
import leanlm
model, tok = leanlm.load({str(tiny_dirs["llama"])!r})
save_tok = tok.save_pretrained
def slow(d, *a, **k):  # weights and config.json are written: stop here, as a SIGKILL would
    save_tok(d, *a, **k)
    print("written", flush=True)
    time.sleep(120)
tok.save_pretrained = slow
leanlm.save(model, tok, {str(out)!r})
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(leanlm.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "written"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not out.exists()
    partial = [q for q in tmp_path.iterdir() if TEMP_TAG in q.name]
    assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file() and (partial[0] / "config.json").is_file()
    with pytest.raises(LeanlmError, match="still writing when it stopped"):
        leanlm.load(partial[0])
    model, tok = leanlm.load(tiny_dirs["llama"])
    leanlm.save(model, tok, out)  # the next run of the same output
    assert [q.name for q in tmp_path.iterdir()] == ["saved"]
    leanlm.load(out)
