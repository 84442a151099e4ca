"""Evaluate what the user receives: the exported checkpoint as read back from disk, not the model in memory.

A run applies its plan in memory and exports; everything it then measures (memory, speed, perplexity, KL,
lm-eval) must describe the exported folder. ``reload_exported`` loads that folder with the ordinary loader
(``mxq.load_model``, the path a user takes), runs both models on the same probe tokens and requires
bit-identical logits: quantized weights are stored as bytes and decoded the same way on both sides, so any
difference means the export lost or changed something, and the run stops with the largest difference named
instead of reporting numbers for a model nobody can load.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


class ExportMismatchError(RuntimeError):
    """The exported checkpoint, reloaded, does not compute what the in-memory model computes."""


def probe_ids(vocab_size: int, length: int = 48, seed: int = 0) -> Tensor:
    """[1, length] token ids spread over the vocabulary (every expert path gets some traffic)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, length), generator=g)


@torch.no_grad()
def compare_logits(a, b, ids: Tensor) -> float:
    """Largest absolute logit difference of two models on ``ids`` [B, T] (0.0 when identical)."""
    la = a(ids.to(a.device)).logits.float()           # [B, T, V]
    lb = b(ids.to(b.device)).logits.float()           # [B, T, V]
    if la.shape != lb.shape:
        raise ExportMismatchError(f"logits shape {tuple(lb.shape)} after reload, {tuple(la.shape)} in memory")
    return float((la - lb).abs().max())


def reload_exported(model, export_dir: Path, device: torch.device, dtype: torch.dtype):
    """The model loaded from ``export_dir``, after checking it matches ``model`` logit for logit."""
    from .. import load_model

    reloaded = load_model(export_dir, device=device, dtype=dtype)
    if reloaded.config.num_local_experts != model.config.num_local_experts:
        raise ExportMismatchError(f"{export_dir}: {reloaded.config.num_local_experts} experts per layer after "
                                  f"reload, {model.config.num_local_experts} in memory")
    diff = compare_logits(model, reloaded, probe_ids(model.config.vocab_size))
    if diff != 0.0:
        raise ExportMismatchError(f"{export_dir}: reloaded logits differ from the in-memory model's by up to "
                                  f"{diff:.3g}; the export does not hold the model that was planned")
    return reloaded
