"""The merge planner, the deciding half of expert merging: recipe + statistics + model -> merge plan.

Per layer, ``floor(fraction * E)`` experts are merged away: the candidates (every expert but the super
experts, which stay alone and unchanged when ``protect_super``; Su et al., arXiv 2507.23279) are split
into ``K - supers`` groups by ``recipe.merge.grouping`` (``merge_groups``); each group keeps its anchor
(first member) and prunes the rest, and records the members' merge weights (``recipe.merge.weighting``)
and router weights (their mean routing probabilities on calibration text, for ``merge.router``):

* ``frequency``: tokens routed to each member (M-SMoE, Li et al., arXiv 2310.01334);
* ``saliency``: each member's total REAP saliency, sum over routed tokens of g_e(x) ||f_e(x)||
  (REAM-style; Lasby et al., arXiv 2510.13999);
* ``uniform``: plain average.
A member no calibration token reached has weight 0 under ``frequency``/``saliency`` (it contributes
nothing; noted); a group of such members only is averaged uniformly.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..formats import get_format
from .merge_groups import GROUPINGS, LayerData
from .plan import PRUNE, Plan, PlanError, removed_count
from .scores import as_numpy, check_stats, super_experts, uncalibrated


def weight_distances(ex) -> np.ndarray:
    """[E, E] Euclidean distances of the experts' flattened dequantized weights (gate_up and down)."""
    E = ex.num_experts
    gram = torch.zeros(E, E, dtype=torch.float64)
    for kind in ex.KINDS:
        w = torch.stack([get_format(p.format).dequantize(p, torch.float32).flatten().cpu()
                         for p in (ex.packed(kind, e) for e in range(E))])                 # [E, n]
        gram += (w @ w.t()).double()
    d = gram.diagonal()
    return (d[:, None] + d[None, :] - 2 * gram).clamp(min=0).sqrt().numpy()


def _distances(m: torch.Tensor) -> np.ndarray:
    """[E, E] Euclidean distances between the rows of m [E, H]."""
    return torch.cdist(m.double(), m.double()).numpy()


def layer_data(i: int, stats, model) -> LayerData:
    E = model.config.num_local_experts
    outs = getattr(stats, "expert_outputs", None) if stats is not None else None
    freq = as_numpy(stats.freq)[i] if stats is not None else np.zeros(E)
    sal = np.nan_to_num(as_numpy(stats.reap)[i]) if stats is not None else np.zeros(E)
    ex = model.layers[i].mlp.experts
    return LayerData(
        layer=i, freq=freq, saliency=sal,
        output_dist=None if outs is None else (lambda: _distances(outs.mean_out[i])),
        logit_dist=None if outs is None else (lambda: outs.logit_distances(i).numpy()),
        logit_cos=None if outs is None else (lambda: outs.logit_cosine(i).numpy()),
        weight_dist=lambda: weight_distances(ex))


def member_weights(weighting: str, stats, i: int, members: list[int]) -> list[float]:
    if weighting == "uniform":
        return [1.0] * len(members)
    freq = as_numpy(stats.freq)[i]
    if weighting == "frequency":
        return [float(freq[e]) for e in members]
    reap = np.nan_to_num(as_numpy(stats.reap)[i])
    return [float(reap[e] * freq[e]) for e in members]                         # sum of g * ||f|| over tokens


def plan_merge(recipe: dict, stats, model, new_plan: Callable[[dict, list[list[str]]], Plan]) -> Plan:
    """The merge plan of a validated recipe (see the module docstring)."""
    m, cfg = recipe["merge"], model.config
    L, E = cfg.num_hidden_layers, cfg.num_local_experts
    K = E - removed_count(m["fraction"], E)
    if stats is not None:
        check_stats(stats, cfg)
    supers = super_experts(stats) if (stats is not None and m["protect_super"]) else set()
    unc = uncalibrated(stats) if stats is not None else np.zeros((L, E), bool)
    route = as_numpy(stats.route_prob) if stats is not None else np.ones((L, E))
    notes: list[str] = []
    rows, groups_all = [], []
    for i in range(L):
        keep_alone = sorted(e for e in range(E) if (i, e) in supers)
        cand = [e for e in range(E) if (i, e) not in supers]
        n = K - len(keep_alone)
        if n < 1:
            raise PlanError(f"layer {i}: {len(keep_alone)} protected super experts leave no group for the other "
                            f"{len(cand)} experts among {K} kept; set recipe.merge.protect_super=false or lower "
                            "recipe.merge.fraction")
        groups = [[e] for e in keep_alone] + GROUPINGS[m["grouping"]](layer_data(i, stats, model), cand, n)
        groups.sort(key=lambda g: g[0])
        src = model.layers[i].mlp.experts.formats()
        row = [PRUNE] * E
        layer_groups = []
        for g in groups:
            row[g[0]] = src[g[0]]
            w = member_weights(m["weighting"], stats, i, g)
            if len(g) > 1 and m["weighting"] != "uniform":
                for e in g:
                    if unc[i, e]:
                        notes.append(f"layer {i} expert {e}: uncalibrated (no calibration token), weight 0 in "
                                     f"its group {g}" + (" (all members uncalibrated: averaged uniformly)"
                                                         if all(unc[i, x] for x in g) else ""))
            layer_groups.append({"members": [int(e) for e in g], "weights": w,
                                 "router_weights": [float(route[i, e]) for e in g]})
        rows.append(row)
        groups_all.append(layer_groups)
    plan = new_plan(recipe, rows)
    plan.merge = {"align": m["align"], "router": m["router"], "groups": groups_all}
    if supers:
        notes.append(f"super experts kept alone and unchanged: {sorted(supers)}")
    plan.notes = notes
    plan.info = {"merge": {"grouping": m["grouping"], "weighting": m["weighting"], "router": m["router"],
                           "align": m["align"], "merged_per_layer": E - K,
                           "group_sizes": [sorted((len(g["members"]) for g in lg), reverse=True)
                                           for lg in groups_all],
                           "protected_super": [list(x) for x in sorted(supers)]}}
    return plan
