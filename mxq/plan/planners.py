"""Planners: recipe + router statistics + model -> ``Plan`` (deciding only; nothing is modified).

Registered with ``@register_planner(name, uses=...)``; ``uses`` names the recipe sections a planner reads
so that ``mxq.plan.validate`` checks exactly those (and rejects options a planner would silently ignore).

* ``uniform``: every expert in ``quant.format`` ("keep" = each expert's current format).
* ``prune``: drop ``floor(fraction * E)`` experts in every layer by ``prune.criterion`` (mxq.plan.scores), the
  same count per layer because a checkpoint has one global ``num_local_experts``; kept experts keep
  their format and bytes.
* ``mixed``: one format per expert from ``mixed.menu`` under a budget, minimising importance x measured
  relative quantization error (Mixture Compressor, Huang et al., arXiv 2410.06270), solved exactly by
  MILP or greedily (``mixed.solver``).
* ``prune_then_quant``: ``prune``, then ``quant.format`` (a format, or ``mixed``) on the kept experts.
* ``merge``: merge ``floor(merge.fraction * E)`` experts per layer into others (``mxq.plan.merge_plan``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..formats import get_format
from ..formats.convert import relative_errors
from .allocate import SOLVERS
from .apply import source_formats
from .merge_plan import plan_merge as _plan_merge
from .plan import PRUNE, Plan, PlanError, expert_shapes, removed_count
from .recipe import KEEP, MIXED
from .scores import choose_pruned, importance_table


@dataclass(frozen=True)
class Planner:
    name: str
    fn: Callable[[dict, Any, Any], Plan]
    uses: tuple[str, ...]


PLANNERS: dict[str, Planner] = {}


def register_planner(name: str, uses: tuple[str, ...] = ()) -> Callable:
    def deco(fn: Callable[[dict, Any, Any], Plan]) -> Callable[[dict, Any, Any], Plan]:
        if name in PLANNERS:
            raise PlanError(f"planner {name!r} is registered twice")
        PLANNERS[name] = Planner(name, fn, tuple(uses))
        return fn

    return deco


def _new_plan(recipe: dict, experts: list[list[str]]) -> Plan:
    q = recipe["quant"]
    return Plan(experts, q["attention"], q["lm_head"], recipe.get("planner") or "", recipe)


def _uniform_rows(model, fmt: str, pruned: list[list[int]] | None = None) -> list[list[str]]:
    rows = []
    for i, src in enumerate(source_formats(model)):
        drop = set(pruned[i]) if pruned else set()
        rows.append([PRUNE if e in drop else (s if fmt in (KEEP, None) else fmt) for e, s in enumerate(src)])
    return rows


@register_planner("uniform", uses=("quant",))
def plan_uniform(recipe: dict, stats, model) -> Plan:
    return _new_plan(recipe, _uniform_rows(model, recipe["quant"]["format"]))


def _prune(recipe: dict, stats, model) -> tuple[list[list[int]], list[str], dict]:
    p, cfg = recipe["prune"], model.config
    n = removed_count(p["fraction"], cfg.num_local_experts)
    return choose_pruned(cfg, stats, p["criterion"], n, p["protect_super"], p["seed"])


@register_planner("prune", uses=("prune",))
def plan_prune(recipe: dict, stats, model) -> Plan:
    pruned, notes, info = _prune(recipe, stats, model)
    plan = _new_plan(recipe, _uniform_rows(model, KEEP, pruned))
    plan.notes, plan.info = notes, {"prune": info}
    return plan


def measure_errors(model, kept: list[list[int]], menu: list[str]) -> dict[tuple[int, int], list[float]]:
    """Relative quantization error of each menu format on each kept expert (actually quantized)."""
    out = {}
    for i, layer in enumerate(model.layers):
        ex = layer.mlp.experts
        for e in kept[i]:
            ps = [ex.packed(k, e) for k in ex.KINDS]
            ws = [get_format(p.format).dequantize(p, torch.float32) for p in ps]      # [2I, H], [H, I]
            out[(i, e)] = relative_errors(ws, ps[0].format, menu)
    return out


def _mixed(recipe: dict, stats, model, base: Plan) -> Plan:
    """Fill the kept experts of ``base`` with menu formats under the budget (see module docstring)."""
    m, cfg = recipe["mixed"], model.config
    menu = list(m["menu"])
    kept = [base.kept(i) for i in range(base.num_layers)]
    shapes = expert_shapes(cfg)
    per_expert = np.array([sum(get_format(f).nbytes(s) for s in shapes.values()) for f in menu], np.float64)
    n_w = sum(a * b for a, b in shapes.values())
    imp, notes = importance_table(stats, cfg, m["importance"], kept, m["scope"])
    errs = measure_errors(model, kept, menu)
    idx = [(i, e) for i in range(len(kept)) for e in kept[i]]
    err = np.array([errs[j] for j in idx])                                  # [J, F]
    weight = np.array([imp[i, e] for i, e in idx])[:, None] * err           # [J, F]
    cost = np.broadcast_to(per_expert, err.shape)
    if m["scope"] == "layer":
        groups = np.array([i for i, _ in idx])
        sizes = np.array([len(k) for k in kept], np.float64)
    else:
        groups = np.zeros(len(idx), np.int64)
        sizes = np.array([float(len(idx))])
    if m["budget_bits"] is not None:
        budgets = sizes * n_w * float(m["budget_bits"]) / 8.0
    else:
        budgets = float(m["budget_bytes"]) * sizes / sizes.sum()
    alloc = SOLVERS[m["solver"]](cost, weight, groups, budgets)
    rows = [list(r) for r in base.experts]
    for (i, e), c in zip(idx, alloc.choice):
        rows[i][e] = menu[int(c)]
    plan = _new_plan(recipe, rows)
    plan.notes = list(base.notes) + notes
    plan.info = dict(base.info)
    plan.info["mixed"] = {
        "menu": menu, "solver": alloc.solver, "status": alloc.status, "objective": alloc.objective,
        "scope": m["scope"], "budget_bytes": [float(b) for b in budgets], "used_bytes": alloc.group_bytes.tolist(),
        "importance": m["importance"], "bytes_per_expert": dict(zip(menu, per_expert.astype(int).tolist())),
        "errors": {f"{i}.{e}": dict(zip(menu, errs[(i, e)])) for i, e in idx},
    }
    return plan


@register_planner("mixed", uses=("mixed",))
def plan_mixed(recipe: dict, stats, model) -> Plan:
    return _mixed(recipe, stats, model, _new_plan(recipe, _uniform_rows(model, KEEP)))


@register_planner("prune_then_quant", uses=("prune", "quant", "mixed"))
def plan_prune_then_quant(recipe: dict, stats, model) -> Plan:
    base = plan_prune(recipe, stats, model)
    fmt = recipe["quant"]["format"]
    if fmt == MIXED:
        return _mixed(recipe, stats, model, base)
    pruned = [[e for e, f in enumerate(r) if f == PRUNE] for r in base.experts]
    plan = _new_plan(recipe, _uniform_rows(model, fmt, pruned))
    plan.notes, plan.info = base.notes, base.info
    return plan


@register_planner("merge", uses=("merge",))
def plan_merge(recipe: dict, stats, model) -> Plan:
    return _plan_merge(recipe, stats, model, _new_plan)
