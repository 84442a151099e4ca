"""``validate``: a recipe checked against the model's config before any work is done.

Every option is checked and a ``PlanError`` names the option (``recipe.x.y``) before statistics are
collected, a weight is touched or a file is written. Which sections are checked depends on the planner's
registered ``uses`` (``mxq.plan.planners``), so options a planner would silently ignore are rejected.
"""
from __future__ import annotations

from typing import Any

from ..formats import FormatError, get_format, list_formats
from .merge_recipe import validate_merge
from .plan import DENSE_FORMATS, PlanError, expert_shapes, format_nbytes, kept_experts
from .planners import PLANNERS
from .recipe import CRITERIA, IMPORTANCE, KEEP, MIXED, SCOPES, SOLVERS, STATS_CRITERIA, recipe_dict
from .router_repair import validate_repair


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
    kept = kept_experts("recipe.prune.fraction", frac, config)
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


def _validate_export_formats(e: dict) -> None:
    """``export.formats``: engine forms written from the exported ``model/`` folder (``mxq.io.targets``)."""
    from ..io.targets import TARGETS
    from ..io.targets.gguf import GGUF_TYPE_NAMES

    formats = e.get("formats") or []
    if not isinstance(formats, list):
        _fail("export.formats", formats, f"must be a list of export targets ({', '.join(TARGETS)})")
    for f in formats:
        if f not in TARGETS:
            _fail("export.formats", f, f"unknown export target; choose from {', '.join(TARGETS)}")
    if formats and not e.get("enabled"):
        _fail("export.formats", formats, "are written from the exported model/ folder; set recipe.export.enabled=true")
    gt = e.get("gguf_type")
    if gt is not None and gt not in GGUF_TYPE_NAMES:
        _fail("export.gguf_type", gt, f"choose from {', '.join(GGUF_TYPE_NAMES)} (or null)")
    if gt is not None and "gguf" not in formats:
        _fail("export.gguf_type", gt, "is used only with gguf in recipe.export.formats")


def validate(recipe: Any, config) -> dict[str, Any]:
    """Check a recipe against a model config before any work; returns the normalised recipe dict.

    Raises ``PlanError`` with a message naming the option. A recipe without a planner is always valid.
    """
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
    from ..quant.options import validate_quant  # quant.method and quant.gptq.* (mxq.quant)

    validate_quant(r, uses)
    if not isinstance(r["export"].get("enabled"), bool):
        _fail("export.enabled", r["export"].get("enabled"), "must be true or false")
    _validate_export_formats(r["export"])
    return r
