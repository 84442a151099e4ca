"""``build_plan``: recipe -> validated options -> planner -> checked plan (deciding only; nothing is modified)."""
from __future__ import annotations

from .apply import current_plan
from .plan import Plan, PlanError
from .planners import PLANNERS
from .validate import validate


def build_plan(recipe, stats, model) -> Plan:
    """Validate the recipe, run its planner, check the plan against the model; records exact bytes."""
    r = validate(recipe, model.config)
    if not r.get("planner"):
        raise PlanError("recipe.planner is null: this recipe compresses nothing, there is no plan to build")
    plan = PLANNERS[r["planner"]].fn(r, stats, model)
    plan.planner = r["planner"]
    plan.check(model.config)
    plan.info["bytes"] = plan.bytes(model.config)
    plan.info["source_bytes"] = current_plan(model).bytes(model.config)
    return plan
