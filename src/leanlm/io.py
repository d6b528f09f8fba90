"""Outputs that fail before the work and appear whole or not at all.

check_writable(path, force, directory, need_bytes) runs before any model is loaded: the parent must be
a writable directory, the disk must hold about `need_bytes`, and an existing path is replaced only with
force and, for a directory, only when leanlm wrote it (it holds MARKER). Every output is written to a
hidden temporary sibling named `.NAME.leanlm-tmp-PID-XXXX` and renamed into place when complete; the
siblings a killed run left behind are removed by the next write to the same path. A directory's MARKER
says {"complete": false} until just before the rename, and leanlm.load refuses such a directory, so a
SIGKILL never leaves a partial that loads. Files and directories get the mode the user's umask implies.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import LeanlmError

MARKER = "leanlm_output.json"  # in every directory leanlm writes: what --force may replace
TEMP_TAG = ".leanlm-tmp-"  # temporary siblings: .NAME.leanlm-tmp-PID-RANDOM


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


# ---- what leanlm wrote ------------------------------------------------------------------------
def is_leanlm_output(path: str | Path) -> bool:
    """A directory leanlm wrote: it holds MARKER, or (written before the marker existed) a config.json with
    leanlm's own entries (leanlm_applied, leanlm_quant, leanlm_layers) or a GGUF conversion's leanlm_source.json."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    if (path / MARKER).is_file() or (path / "leanlm_source.json").is_file():
        return True
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and any(str(k).startswith("leanlm_") for k in config)


def incomplete_output(path: str | Path) -> bool:
    """Whether `path` is a directory leanlm was still writing when it stopped (its MARKER says incomplete)."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("complete") is False


def _write_marker(directory: Path, complete: bool) -> None:
    from . import __version__

    (directory / MARKER).write_text(json.dumps({"written_by": "leanlm", "version": __version__,
                                                "complete": complete}) + "\n")  # fmt: skip


# ---- temporary siblings ---------------------------------------------------------------------------
def temp_prefix(path: Path) -> str:
    """Prefix of this process's temporary siblings of `path` (tempfile adds a random suffix)."""
    return f".{path.name}{TEMP_TAG}{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temporary siblings of `path` that runs no longer alive left behind (a SIGKILL, a power cut).
    Siblings of live processes (a concurrent write) are kept. Returns what was removed."""
    path = Path(path)
    removed = []
    with contextlib.suppress(OSError):
        for p in path.parent.glob(f".{glob_escape(path.name)}{TEMP_TAG}*"):
            pid = p.name[len(f".{path.name}{TEMP_TAG}") :].split("-", 1)[0]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            removed.append(p)
    return removed


def glob_escape(name: str) -> str:
    """`name` with glob's special characters taken literally."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


# ---- size of an output, estimated before anything loads ---------------------------------------------------
def model_parameters(spec: str | Path) -> int | None:
    """Parameter count of a model (default name, .gguf file or model directory) read from its weight files'
    headers; nothing is loaded. None when it cannot be told (the load then reports what is wrong)."""
    from .model.load import DEFAULT_MODELS, converted_dir

    try:
        path = DEFAULT_MODELS[str(spec)]() if str(spec) in DEFAULT_MODELS else Path(spec).expanduser()
        if path.is_file():  # a GGUF: its cached conversion, else a lower bound (no GGUF stores > 32 bits/weight)
            if not (converted_dir(path) / "model.safetensors").is_file():
                return path.stat().st_size // 4
            path = converted_dir(path)
        from safetensors import safe_open

        total = 0
        for f in Path(path).glob("*.safetensors"):
            with safe_open(f, framework="pt") as st:
                for key in st.keys():
                    n = 1
                    for d in st.get_slice(key).get_shape():
                        n *= d
                    total += n
        return total or None
    except Exception:  # an estimate only: any unreadable model is reported by the load itself
        return None


def estimated_bytes(spec: str | Path, bits_per_parameter: float) -> int:
    """About how many bytes a model written at `bits_per_parameter` takes (0 when its size is unknown)."""
    n = model_parameters(spec)
    return int(n * bits_per_parameter / 8) if n else 0


