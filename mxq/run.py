"""``python -m mxq.run recipe=NAME [model.path=DIR] [eval=quick]``: the whole pipeline in one command.

Stages run in order from a registry; each reads and extends one ``RunContext``:
load -> validate -> stats -> plan (build, save, apply, export) -> reload -> skip (dynamic expert skipping, off
by default) -> generate -> evaluate -> outputs.
Deciding (planners) is kept apart from doing (apply/export), and every stage writes self-describing
files into the Hydra run folder, so reports are rebuilt from files, never from live objects.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from . import jsonout, rundir  # importing rundir registers the ${mxq_uid:} resolver of hydra.run.dir
from .atomic import write_atomic
from .console import StageDisplay, quiet_libraries
from .resources import RECIPES_SEARCH_PATH, recipes_dir

log = logging.getLogger("mxq.run")
RECIPES = str(recipes_dir())


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
    weight_check: dict | None = None


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[[RunContext], None]
    when: Callable[[RunContext], bool]      # False: the recipe or config turns this stage off


STAGES: list[Stage] = []


def stage(name: str, when: Callable[[RunContext], Any] = lambda ctx: True) -> Callable:
    def deco(fn: Callable[[RunContext], None]) -> Callable[[RunContext], None]:
        STAGES.append(Stage(name, fn, lambda ctx: bool(when(ctx))))
        return fn

    return deco


def _exports(ctx: RunContext) -> bool:
    return bool(ctx.cfg.recipe.get("planner") and ctx.cfg.recipe.get("export", {}).get("enabled"))


def resolve_device(cfg: DictConfig) -> tuple[torch.device, torch.dtype]:
    from .options import check_device

    dev = cfg.device
    check_device("device", dev)
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    dt = cfg.dtype
    if dt == "auto":
        dt = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, str(dt), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype={dt!r} is not a torch dtype (use auto, bfloat16, float16 or float32)")
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
    """Every weight read (finite, plausible scales) and, when the recipe plans, every recipe option."""
    from .validate_weights import FP16_MAX, require_valid

    v = ctx.cfg.get("validate") or {}
    ctx.weight_check = require_valid(ctx.model, bool(v.get("allow_nonfinite", False)),
                                     float(v.get("max_abs", FP16_MAX)))
    if ctx.cfg.recipe.get("planner"):
        from .plan import validate

        validate(ctx.cfg.recipe, ctx.model.config)


@stage("stats", when=lambda ctx: ctx.cfg.recipe.get("stats"))
def _stats(ctx: RunContext) -> None:
    from .stats import collect_or_load, write_report

    ctx.stats = collect_or_load(ctx.model, ctx.tokenizer, ctx.cfg.calib, ctx.run_dir, Path(ctx.cfg.cache_dir),
                                ctx.cfg.batch_size, ctx.cfg.recipe.get("super_experts"),
                                progress=bool(ctx.cfg.get("verbose", False)))
    write_report(ctx.stats, ctx.run_dir)
    from .plan.merge_recipe import needs_expert_outputs
    from .plan.recipe import recipe_dict

    if needs_expert_outputs(recipe_dict(ctx.cfg.recipe)):
        from .stats.expert_outputs import collect_or_load_outputs

        ctx.stats.expert_outputs = collect_or_load_outputs(ctx.model, ctx.tokenizer, ctx.cfg.calib,
                                                           Path(ctx.cfg.cache_dir), ctx.cfg.batch_size)


@stage("plan", when=lambda ctx: ctx.cfg.recipe.get("planner"))
def _plan(ctx: RunContext) -> None:
    from .io.targets import export_model
    from .plan import build_plan
    from .plan.recipe import recipe_dict
    from .quant import quantize_

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
    quantize_(ctx.model, ctx.plan, ctx.cfg.recipe, tokenizer=ctx.tokenizer, calib_cfg=ctx.cfg.calib,
              run_dir=ctx.run_dir, batch_size=ctx.cfg.batch_size)          # rtn = apply_; gptq: calibration.json
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
        if ctx.cfg.recipe.export.get("formats"):       # engine forms, written from the exported folder
            from .convert import write_formats

            t3 = time.perf_counter()
            for w in write_formats(ctx.run_dir / "model", list(ctx.cfg.recipe.export.formats), ctx.run_dir,
                                   gguf_type=ctx.cfg.recipe.export.get("gguf_type")):
                log.info("exported %s%s", w.path, "".join(f"; {n}" for n in w.notes))
            ctx.timings["export_formats"] = round(time.perf_counter() - t3, 3)


@stage("reload", when=_exports)
def _reload(ctx: RunContext) -> None:
    """From here on the run measures the exported folder as a user loads it, not the in-memory model."""
    import gc

    from .evaluate.reload import fingerprint, reload_checked

    exported = ctx.run_dir / "model"
    expected = fingerprint(ctx.model)
    ctx.model = None                       # the planned model leaves memory before the export is loaded
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    ctx.model = reload_checked(exported, expected, ctx.device, ctx.dtype)
    ctx.metrics["evaluated"] = {"model": str(exported), "reloaded_from_disk": True}


@stage("skip", when=lambda ctx: ctx.cfg.get("skip", {}).get("beta") is not None)
def _skip(ctx: RunContext) -> None:
    beta = ctx.cfg.skip.beta
    from .model.skipping import calibrate_beta, set_skipping

    if beta == "calibrated":               # any other value is a number, checked with the run options
        if ctx.cfg.calib is None:
            raise ValueError("skip.beta=calibrated needs a calibration set (calib=...)")
        from .calib import build_calibration

        info = calibrate_beta(ctx.model, build_calibration(ctx.cfg.calib, ctx.tokenizer), ctx.cfg.batch_size)
    else:
        info = {"beta": [float(beta)] * ctx.model.config.num_hidden_layers}
    set_skipping(ctx.model, info["beta"])
    ctx.metrics["skip"] = info
    log.info("dynamic expert skipping (Lu et al. 2402.14800) on, beta per layer %s", info["beta"])


@stage("generate", when=lambda ctx: ctx.cfg.generate.max_new_tokens)
def _generate(ctx: RunContext) -> None:
    g = ctx.cfg.generate
    ids = ctx.tokenizer(g.prompt, return_tensors="pt").input_ids.to(ctx.device)
    t0 = time.perf_counter()
    out = ctx.model.generate(ids, max_new_tokens=g.max_new_tokens, eos_token_id=ctx.model.config.eos_token_id)
    dt = time.perf_counter() - t0
    text = ctx.tokenizer.decode(out[0], skip_special_tokens=False)
    write_atomic(ctx.run_dir / "generation.txt", text + "\n")
    ctx.metrics["generation"] = {"prompt": g.prompt, "text": text, "new_tokens": int(out.shape[1] - ids.shape[1]),
                                 "seconds": round(dt, 4)}
    log.info("greedy generation (%d tokens, %.2f s): %r", out.shape[1] - ids.shape[1], dt, text)


@stage("evaluate", when=lambda ctx: ctx.cfg.eval.get("enabled", True))
def _evaluate(ctx: RunContext) -> None:
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
    ctx.metrics.setdefault("evaluated", {"model": str(ctx.model.source), "reloaded_from_disk": False})
    from .evaluate import write_run_outputs

    write_run_outputs(ctx.run_dir, ctx.metrics)
    if _exports(ctx):       # the card describes the export with the numbers just written (mxq.publish.card)
        from .publish.card import write_card

        write_card(ctx.run_dir)


def run(cfg: DictConfig, run_dir: Path) -> RunContext:
    """Run every stage into ``run_dir`` (claimed first: see ``mxq.rundir``); errors are logged to run.log too."""
    from .options import check_run_options

    run_dir = Path(run_dir)
    opts = cfg.get("run") or {}
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    rundir.claim(run_dir, bool(opts.get("overwrite", False)), bool(opts.get("resume", False)), cfg_yaml)
    handler = _file_log(run_dir)
    try:
        write_atomic(run_dir / "resolved_config.yaml", cfg_yaml)
        check_run_options(cfg)
        ctx = _run_stages(cfg, run_dir)
    except BaseException as e:
        log.error("run failed: %s: %s", type(e).__name__, e,
                  exc_info=not isinstance(e, (ValueError, KeyboardInterrupt)))
        rundir.fail(run_dir, e)
        raise
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
    rundir.complete(run_dir)
    from .publish.tracking import hydra_sweep_dir, track

    track(cfg, run_dir, hydra_sweep_dir())      # tracking=mlflow: the finished folder's files (mxq.publish.tracking)
    return ctx


def _file_log(run_dir: Path) -> logging.Handler | None:
    """Send log records to ``run_dir/run.log`` unless a handler already writes there (Hydra's job logging)."""
    target = (run_dir / "run.log").resolve()
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve() == target:
            return None
    h = logging.FileHandler(target)
    h.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    h.setLevel(logging.INFO)
    logging.getLogger().addHandler(h)
    return h


def _run_stages(cfg: DictConfig, run_dir: Path) -> RunContext:
    torch.manual_seed(cfg.seed)
    device, dtype = resolve_device(cfg)
    ctx = RunContext(cfg=cfg, run_dir=run_dir, device=device, dtype=dtype)
    cuda = device.type == "cuda"
    gpu_peak: dict[str, int] = {}
    t_run = time.perf_counter()
    stages = StageDisplay()
    with quiet_libraries(bool(cfg.get("verbose", False))):
        for st in STAGES:
            if not st.when(ctx):
                stages.skipped(st.name)
                continue
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            with stages.stage(st.name):
                st.fn(ctx)
            ctx.timings[st.name] = round(time.perf_counter() - t0, 3)
            if cuda:   # since the stage began (inside evaluate, the memory probe and the speed sweep reset it)
                gpu_peak[st.name] = int(torch.cuda.max_memory_allocated(device))
    from .runmeta import environment

    meta = {"env": ctx.metrics.get("env") or environment(), "timings_s": ctx.timings, "wall_s": round(time.perf_counter() - t_run, 3),
            "gpu_peak_allocated_bytes": gpu_peak or None,
            "calib_tokens": getattr(ctx.stats, "tokens", None), "run_dir": str(run_dir),
            "weights": ctx.weight_check}
    write_atomic(run_dir / "run_meta.json", jsonout.dumps(meta, indent=2) + "\n")
    return ctx


@hydra.main(version_base=None, config_path=RECIPES_SEARCH_PATH, config_name="run")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run(cfg, run_dir)
    log.debug("run folder: %s", run_dir)


if __name__ == "__main__":
    main()
