"""Expert importance from router statistics, and the choice of experts to prune per layer.

Reads ``mxq.stats.RouterStats`` by field name only (``score(name)``, ``uncalibrated``, ``super_experts``),
so any object with those fields works. Scores: REAP (Lasby et al., arXiv 2510.13999), EAN
(the REAP paper's baseline), frequency and gate mass; higher always means more important.

Uncalibrated experts (no calibration token reached them) have no measured score. Documented choice:
for pruning they rank *below* every calibrated expert (pruned first: no evidence that they matter on the
calibration data), and every such decision is listed in the plan's notes so that it is never silent
(calibrated quantizers and exporters of other tools have silently mishandled experts no token reached,
e.g. ModelCloud/GPTQModel#2271). Super experts (Su et al., arXiv 2507.23279) are never pruned unless
``protect_super`` is false.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .plan import PlanError


def as_numpy(x: Any) -> np.ndarray:
    """A torch tensor, numpy array or nested list -> float64/bool numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = x.numpy() if x.dtype == torch.bool else x.double().numpy()
    return np.asarray(x)


def score_table(stats, name: str) -> np.ndarray:
    """[L, E] float64 score ``name`` with NaN where the expert is uncalibrated."""
    s = as_numpy(stats.score(name)).astype(np.float64).copy()
    unc = uncalibrated(stats)
    if s.shape != unc.shape:
        raise PlanError(f"router statistics: score {name!r} has shape {s.shape}, uncalibrated mask {unc.shape}")
    s[unc] = np.nan
    return s


def uncalibrated(stats) -> np.ndarray:
    return as_numpy(stats.uncalibrated).astype(bool)


def super_experts(stats) -> set[tuple[int, int]]:
    return {(int(l), int(e)) for l, e in (getattr(stats, "super_experts", None) or [])}


def check_stats(stats, config) -> None:
    """The statistics must describe this model (same layers and experts)."""
    shape = (config.num_hidden_layers, config.num_local_experts)
    got = (int(stats.num_layers), int(stats.num_experts))
    if got != shape:
        raise PlanError(f"router statistics are for {got[0]} layers x {got[1]} experts, the model has "
                        f"{shape[0]} x {shape[1]}")


def choose_pruned(config, stats, criterion: str, fraction_count: int, protect_super: bool, seed: int,
                  ) -> tuple[list[list[int]], list[str], dict[str, Any]]:
    """Per layer, the ``fraction_count`` least important experts (sorted ascending by index).

    Returns (pruned per layer, notes, info). Ties are broken by expert index (lower index pruned first),
    so a plan is a deterministic function of the statistics; ``random`` uses ``numpy`` seeded by ``seed``.
    """
    L, E = config.num_hidden_layers, config.num_local_experts
    notes: list[str] = []
    info: dict[str, Any] = {"criterion": criterion, "pruned_per_layer": fraction_count}
    if stats is not None:
        check_stats(stats, config)
    supers = super_experts(stats) if (stats is not None and protect_super) else set()
    if criterion == "random":
        rng = np.random.default_rng(seed)
        table = np.stack([rng.permutation(E).astype(np.float64) for _ in range(L)])   # random ranks
        unc = np.zeros((L, E), dtype=bool)
        info["seed"] = seed
    else:
        if stats is None:
            raise PlanError(f"recipe.prune.criterion={criterion!r} needs router statistics, but none were collected "
                            "(set recipe.stats=true)")
        table = score_table(stats, criterion)
        unc = uncalibrated(stats)
        info["scores"] = [[None if np.isnan(v) else float(v) for v in row] for row in table]
    if stats is None:
        notes.append("no router statistics: super experts unknown, none protected")
    pruned: list[list[int]] = []
    for i in range(L):
        cand = [e for e in range(E) if (i, e) not in supers]
        if len(cand) < fraction_count:
            raise PlanError(f"layer {i}: {E - len(cand)} protected super experts leave {len(cand)} candidates, "
                            f"cannot prune {fraction_count}; set recipe.prune.protect_super=false or lower "
                            "recipe.prune.fraction")
        key = np.where(unc[i], -np.inf, table[i])                                   # uncalibrated first
        order = sorted(cand, key=lambda e: (key[e], e))
        drop = sorted(order[:fraction_count])
        pruned.append(drop)
        for e in range(E):
            if unc[i, e]:
                fate = "pruned" if e in drop else "kept (more uncalibrated experts than the prune count)"
                notes.append(f"layer {i} expert {e}: uncalibrated (no calibration token), ranked least important, "
                             f"{fate}")
    protected = sorted(supers)
    if protected:
        notes.append(f"super experts protected from pruning: {protected}")
        info["protected_super"] = [list(x) for x in protected]
    elif stats is not None and not protect_super and super_experts(stats):
        notes.append(f"protect_super=false: super experts {sorted(super_experts(stats))} may be pruned")
    info["pruned"] = pruned
    return pruned, notes, info


def importance_table(stats, config, name: str, kept: list[list[int]], scope: str) -> tuple[np.ndarray, list[str]]:
    """[L, E] importance for mixed precision (Huang et al., arXiv 2410.06270, weigh error by importance).

    ``uniform`` = all ones. Uncalibrated experts get the smallest calibrated importance of their layer
    (not 0, which would make their error free; noted). With ``scope == "model"`` one budget is shared by
    all layers, so each layer's importance is divided by its mean over kept experts: layers then compete
    on quantization error, not on the raw scale of a score that differs from layer to layer.
    """
    L, E = config.num_hidden_layers, config.num_local_experts
    notes: list[str] = []
    if name == "uniform":
        return np.ones((L, E)), notes
    if stats is None:
        raise PlanError(f"recipe.mixed.importance={name!r} needs router statistics, but none were collected "
                        "(set recipe.stats=true or importance=uniform)")
    check_stats(stats, config)
    t = score_table(stats, name)
    out = np.ones((L, E))
    for i in range(L):
        row = t[i, kept[i]]
        cal = row[~np.isnan(row)]
        fill = float(cal.min()) if cal.size else 1.0
        for e in kept[i]:
            if np.isnan(t[i, e]):
                notes.append(f"layer {i} expert {e}: uncalibrated, importance set to the layer minimum {fill:.6g}")
        row = np.where(np.isnan(row), fill, row).clip(min=0.0)
        if scope == "model":
            m = row.mean()
            row = row / m if m > 0 else np.ones_like(row)
        out[i, kept[i]] = row
    return out, notes
