"""Writing mxq's own layout (docs/export.md) from a tensor stream: shards with per-weight metadata,
index, tokenizer files and ``mxq_manifest.json`` (version, config, plan, SHA-256 of every file).

Shards are flushed as soon as they reach ``shard_bytes`` (a packed weight is never split across two
shards, so each shard's ``__metadata__`` describes exactly the packed weights it holds). Everything is
written inside ``AtomicFolder``: an interrupted export leaves no folder that looks like a checkpoint.

Shards are written by ``save_safetensors`` (safetensors README, "Format") rather than ``safetensors.torch.save_file``
for two reasons: the library stores ``__metadata__`` in a hash map whose order changes from run to run,
so identical exports would get different SHA-256s; and it copies every tensor into a bytes object
first, doubling the memory of a shard.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import torch

from .. import __version__
from ..formats import Packed
from ..io.export_hf import TOKENIZER_FILES, generation_config
from ..io.mxq_layout import LAYOUT_NAME, LAYOUT_VERSION, MANIFEST, hf_guard_config, meta_value, sha256
from ..io.writer import DEFAULT_SHARD_BYTES, AtomicFolder, write_unit_shards
from .plan import Plan, _jsonable

Item = tuple[str, "torch.Tensor | Packed"]


ST_DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
             torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
             torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file with tensors in the given order and sorted metadata: same input, same bytes."""
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    pos = 0
    for name, t in tensors.items():
        nb = t.numel() * t.element_size()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + nb]}
        pos += nb
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)                      # data starts 8-byte aligned, like the library
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _unit(name: str, obj) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata entries of one stream item."""
    if isinstance(obj, Packed):
        return {f"{name}.{k}": v.detach().cpu().contiguous() for k, v in obj.tensors.items()}, {name: meta_value(obj)}
    return {name: obj.detach().cpu().contiguous()}, {}


def write_units(folder: Path, items: Iterable[Item], shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict[str, str]:
    """Write shards + ``model.safetensors.index.json`` with mxq's deterministic safetensors writer and the layout
    version in every header; returns the weight map (tensor -> file)."""
    return write_unit_shards(folder, (_unit(name, obj) for name, obj in items), shard_bytes,
                             base_metadata={"format": "pt", "mxq_layout_version": str(LAYOUT_VERSION)},
                             save=save_safetensors)


def write_mxq(src, plan: Plan, items: Iterable[Item], out_dir: str | Path, manifest_plan: Plan | None = None,
              overwrite: bool = False, shard_bytes: int | None = None) -> Path:
    """Atomically write an mxq-layout folder holding ``items`` (from ``streams.mxq_stream(src, plan)``)."""
    cfg = replace(src.config, num_local_experts=plan.num_kept)
    cfg_d = cfg.to_hf_dict()
    with AtomicFolder(out_dir, overwrite) as tmp:
        weight_map = write_units(tmp, items, shard_bytes or DEFAULT_SHARD_BYTES)
        (tmp / "config.json").write_text(json.dumps(hf_guard_config(cfg_d), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(cfg), indent=2) + "\n")
        tok = Path(src.tokenizer_dir) if src.tokenizer_dir else None
        for f in TOKENIZER_FILES:
            if tok is not None and (tok / f).exists():
                shutil.copyfile(tok / f, tmp / f)
        files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256(tmp / f)}
                 for f in sorted(set(weight_map.values()))}
        manifest = {"format": LAYOUT_NAME, "format_version": LAYOUT_VERSION, "created_by": f"mxq {__version__}",
                    "config": cfg_d, "num_tensors": len(weight_map), "files": files,
                    "plan": (manifest_plan or plan).to_dict()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=_jsonable) + "\n")
    return Path(out_dir)
