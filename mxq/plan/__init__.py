"""Compression plans: decide (planners) -> ``plan.json`` -> apply -> export.

    r = mxq.plan.validate(cfg.recipe, model.config)        # before any work; PlanError names the option
    plan = mxq.plan.build_plan(cfg.recipe, stats, model)    # stats: mxq.stats.RouterStats or None
    plan.save(run_dir / "plan.json")
    mxq.plan.apply_(model, plan)                            # prune / re-pack in place
    mxq.plan.export_model(model, plan, run_dir / "model", source_dir=model.source)

``export_checkpoint(source_dir, plan, out_dir)`` applies a plan from disk to disk without loading the model.
"""
from .apply import apply_, current_plan
from .export import choose_layout, export_checkpoint, export_model
from .plan import PLAN_VERSION, PRUNE, Plan, PlanError
from .planners import PLANNERS, build_plan, register_planner
from .recipe import recipe_dict, validate

__all__ = ["PLANNERS", "PLAN_VERSION", "PRUNE", "Plan", "PlanError", "apply_", "build_plan", "choose_layout",
           "current_plan", "export_checkpoint", "export_model", "recipe_dict", "register_planner", "validate"]
