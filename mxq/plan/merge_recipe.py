"""Recipe options of the merge planner (``recipe.merge``), their defaults and their validation.

``validate_merge`` raises ``PlanError`` naming the option (``recipe.merge.x``) before any work, like every
other section of ``mxq.plan.recipe``.
"""
from __future__ import annotations

from typing import Any

from .merge import ROUTER_MODES
from .merge_groups import GROUPINGS, NEEDS_OUTPUTS
from .plan import PlanError, kept_experts

WEIGHTINGS = ("frequency", "saliency", "uniform")
MERGE_DEFAULTS: dict[str, Any] = {"fraction": 0.0, "grouping": "hc_smoe", "weighting": "frequency",
                                  "router": "lse", "align": True, "protect_super": True}


def _fail(option: str, value: Any, why: str) -> None:
    raise PlanError(f"recipe.merge.{option}={value!r}: {why}")


def needs_stats(m: dict[str, Any]) -> bool:
    """Whether the merge reads calibration statistics (frequencies, REAP, routing probabilities, outputs)."""
    return m["grouping"] != "weights" or m["weighting"] != "uniform" or m["router"] != "anchor"


def needs_expert_outputs(recipe: dict[str, Any]) -> bool:
    """Whether a (validated) recipe's merge reads ``mxq.stats.expert_outputs``."""
    return recipe.get("planner") == "merge" and recipe["merge"]["grouping"] in NEEDS_OUTPUTS


def validate_merge(r: dict[str, Any], config) -> int:
    """Check ``r["merge"]`` (defaults already filled in) against the model; returns the experts kept."""
    m = r["merge"]
    unknown = sorted(set(m) - set(MERGE_DEFAULTS))
    if unknown:
        raise PlanError(f"recipe.merge.{unknown[0]}: unknown option; the options are {', '.join(MERGE_DEFAULTS)}")
    frac = m["fraction"]
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 < frac < 1.0:
        _fail("fraction", frac, "must be a number in (0, 1): the share of experts merged away in every layer")
    kept = kept_experts("recipe.merge.fraction", frac, config)
    if m["grouping"] not in GROUPINGS:
        _fail("grouping", m["grouping"], f"unknown grouping; choose from {', '.join(GROUPINGS)}")
    if m["weighting"] not in WEIGHTINGS:
        _fail("weighting", m["weighting"], f"unknown weighting; choose from {', '.join(WEIGHTINGS)}")
    if m["router"] not in ROUTER_MODES:
        _fail("router", m["router"], f"unknown router combination; choose from {', '.join(ROUTER_MODES)}")
    for opt in ("align", "protect_super"):
        if not isinstance(m[opt], bool):
            _fail(opt, m[opt], "must be true or false")
    if needs_stats(m) and not r.get("stats"):
        _fail("grouping", m["grouping"], f"with weighting={m['weighting']} and router={m['router']} needs "
              "calibration statistics; set recipe.stats=true (only grouping=weights, weighting=uniform, "
              "router=anchor needs none)")
    return kept
