"""Atomic output: write to a temporary sibling, then rename; never overwrite without force."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import LeanlmError


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only read by setting)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for_umask(directory: bool) -> int:
    """The mode open()/mkdir() would give a new file or directory: tempfile's are private (0600/0700)."""
    return (0o777 if directory else 0o666) & ~_umask()


def replace_with_umask(tmp: str | Path, path: str | Path) -> None:
    """Give a finished temporary file the mode the umask implies, then rename it over `path` (atomic)."""
    os.chmod(tmp, _mode_for_umask(directory=False))  # mkstemp makes it 0600
    os.replace(tmp, path)


def check_writable(path: str | Path, force: bool) -> Path:
    path = Path(path)
    if path.exists() and not force:
        raise LeanlmError(f"{path} already exists; pass --force (force=True) to overwrite it")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path, force: bool = False):
    """Yield a temporary directory that replaces `path` only if the block succeeds."""
    path = check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(_mode_for_umask(directory=True))  # mkdtemp makes it private
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str, force: bool = False) -> Path:
    path = check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        replace_with_umask(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: str | Path, obj, force: bool = False) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n", force)
