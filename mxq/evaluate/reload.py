"""Evaluate what the user receives: the exported checkpoint as read back from disk, not the model in memory.

A run applies its plan in memory and exports; everything it then measures (memory, speed, perplexity, KL,
lm-eval) must describe the exported folder. ``reload_exported`` loads that folder with the ordinary loader
(``mxq.load_model``, the path a user takes), runs both models on the same probe tokens and requires
bit-identical logits: quantized weights are stored as bytes and decoded the same way on both sides, so any
difference means the export lost or changed something, and the run stops with the largest difference named
instead of reporting numbers for a model nobody can load.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


class ExportMismatchError(RuntimeError):
    """The exported checkpoint, reloaded, does not compute what the in-memory model computes."""


def probe_ids(vocab_size: int, length: int = 48, seed: int = 0) -> Tensor:
    """[1, length] token ids spread over the vocabulary (every expert path gets some traffic)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, length), generator=g)


@dataclass(frozen=True)
class Fingerprint:
    """What the reloaded model must reproduce: the in-memory model's logits on ``ids`` and its expert count.
    Taken before the in-memory model is dropped, so the two models never occupy memory at the same time."""
    ids: Tensor                   # [1, T] probe tokens
    logits: Tensor                # [1, T, V] float32, on the CPU
    num_local_experts: int


@torch.no_grad()
def fingerprint(model) -> Fingerprint:
    ids = probe_ids(model.config.vocab_size)
    logits = model(ids.to(model.device)).logits.float().cpu()                     # [1, T, V]
    return Fingerprint(ids, logits, model.config.num_local_experts)


@torch.no_grad()
def reload_checked(export_dir: Path, expected: Fingerprint, device: torch.device, dtype: torch.dtype):
    """The model loaded from ``export_dir``, after checking it reproduces ``expected`` logit for logit."""
    from .. import load_model

    reloaded = load_model(export_dir, device=device, dtype=dtype)
    if reloaded.config.num_local_experts != expected.num_local_experts:
        raise ExportMismatchError(f"{export_dir}: {reloaded.config.num_local_experts} experts per layer after "
                                  f"reload, {expected.num_local_experts} in memory")
    got = reloaded(expected.ids.to(reloaded.device)).logits.float().cpu()         # [1, T, V]
    if got.shape != expected.logits.shape:
        raise ExportMismatchError(f"{export_dir}: logits shape {tuple(got.shape)} after reload, "
                                  f"{tuple(expected.logits.shape)} in memory")
    diff = float((got - expected.logits).abs().max())
    if diff != 0.0:
        raise ExportMismatchError(f"{export_dir}: reloaded logits differ from the in-memory model's by up to "
                                  f"{diff:.3g}; the export does not hold the model that was planned")
    return reloaded


def reload_exported(model, export_dir: Path, device: torch.device, dtype: torch.dtype):
    """The model loaded from ``export_dir``, after checking it matches ``model`` logit for logit."""
    return reload_checked(export_dir, fingerprint(model), device, dtype)
