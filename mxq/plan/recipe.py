"""Recipe options of the planners, their defaults, and ``validate`` (run before any work is done).

A recipe (``recipes/recipe/*.yaml``) only lists its differences from ``_base.yaml``; ``recipe_dict`` fills
in the same defaults for a recipe given as a plain dict or a Hydra ``DictConfig``. ``validate`` checks
every option against the model's config and raises ``PlanError`` naming the option (``recipe.x.y``)
before statistics are collected, a weight is touched or a file is written.
"""
from __future__ import annotations

import copy
from typing import Any

from ..formats import FormatError, get_format, list_formats
from .merge_recipe import MERGE_DEFAULTS, validate_merge
from .router_repair import REPAIR_DEFAULTS, validate_repair
from .plan import DENSE_FORMATS, PlanError, expert_shapes, format_nbytes

STATS_CRITERIA = ("reap", "frequency", "gate_mass", "ean")      # scores of mxq.stats.RouterStats
CRITERIA = STATS_CRITERIA + ("random",)
IMPORTANCE = STATS_CRITERIA + ("uniform",)
SOLVERS = ("milp", "greedy")
SCOPES = ("layer", "model")
KEEP, MIXED = "keep", "mixed"

DEFAULTS: dict[str, Any] = {
    "name": None, "stats": False, "planner": None,
    "prune": {"fraction": 0.0, "criterion": "reap", "protect_super": True, "seed": 0},
    "quant": {"format": KEEP, "attention": "bf16", "lm_head": "bf16"},
    "mixed": {"menu": ["fp8", "mxfp4", "nvfp4", "int4_g128", "nf4_dq"], "budget_bits": None, "budget_bytes": None,
              "importance": "reap", "solver": "milp", "scope": "layer"},
    "merge": MERGE_DEFAULTS,
    "repair": REPAIR_DEFAULTS,
    "export": {"enabled": False},
}


def recipe_dict(recipe: Any) -> dict[str, Any]:
    """A plain dict of the recipe with every default filled in (accepts dict or OmegaConf DictConfig)."""
    if recipe is None:
        recipe = {}
    if not isinstance(recipe, dict):
        from omegaconf import OmegaConf

        recipe = OmegaConf.to_container(recipe, resolve=True)
    out = copy.deepcopy(DEFAULTS)
    for k, v in recipe.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = copy.deepcopy(v)
    return out


def pruned_count(fraction: float, num_experts: int) -> int:
    """Experts dropped per layer: floor(fraction * E) (the same count in every layer, methods.md)."""
    return int(fraction * num_experts + 1e-9)


def _fail(option: str, value: Any, why: str) -> None:
    raise PlanError(f"recipe.{option}={value!r}: {why}")


def _check_format(option: str, fmt: Any, config, allowed: tuple[str, ...] = ()) -> None:
    if fmt in allowed:
        return
    if not isinstance(fmt, str) or fmt not in list_formats():
        extra = f"{', '.join(allowed)}, " if allowed else ""
        _fail(option, fmt, f"not a registered format; choose from {extra}{', '.join(list_formats())}")
    for kind, shape in expert_shapes(config).items():
        try:
            get_format(fmt).nbytes(shape)
        except FormatError as e:
            _fail(option, fmt, f"cannot hold this model's expert {kind} weights {list(shape)} ({e})")


def _needs_stats(r: dict, option: str, name: str) -> None:
    if not r.get("stats"):
        _fail(option, name, "needs router statistics; set recipe.stats=true (or use a score that needs none)")


def _validate_prune(r: dict, config) -> int:
    p = r["prune"]
    frac = p["fraction"]
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac < 1.0:
        _fail("prune.fraction", frac, "must be a number in [0, 1)")
    E, k = config.num_local_experts, config.num_experts_per_tok
    kept = E - pruned_count(frac, E)
    if kept < k:
        _fail("prune.fraction", frac, f"keeps {kept} of {E} experts per layer, fewer than num_experts_per_tok={k} "
              "(top-k must not exceed the experts kept)")
    if p["criterion"] not in CRITERIA:
        _fail("prune.criterion", p["criterion"], f"unknown criterion; choose from {', '.join(CRITERIA)}")
    if p["criterion"] in STATS_CRITERIA:
        _needs_stats(r, "prune.criterion", p["criterion"])
    if not isinstance(p["protect_super"], bool):
        _fail("prune.protect_super", p["protect_super"], "must be true or false")
    if isinstance(p["seed"], bool) or not isinstance(p["seed"], int):
        _fail("prune.seed", p["seed"], "must be an integer")
    return kept


