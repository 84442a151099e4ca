"""Cache entries that are checked on every read, computed once under a lock, and readable by the group.

A cache entry is a folder (``router_stats/<key>/``) or one safetensors file (``kl_ref/<key>.safetensors``):

* **Checked on read.** A folder entry carries ``entry.json`` with the XXH3-128 of every file in it, written
  last; a file entry carries the XXH3-128 of its tensors in its safetensors metadata (``content_xxh3``).
  A missing, truncated, garbled or mismatching entry is a *miss*: a warning names its path, it is deleted
  and recomputed. It never raises a bare ``SafetensorError``/``JSONDecodeError`` on every later run.
* **Locked.** ``entry_lock(path)`` is a ``filelock.FileLock`` on ``<path>.lock``: of several runs that miss
  the same key at once, one computes and the others wait, then read its result.
* **Atomic and shareable.** Entries are staged and renamed into place (``mxq.atomic``), files 0644 and
  folders 0755 under the default umask.

XXH3 is not cryptographic: this guards against accidents (a killed writer, a full disk, a stray edit),
not against an adversary who can write to the cache.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import xxhash
from filelock import FileLock

from .atomic import save_safetensors_atomic, staged_dir, write_atomic

log = logging.getLogger("mxq.cache")

DIGESTS = "entry.json"
DIGEST_KEY = "content_xxh3"
LOCK_TIMEOUT_S = 6 * 3600          # a waiting run gives up after this (a computation at 120b size is long)


def entry_lock(path: str | Path, timeout: float = LOCK_TIMEOUT_S) -> FileLock:
    """The lock guarding one cache entry (``<path>.lock`` beside it; the folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path.with_name(path.name + ".lock")), timeout=timeout)


def file_digest(path: Path, chunk: int = 16 << 20) -> str:
    """XXH3-128 of a file's bytes (cache entries, and the checkpoint hashes of ``mxq.stats.cache``)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """XXH3-128 over names, dtypes, shapes and bytes of ``tensors`` (sorted by name)."""
    h = xxhash.xxh3_128()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _discard(path: Path, why: str) -> None:
    log.warning("cache entry %s is damaged (%s): treated as a miss, recomputing", path, why)
    try:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------- folder entries
def write_dir_entry(entry: Path, fill: Callable[[Path], None]) -> None:
    """Build an entry folder with ``fill(tmp)``, add ``entry.json`` (digests of every file), rename into place."""
    with staged_dir(entry, replace=True) as tmp:
        fill(tmp)
        files = {p.relative_to(tmp).as_posix(): file_digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_atomic(tmp / DIGESTS, json.dumps({"xxh3_128": files}, indent=1, sort_keys=True) + "\n")


def check_dir_entry(entry: Path) -> bool:
    """True when ``entry`` exists and every file matches ``entry.json``; a damaged entry is warned about,
    deleted and reported as absent (False)."""
    if not entry.exists():
        return False
    try:
        want = json.loads((entry / DIGESTS).read_text())["xxh3_128"]
        if not isinstance(want, dict) or not want:
            raise ValueError("no file digests")
    except FileNotFoundError:
        _discard(entry, f"no {DIGESTS}: written by an older mxq or interrupted")
        return False
    except (OSError, ValueError, KeyError, TypeError) as e:
        _discard(entry, f"{DIGESTS} unreadable: {e}")
        return False
    for name, digest in want.items():
        p = entry / name
        if not p.is_file():
            _discard(entry, f"{name} missing")
            return False
        if file_digest(p) != digest:
            _discard(entry, f"{name} does not match its XXH3-128 in {DIGESTS}")
            return False
    return True


def load_dir_entry(entry: Path, load: Callable[[Path], Any]) -> Any | None:
    """``load(entry)`` after ``check_dir_entry``; any error while loading also makes it a warned miss (None)."""
    if not check_dir_entry(entry):
        return None
    try:
        return load(entry)
    except Exception as e:  # noqa: BLE001 - whatever the reader raises, the entry is unusable
        _discard(entry, f"{type(e).__name__}: {e}")
        return None


# ---------------------------------------------------------------------------------------- file entries
def save_tensor_entry(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """One safetensors file with ``content_xxh3`` in its metadata, written atomically."""
    save_safetensors_atomic(path, tensors, {**(metadata or {}), DIGEST_KEY: tensors_digest(tensors)})


def load_tensor_entry(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors of a file entry when it is readable and matches ``content_xxh3``; else a warned miss (None)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safetensors handle, not a dict
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        _discard(path, f"{type(e).__name__}: {e}")
        return None
    if DIGEST_KEY not in meta:
        _discard(path, f"no {DIGEST_KEY} in its metadata: written by an older mxq")
        return None
    if tensors_digest(tensors) != meta[DIGEST_KEY]:
        _discard(path, f"tensors do not match {DIGEST_KEY}")
        return None
    return tensors
