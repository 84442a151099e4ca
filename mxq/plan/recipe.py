"""Recipe options of the planners and their defaults (checked by ``mxq.plan.validate``).

A recipe (``recipes/recipe/*.yaml``) only lists its differences from ``_base.yaml``; ``recipe_dict`` fills
in the same defaults for a recipe given as a plain dict or a Hydra ``DictConfig``.
"""
from __future__ import annotations

import copy
from typing import Any

from .merge_recipe import MERGE_DEFAULTS
from .router_repair import REPAIR_DEFAULTS

STATS_CRITERIA = ("reap", "frequency", "gate_mass", "ean")      # scores of mxq.stats.RouterStats
CRITERIA = STATS_CRITERIA + ("random",)
IMPORTANCE = STATS_CRITERIA + ("uniform",)
SOLVERS = ("milp", "greedy")
SCOPES = ("layer", "model")
KEEP, MIXED = "keep", "mixed"

DEFAULTS: dict[str, Any] = {
    "name": None, "stats": False, "planner": None,
    "prune": {"fraction": 0.0, "criterion": "reap", "protect_super": True, "seed": 0},
    "quant": {"format": KEEP, "attention": "bf16", "lm_head": "bf16", "method": "rtn", "gptq": {}},
    "mixed": {"menu": ["fp8", "mxfp4", "nvfp4", "int4_g128", "nf4_dq"], "budget_bits": None, "budget_bytes": None,
              "importance": "reap", "solver": "milp", "scope": "layer"},
    "merge": MERGE_DEFAULTS,
    "repair": REPAIR_DEFAULTS,
    "export": {"enabled": False, "formats": [], "gguf_type": None},
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


