"""Whole-file and whole-folder writes that readers never see half done (the project rule for every output).

* ``write_atomic(path, data)``: one file (text or bytes).
* ``save_safetensors_atomic(path, tensors, metadata)``: one safetensors file through the library's writer.
* ``staged_dir(path)``: a folder built under a hidden sibling name and renamed into place when complete.

All three leave files with the mode ``open()`` would give (0644 under the default umask 022) and folders
0755: ``tempfile.mkstemp``/``mkdtemp`` and ``safetensors.torch.save_file`` create 0600/0700, which makes a
shared cache or an export unreadable to the rest of a group. Temporary names carry the writer's pid, so
leftovers of a killed writer can be told from those of a live concurrent one (``stale_partials``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("mxq.atomic")


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc), else via os.umask."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    cur = os.umask(0o022)
    os.umask(cur)
    return cur


def file_mode() -> int:
    """Mode of a new regular file: what ``open(path, "w")`` gives (0644 under umask 022)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """Mode of a new folder: what ``mkdir`` gives (0755 under umask 022)."""
    return 0o777 & ~_umask()


def _fsync_dir(folder: Path) -> None:
    """Persist a rename: fsync the folder that holds the entry (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[tuple[int, str]]:
    """``(fd, tmp)`` of a new temp file beside ``path`` for the caller to fill (and close ``fd``); on success
    the file is made ``file_mode()``, fsynced and renamed over ``path``, on any error deleted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
    try:
        yield fd, tmp
        os.chmod(tmp, file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, then ``os.replace`` it into place.

    Why: a crash or Ctrl-C mid-write must leave either the old file or none, never a truncated one that a
    later run would trust. The temp file sits in the same folder so the rename stays on one filesystem.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with _replacing(Path(path)) as (fd, _), os.fdopen(fd, "wb") as f:
        f.write(raw)


def save_safetensors_atomic(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` into a temp file beside ``path``, made 0644, fsynced and renamed."""
    from safetensors.torch import save_file

    with _replacing(Path(path)) as (fd, tmp):
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)


def partial_name(path: Path, kind: str = "partial") -> Path:
    """Hidden sibling ``.NAME.partial-PID-RANDOM`` where a folder is built before its rename into ``path``."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{os.urandom(4).hex()}"


_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old|tmp)-(?P<pid>\d+)-[0-9a-f]+$")


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine with this pid is running (a pid we may not signal counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_partials(path: Path) -> list[Path]:
    """Leftover staging folders of ``path`` (``.NAME.partial-PID-*``, ``.NAME.old-PID-*``) whose writer is
    no longer running (a SIGKILL or power loss mid-write); a live writer's folder is never listed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    out = []
    for p in path.parent.iterdir():
        m = _PARTIAL.match(p.name)
        if m and m["name"] == path.name and not pid_alive(int(m["pid"])):
            out.append(p)
    return sorted(out)


def remove_stale_partials(path: Path) -> list[Path]:
    """Delete ``stale_partials(path)`` with a warning naming each one; returns what was removed."""
    gone = stale_partials(path)
    for p in gone:
        log.warning("removing %s: staging folder of a writer (pid %s) that died before finishing", p,
                    _PARTIAL.match(p.name)["pid"])
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return gone


@contextlib.contextmanager
def staged_dir(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """``with staged_dir(out) as tmp:`` build the folder in ``tmp``; on success it is renamed to ``out``.

    On an exception ``tmp`` is deleted and ``out`` untouched. With ``replace`` an existing ``out`` is swapped
    out (renamed aside, then deleted) only after the new folder is complete; without it an existing ``out``
    is an error. Stale staging folders of ``out`` from killed writers are removed first.
    """
    out = Path(path)
    if out.exists() and not replace:
        raise FileExistsError(f"{out}: already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = partial_name(out)
    tmp.mkdir(mode=0o777)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finish_dir(tmp, out, replace)


def finish_dir(tmp: Path, out: Path, replace: bool = False) -> None:
    """Rename a complete staging folder ``tmp`` into ``out`` (swapping an existing one out if ``replace``)."""
    os.chmod(tmp, dir_mode())
    old = None
    if out.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{out}: already exists")
        old = partial_name(out, "old")
        os.rename(out, old)
    os.rename(tmp, out)
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
