"""``python -m mxq.run recipe=NAME [model.path=DIR] [eval=quick]``: the whole pipeline in one command.

Stages run in order from a registry; each reads and extends one ``RunContext``:
load -> validate -> stats -> plan (build, save, apply, export) -> skip (dynamic expert skipping, off by
default) -> generate -> evaluate -> outputs.
Deciding (planners) is kept apart from doing (apply/export), and every stage writes self-describing
files into the Hydra run folder (style.md rules 2 and 10).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("mxq.run")
RECIPES = str(Path(__file__).resolve().parents[1] / "recipes")


@dataclass
class RunContext:
    cfg: DictConfig
    run_dir: Path
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    model: Any = None
    tokenizer: Any = None
    source: str | None = None
    stats: Any = None
    plan: Any = None
    metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


STAGES: list[tuple[str, Callable[[RunContext], None]]] = []


def stage(name: str) -> Callable:
    def deco(fn: Callable[[RunContext], None]) -> Callable[[RunContext], None]:
        STAGES.append((name, fn))
        return fn

    return deco


def resolve_device(cfg: DictConfig) -> tuple[torch.device, torch.dtype]:
    dev = cfg.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    dt = cfg.dtype
    if dt == "auto":
        dt = "bfloat16" if device.type == "cuda" else "float32"
    try:
        dtype = getattr(torch, dt)
    except AttributeError:
        raise ValueError(f"dtype={dt!r} is not a torch dtype (use auto, bfloat16, float16 or float32)") from None
    return device, dtype


@stage("load")
def _load(ctx: RunContext) -> None:
    from . import load_model, load_tokenizer

    ctx.source = ctx.cfg.model.path or ctx.cfg.model.name
    ctx.model = load_model(ctx.source, device=ctx.device, dtype=ctx.dtype)
    ctx.tokenizer = load_tokenizer(ctx.model.source)
    c = ctx.model.config
    log.info("loaded %s (%s experts, %d layers x %d experts, top-%d) on %s in %s", ctx.model.source,
             ctx.model.source_format, c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok,
             ctx.device, str(ctx.dtype).removeprefix("torch."))


@stage("validate")
def _validate(ctx: RunContext) -> None:
    if ctx.cfg.recipe.get("planner"):
        from .plan import validate

        validate(ctx.cfg.recipe, ctx.model.config)


@stage("stats")
def _stats(ctx: RunContext) -> None:
    if not ctx.cfg.recipe.get("stats"):
        return
    from .stats import collect_or_load, write_report

    ctx.stats = collect_or_load(ctx.model, ctx.tokenizer, ctx.cfg.calib, ctx.run_dir, Path(ctx.cfg.cache_dir),
                                ctx.cfg.batch_size, ctx.cfg.recipe.get("super_experts"))
    write_report(ctx.stats, ctx.run_dir)
    from .plan.merge_recipe import needs_expert_outputs
    from .plan.recipe import recipe_dict

    if needs_expert_outputs(recipe_dict(ctx.cfg.recipe)):
        from .stats.expert_outputs import collect_or_load_outputs

        ctx.stats.expert_outputs = collect_or_load_outputs(ctx.model, ctx.tokenizer, ctx.cfg.calib,
                                                           Path(ctx.cfg.cache_dir), ctx.cfg.batch_size)


@stage("plan")
def _plan(ctx: RunContext) -> None:
    if not ctx.cfg.recipe.get("planner"):
        return
    from .plan import apply_, build_plan, export_model
    from .plan.recipe import recipe_dict

    rep = recipe_dict(ctx.cfg.recipe)["repair"]
    t0 = time.perf_counter()
    ctx.plan = build_plan(ctx.cfg.recipe, ctx.stats, ctx.model)
    ctx.plan.save(ctx.run_dir / "plan.json")
    ios = None
    if rep["enabled"]:                 # the original layers' inputs/outputs, before the plan changes them
        from .calib import build_calibration
        from .plan.router_repair import capture_layer_io

        ios = capture_layer_io(ctx.model, build_calibration(ctx.cfg.calib, ctx.tokenizer), ctx.cfg.batch_size,
                               rep["max_tokens"])
    t1 = time.perf_counter()
    apply_(ctx.model, ctx.plan)
    t2 = time.perf_counter()
    ctx.timings.update(plan_build=round(t1 - t0, 3), plan_apply=round(t2 - t1, 3))
    if ios is not None:
        from .plan.router_repair import repair_routers_

        info = repair_routers_(ctx.model, ios, rep["steps"], rep["lr"], rep["holdout"], rep["validation"])
        ctx.plan.info["router_repair"] = info
        ctx.metrics["router_repair"] = info
        ctx.plan.save(ctx.run_dir / "plan.json")
        ctx.timings["router_repair"] = round(time.perf_counter() - t2, 3)
        log.info("router repair: layer-output MSE on held-out calibration tokens %s -> %s",
                 [round(d["heldout_mse_before"], 6) for d in info], [round(d["heldout_mse_after"], 6) for d in info])
        t2 = time.perf_counter()
    if ctx.cfg.recipe.get("export", {}).get("enabled"):
        export_model(ctx.model, ctx.plan, ctx.run_dir / "model", source_dir=ctx.model.source)
        ctx.timings["plan_export"] = round(time.perf_counter() - t2, 3)


@stage("skip")
def _skip(ctx: RunContext) -> None:
    beta = ctx.cfg.get("skip", {}).get("beta")
    if beta is None:
        return
    from .model.skipping import calibrate_beta, set_skipping

    if beta == "calibrated":
        if ctx.cfg.calib is None:
            raise ValueError("skip.beta=calibrated needs a calibration set (calib=...)")
        from .calib import build_calibration

        info = calibrate_beta(ctx.model, build_calibration(ctx.cfg.calib, ctx.tokenizer), ctx.cfg.batch_size)
    elif isinstance(beta, (int, float)) and not isinstance(beta, bool):
        info = {"beta": [float(beta)] * ctx.model.config.num_hidden_layers}
    else:
        raise ValueError(f"skip.beta={beta!r}: use null (off), a number in [0, 1], or calibrated")
    set_skipping(ctx.model, info["beta"])
    ctx.metrics["skip"] = info
    log.info("dynamic expert skipping (Lu et al. 2402.14800) on, beta per layer %s", info["beta"])


@stage("generate")
def _generate(ctx: RunContext) -> None:
    g = ctx.cfg.generate
    if not g.max_new_tokens:
        return
    ids = ctx.tokenizer(g.prompt, return_tensors="pt").input_ids.to(ctx.device)
    t0 = time.perf_counter()
    out = ctx.model.generate(ids, max_new_tokens=g.max_new_tokens, eos_token_id=ctx.model.config.eos_token_id)
    dt = time.perf_counter() - t0
    text = ctx.tokenizer.decode(out[0], skip_special_tokens=False)
    (ctx.run_dir / "generation.txt").write_text(text + "\n")
    ctx.metrics["generation"] = {"prompt": g.prompt, "text": text, "new_tokens": int(out.shape[1] - ids.shape[1]),
                                 "seconds": round(dt, 4)}
    log.info("greedy generation (%d tokens, %.2f s): %r", out.shape[1] - ids.shape[1], dt, text)


@stage("evaluate")
def _evaluate(ctx: RunContext) -> None:
    if not ctx.cfg.eval.get("enabled", True):
        return
    from .evaluate import evaluate

    ctx.metrics.update(evaluate(ctx.model, ctx.tokenizer, ctx.cfg.eval, ctx.run_dir, baseline_source=ctx.source))


@stage("outputs")
def _outputs(ctx: RunContext) -> None:
    from .runmeta import environment

    c = ctx.model.config
    ctx.metrics["model"] = {"source": str(ctx.model.source), "stored_experts": ctx.model.source_format,
                            "num_hidden_layers": c.num_hidden_layers, "num_local_experts": c.num_local_experts,
                            "num_experts_per_tok": c.num_experts_per_tok,
                            "device": str(ctx.device), "dtype": str(ctx.dtype).removeprefix("torch.")}
    ctx.metrics["recipe"] = OmegaConf.to_container(ctx.cfg.recipe, resolve=True)
    ctx.metrics["plan"] = ctx.plan.summary() if ctx.plan is not None else None
    ctx.metrics["env"] = environment()
    ctx.metrics.setdefault("timings_s", {}).update(ctx.timings)
    try:
        from .evaluate import write_run_outputs
    except ImportError:
        write_run_outputs = None
    if write_run_outputs is not None and "memory" in ctx.metrics:
        write_run_outputs(ctx.run_dir, ctx.metrics)
    else:
        (ctx.run_dir / "metrics.json").write_text(json.dumps(ctx.metrics, indent=2, default=str) + "\n")


def run(cfg: DictConfig, run_dir: Path) -> RunContext:
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device, dtype = resolve_device(cfg)
    ctx = RunContext(cfg=cfg, run_dir=run_dir, device=device, dtype=dtype)
    (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    cuda = device.type == "cuda"
    gpu_peak: dict[str, int] = {}
    t_run = time.perf_counter()
    for name, fn in STAGES:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        fn(ctx)
        ctx.timings[name] = round(time.perf_counter() - t0, 3)
        if cuda:       # since the stage began (inside evaluate, the memory probe and the speed sweep reset it)
            gpu_peak[name] = int(torch.cuda.max_memory_allocated(device))
    from .runmeta import environment

    meta = {"env": environment(), "timings_s": ctx.timings, "wall_s": round(time.perf_counter() - t_run, 3),
            "gpu_peak_allocated_bytes": gpu_peak or None,
            "calib_tokens": getattr(ctx.stats, "tokens", None), "run_dir": str(run_dir)}
    (run_dir / "run_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return ctx


@hydra.main(version_base=None, config_path=RECIPES, config_name="run")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run(cfg, run_dir)
    log.info("run folder: %s", run_dir)


if __name__ == "__main__":
    main()