# ---- checks before the work ----------------------------------------------------------------------
def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n / 2**10:,.0f} KB"


def _existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of `path` that exists; a LeanlmError when one on the way is not a directory."""
    p = path.parent
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise LeanlmError(f"cannot write {path}: {p} is a file, not a directory; choose another output path")
    return p


def check_writable(path: str | Path, force: bool = False, directory: bool = False, need_bytes: int = 0) -> Path:
    """Fail now, before any work, when `path` could not be written: a parent that is a file or not writable,
    too little free space for about `need_bytes`, or an existing path. An existing file is replaced only with
    `force`; an existing directory only with `force` and when leanlm wrote it (is_leanlm_output), because
    replacing it deletes everything in it. `directory`: the output is a directory (else a file).
    Removes the temporary siblings of `path` that killed runs left. Returns `path` (absolute)."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    if path.parent == path:
        raise LeanlmError(f"cannot write {path}: it is the filesystem root; choose an output path inside a folder")
    what = "directory" if directory else "file"
    if path.exists() or path.is_symlink():
        if path.is_dir():
            cwd = Path(os.path.abspath(os.getcwd()))
            if not directory:
                raise LeanlmError(f"{path} is a directory; the output is a file: give a file path")
            if not is_leanlm_output(path):
                raise LeanlmError(f"{path} exists and is not a directory leanlm wrote (no {MARKER}); leanlm replaces "
                                  "only its own outputs, even with --force: choose a new output path")  # fmt: skip
            if cwd == path or path in cwd.parents:
                raise LeanlmError(f"{path} holds the current directory; choose another output path")
        elif directory:
            raise LeanlmError(f"{path} exists and is a file; the output is a directory: choose another path")
        if not force:
            raise LeanlmError(f"{path} already exists; pass --force (force=True) to replace it")
    ancestor = _existing_ancestor(path)
    if not os.access(ancestor, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise LeanlmError(f"cannot write the output {what} {path}: {ancestor} is not writable by this user; "
                          "choose another output path")  # fmt: skip
    if need_bytes > 0:
        free = shutil.disk_usage(ancestor).free
        if free < need_bytes:
            raise LeanlmError(f"not enough disk space for {path}: it needs about {_mb(need_bytes)} (estimated from "
                              f"the model's size), {ancestor} has {_mb(free)} free; free some space or choose "
                              "another output path")  # fmt: skip
    clean_stale_temps(path)
    return path


def _mkdirs(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LeanlmError(f"cannot create the output folder {directory} ({e.strerror}); choose another path") from e


def _write_error(path: Path, e: OSError) -> LeanlmError:
    return LeanlmError(f"writing {path} failed ({e.strerror or e}); nothing was written there. Check the disk "
                       "space and permissions, or choose another output path")  # fmt: skip


@contextlib.contextmanager
def atomic_dir(path: str | Path, force: bool = False, need_bytes: int = 0):
    """Yield a temporary directory that replaces `path` only if the block succeeds. The directory carries
    MARKER, "incomplete" until the rename, so a killed run leaves nothing leanlm.load accepts."""
    path = check_writable(path, force, directory=True, need_bytes=need_bytes)
    _mkdirs(path.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), dir=path.parent))
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        tmp.chmod(_mode_for_umask(directory=True))  # mkdtemp makes it private
        _write_marker(tmp, complete=False)
        yield tmp
        _write_marker(tmp, complete=True)
        old = None
        if path.exists():
            old = path.with_name(temp_prefix(path) + "old")  # a killed run's leftover is removed as a stale temp
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except OSError as e:
        raise _write_error(path, e) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str, force: bool = False) -> Path:
    path = check_writable(path, force)
    _mkdirs(path.parent)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        replace_with_umask(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise _write_error(path, e) from e
        raise
    return path


def write_json_atomic(path: str | Path, obj, force: bool = False) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n", force)
