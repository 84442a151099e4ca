"""Strict safetensors header validation before any tensor is read.

Container format: huggingface/safetensors README, "Format" (u64 header length, JSON header, data offsets
that tile the data block exactly).

The ``safetensors`` library reads the data; this module checks first, so that a truncated or corrupt
file fails with a message naming the file and the tensor instead of a half-loaded model.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded exactly; the message names the file and the tensor."""


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file, or a ``CheckpointError`` naming the file (missing, or not valid JSON)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one file's header: JSON, dtypes, sizes, offsets tiling the data exactly."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: corrupt safetensors header length {n} for a file of {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, h in header.items():
        try:
            dtype, shape, (a, b) = h["dtype"], tuple(int(s) for s in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {h!r}") from None
        if dtype not in DTYPE_SIZES:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        numel = 1
        for s in shape:
            numel *= s
        if b - a != numel * DTYPE_SIZES[dtype]:
            raise CheckpointError(f"{path}: tensor {name!r} spans {b - a} bytes but {dtype}{list(shape)} needs "
                                  f"{numel * DTYPE_SIZES[dtype]}")
        spans.append((a, b, name))
        infos[name] = TensorInfo(name, dtype, shape, path)
    spans.sort()
    pos = 0
    for a, b, name in spans:
        if a != pos:
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {a}, expected {pos} (gap or overlap)")
        pos = b
    if 8 + n + pos != size:
        what = "truncated" if 8 + n + pos > size else "has trailing bytes"
        raise CheckpointError(f"{path}: {what}: header promises {8 + n + pos} bytes, file has {size}"
                              + (f" (last tensor {spans[-1][2]!r} incomplete)" if spans and what == "truncated" else ""))
    return infos, meta


def scan_folder(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of every ``*.safetensors`` file in ``folder`` (not recursive), checked for duplicates.

    When ``model.safetensors.index.json`` exists its weight_map must agree with what the files hold.
    """
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files")
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        infos, _ = read_header(f)
        for name, info in infos.items():
            if name in tensors:
                raise CheckpointError(f"{f}: tensor {name!r} also stored in {tensors[name].file.name}")
            tensors[name] = info
    for idx_name in ("model.safetensors.index.json",):
        idx = folder / idx_name
        if idx.exists():
            try:
                wm = json.loads(idx.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{idx}: corrupt index ({e})") from None
            for name, fname in wm.items():
                if name not in tensors:
                    raise CheckpointError(f"{idx}: lists tensor {name!r} in {fname}, which no file holds")
                if tensors[name].file.name != fname:
                    raise CheckpointError(f"{idx}: tensor {name!r} listed in {fname} but found in "
                                          f"{tensors[name].file.name}")
            extra = sorted(set(tensors) - set(wm))
            if extra:
                raise CheckpointError(f"{idx}: does not list tensor {extra[0]!r} found in {tensors[extra[0]].file.name}")
    return tensors
