"""Content hashes for the statistics cache: the model's bytes and the calibration set.

Why content and not the path: a sweep of recipes over one model must compute the router statistics
once, and a checkpoint rewritten in place (or a changed calibration file) must not reuse stale ones.
Hashing the 13 GB of gpt-oss-20b takes seconds with xxhash (XXH3-128, not cryptographic: this guards
against accidents, not adversaries), and each file's digest is memoised in a small JSON keyed by
(path, size, mtime), so repeated runs only ``stat`` the files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import xxhash

from ..atomic import write_atomic
from ..cache_entry import file_digest


def default_cache_dir() -> Path:
    return Path(os.environ.get("MXQ_CACHE", Path.home() / ".cache" / "mxq")).expanduser()


def model_hash(folder: str | Path, memo: str | Path | None = None) -> str:
    """XXH3-128 over every ``*.safetensors`` and ``config.json`` in ``folder`` (names and bytes, sorted)."""
    folder = Path(folder).resolve()
    files = sorted([*folder.glob("*.safetensors"), *folder.glob("config.json")])
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors or config.json to hash")
    memo_path = Path(memo) if memo is not None else default_cache_dir() / "model_hashes.json"
    try:
        table = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        table = {}
    h, changed = xxhash.xxh3_128(), False
    for f in files:
        st = f.stat()
        key = f"{f}|{st.st_size}|{st.st_mtime_ns}"
        if key not in table:
            table[key], changed = file_digest(f), True
        h.update(f"{f.name}:{table[key]}\n".encode())
    if changed:
        try:
            write_atomic(memo_path, json.dumps(table, indent=1, sort_keys=True))
        except OSError:
            pass  # a read-only cache only costs re-hashing next time
    return h.hexdigest()


def state_hash(model: torch.nn.Module) -> str:
    """Hash of the in-memory parameters and buffers, for a model that has no source folder."""
    h = xxhash.xxh3_128()
    for name, t in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def stats_key(model_digest: str, calib_digest: str, dtype: torch.dtype, device: torch.device, version: int,
              attention: str = "eager") -> str:
    """Cache key: same model bytes, same tokens, same numerics (bf16 on GPU differs from fp32 on CPU, and
    SDPA attention rounds differently from the eager one). ``attention`` enters the key only when it is
    not "eager", so entries written before it existed (all eager) keep their keys."""
    h = xxhash.xxh3_128()
    parts = [model_digest, calib_digest, str(dtype), device.type, version]
    h.update(json.dumps(parts if attention == "eager" else [*parts, attention]).encode())
    return h.hexdigest()
