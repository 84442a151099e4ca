"""Atomic, streaming checkpoint writer for the exact HF gpt-oss layout: ``config.json``,
``generation_config.json``, safetensors shards and ``model.safetensors.index.json`` as on the Hub.

Tensors arrive from an iterator and are flushed shard by shard, so at most one shard is in memory. Files
are written into a hidden temporary folder beside the target, which is renamed into place only when
everything (shards, index, config, tokenizer) is complete: an interrupted write leaves no folder that
looks like a checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ..atomic import finish_dir, partial_name, remove_stale_partials, save_safetensors_atomic
from .owned import check_replaceable

DEFAULT_SHARD_BYTES = 2 * 1024**3
MXFP4_QUANT_CONFIG = {
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    "quant_method": "mxfp4",
}


class AtomicFolder:
    """``with AtomicFolder(out) as tmp:`` write into ``tmp``; renamed to ``out`` only on success.

    ``overwrite`` replaces only a folder that ``mxq.io.owned.check_replaceable`` accepts (a checkpoint made of
    files mxq writes), never anything else. Staging folders left by killed writers are removed on entry.
    """

    def __init__(self, out_dir: str | Path, overwrite: bool = False):
        self.out = Path(out_dir)
        self.overwrite = overwrite
        self.tmp = partial_name(self.out)

    def __enter__(self) -> Path:
        if self.out.exists() and not self.overwrite:
            raise FileExistsError(f"{self.out}: already exists (pass overwrite=True to replace it)")
        if self.overwrite:
            check_replaceable(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.out)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        finish_dir(self.tmp, self.out, replace=self.overwrite)


Unit = tuple[dict[str, torch.Tensor], dict[str, str]]
SaveFn = Callable[[Path, dict[str, torch.Tensor], dict[str, str]], None]


def _save_with_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_safetensors_atomic(path, tensors, metadata)


def write_unit_shards(folder: Path, units: Iterable[Unit], shard_bytes: int = DEFAULT_SHARD_BYTES,
                      prefix: str = "model", base_metadata: dict[str, str] | None = None,
                      save: SaveFn = _save_with_safetensors) -> dict[str, str]:
    """Write sharded safetensors + ``{prefix}.safetensors.index.json``; returns the weight map.

    ``units`` are (tensors, metadata) groups that stay in one shard (a packed expert's named tensors); a shard's
    header metadata is ``base_metadata`` plus its units' entries. Shards are named like transformers'
    ``save_pretrained`` (``model-00001-of-00003.safetensors``, or ``model.safetensors`` when one shard
    suffices); loaders use the index, not the names. Each shard is written to a temporary name and
    renamed once all are complete.
    """
    shards: list[list[str]] = []
    buf: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    size = total = 0
    seen: set[str] = set()

    def flush() -> None:
        nonlocal buf, meta, size
        if buf:
            save(folder / f".shard-{len(shards)}.tmp", buf, {**(base_metadata or {"format": "pt"}), **meta})
            shards.append(list(buf))
            buf, meta, size = {}, {}, 0

    for tensors, md in units:
        nb = sum(t.numel() * t.element_size() for t in tensors.values())
        if buf and size + nb > shard_bytes:
            flush()
        for k, t in tensors.items():
            if k in seen:
                raise ValueError(f"tensor {k!r} written twice")
            seen.add(k)
            buf[k] = t
        meta.update(md)
        size += nb
        total += nb
    flush()
    n = len(shards)
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards):
        fname = f"{prefix}.safetensors" if n == 1 else f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
        os.rename(folder / f".shard-{i}.tmp", folder / fname)
        weight_map.update({k: fname for k in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def write_shards(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], shard_bytes: int = DEFAULT_SHARD_BYTES,
                 prefix: str = "model") -> dict[str, str]:
    """Plain tensors, one unit each, through ``write_unit_shards`` (header metadata ``{"format": "pt"}``)."""
    units = (({name: t.detach().to("cpu").contiguous()}, {}) for name, t in tensors)
    return write_unit_shards(folder, units, shard_bytes, prefix)


def write_checkpoint(out_dir: str | Path, config: dict, tensors: Iterable[tuple[str, torch.Tensor]],
                     extra_files: dict[str, bytes | str | Path] | None = None,
                     generation_config: dict | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                     overwrite: bool = False, subdir_files: dict[str, Iterator] | None = None) -> Path:
    """Atomically write config.json, generation_config.json, shards + index and ``extra_files``."""
    with AtomicFolder(out_dir, overwrite) as tmp:
        write_shards(tmp, tensors, shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if generation_config is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
        for name, content in (extra_files or {}).items():
            dst = tmp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copyfile(content, dst)
            elif isinstance(content, bytes):
                dst.write_bytes(content)
            else:
                dst.write_text(content)
        for sub, fn in (subdir_files or {}).items():
            (tmp / sub).mkdir(parents=True, exist_ok=True)
            fn(tmp / sub)
    return Path(out_dir)
