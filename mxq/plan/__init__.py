"""Compression plans: decide (planners) -> ``plan.json`` -> apply (export: ``mxq.io.targets``).

    r = mxq.plan.validate(cfg.recipe, model.config)        # before any work; PlanError names the option
    plan = mxq.plan.build_plan(cfg.recipe, stats, model)    # stats: mxq.stats.RouterStats or None
    plan.save(run_dir / "plan.json")
    mxq.plan.apply_(model, plan)                            # prune / re-pack in place
    mxq.io.targets.export_model(model, plan, run_dir / "model", source_dir=model.source)

Planning reads and writes no checkpoint files; ``mxq.io.targets.export_checkpoint(source_dir, plan,
out_dir)`` applies a plan from disk to disk without loading the model.
"""
from .apply import apply_, current_plan
from .build import build_plan
from .plan import PLAN_VERSION, PRUNE, Plan, PlanError
from .planners import PLANNERS, register_planner
from .recipe import recipe_dict
from .validate import validate

__all__ = ["PLANNERS", "PLAN_VERSION", "PRUNE", "Plan", "PlanError", "apply_", "build_plan", "current_plan",
           "recipe_dict", "register_planner", "validate"]