def _validate_mixed(r: dict, config, kept: int) -> None:
    m = r["mixed"]
    menu = m["menu"]
    if not isinstance(menu, list) or not menu:
        _fail("mixed.menu", menu, "must be a non-empty list of formats")
    for f in menu:
        _check_format("mixed.menu", f, config)
    if m["importance"] not in IMPORTANCE:
        _fail("mixed.importance", m["importance"], f"unknown importance; choose from {', '.join(IMPORTANCE)}")
    if m["importance"] in STATS_CRITERIA:
        _needs_stats(r, "mixed.importance", m["importance"])
    if m["solver"] not in SOLVERS:
        _fail("mixed.solver", m["solver"], f"unknown solver; choose from {', '.join(SOLVERS)}")
    if m["scope"] not in SCOPES:
        _fail("mixed.scope", m["scope"], f"unknown scope; choose from {', '.join(SCOPES)}")
    bits, nbytes = m["budget_bits"], m["budget_bytes"]
    if (bits is None) == (nbytes is None):
        _fail("mixed.budget_bits", bits, "set exactly one of recipe.mixed.budget_bits and recipe.mixed.budget_bytes")
    shapes = expert_shapes(config)
    weights = sum(a * b for a, b in shapes.values())                       # per expert
    cost = {f: sum(format_nbytes(f, s, "recipe.mixed.menu") for s in shapes.values()) for f in menu}
    cheapest = min(cost, key=cost.get)
    n_experts = config.num_hidden_layers * kept
    if bits is not None:
        if isinstance(bits, bool) or not isinstance(bits, (int, float)) or bits <= 0:
            _fail("mixed.budget_bits", bits, "must be a positive number of bits per expert weight")
        need = 8.0 * cost[cheapest] / weights
        if bits + 1e-12 < need:
            _fail("mixed.budget_bits", bits, f"is below the cheapest menu choice ({cheapest}: {need:.4f} bits per "
                  "expert weight); raise the budget or add a cheaper format to recipe.mixed.menu")
    else:
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            _fail("mixed.budget_bytes", nbytes, "must be a positive integer (bytes of the kept experts' weights)")
        need = cost[cheapest] * n_experts
        if nbytes < need:
            _fail("mixed.budget_bytes", nbytes, f"is below the cheapest menu choice ({cheapest}: {need} bytes for "
                  f"{n_experts} experts); raise the budget or add a cheaper format to recipe.mixed.menu")


def validate(recipe: Any, config) -> dict[str, Any]:
    """Check a recipe against a model config before any work; returns the normalised recipe dict.

    Raises ``PlanError`` with a message naming the option. A recipe without a planner is always valid.
    """
    from .planners import PLANNERS

    r = recipe_dict(recipe)
    validate_repair(r)
    name = r.get("planner")
    if not name:
        return r
    if name not in PLANNERS:
        _fail("planner", name, f"unknown planner; choose from {', '.join(sorted(PLANNERS))} (or null)")
    uses = PLANNERS[name].uses
    kept = config.num_local_experts
    if "prune" in uses:
        kept = _validate_prune(r, config)
    elif r["prune"]["fraction"] not in (0, 0.0, None):
        _fail("prune.fraction", r["prune"]["fraction"], f"planner={name} does not prune; use planner=prune "
              "or prune_then_quant")
    if "merge" in uses:
        kept = validate_merge(r, config)
    elif r["merge"]["fraction"] not in (0, 0.0, None):
        _fail("merge.fraction", r["merge"]["fraction"], f"planner={name} does not merge; use planner=merge")
    q = r["quant"]
    for part in ("attention", "lm_head"):
        if q[part] not in DENSE_FORMATS:
            _fail(f"quant.{part}", q[part], f"allowed formats are {', '.join(DENSE_FORMATS)}")
    fmt = q["format"]
    if "quant" in uses:
        allowed = (KEEP, MIXED) if "mixed" in uses else (KEEP,)
        _check_format("quant.format", fmt, config, allowed)
        if fmt == MIXED:
            _validate_mixed(r, config, kept)
    elif fmt not in (KEEP, None):
        why = (f"planner={name} keeps the source format of the experts it keeps; use planner=prune_then_quant "
               "to prune and quantize") if "prune" in uses else f"planner={name} chooses the expert formats itself"
        _fail("quant.format", fmt, why)
    if "mixed" in uses and "quant" not in uses:
        _validate_mixed(r, config, kept)
    mixed_used = "mixed" in uses and ("quant" not in uses or fmt == MIXED)
    for opt in ("budget_bits", "budget_bytes"):
        if not mixed_used and r["mixed"][opt] is not None:
            _fail(f"mixed.{opt}", r["mixed"][opt], f"is not used: planner={name} with quant.format={fmt} does not "
                  "choose formats per expert (use planner=mixed, or prune_then_quant with quant.format=mixed)")
    if not isinstance(r["export"].get("enabled"), bool):
        _fail("export.enabled", r["export"].get("enabled"), "must be true or false")
    return r
