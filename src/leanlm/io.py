"""Atomic output: write to a temporary sibling, then rename; never overwrite without force."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import LeanlmError


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
    tmp.chmod(0o755)  # mkdtemp makes it private
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
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: str | Path, obj, force: bool = False) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n", force)
