"""Every recipe file is a smoke test: each runs end to end on a small synthetic model, so no
shipped recipe can rot unnoticed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from mxq.run import RECIPES, run

RECIPE_NAMES = sorted(p.stem for p in (Path(RECIPES) / "recipe").glob("*.yaml") if not p.stem.startswith("_"))


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=RECIPES, version_base=None):
        return compose("run", overrides=list(overrides))


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt("mxfp4", layers=2)


def test_recipe_set_is_complete():
    need = {"baseline", "analyze", "mxfp4", "nvfp4", "nf4", "int4", "fp8", "prune_25pct", "prune_50pct",
            "mixed_budget"}
    assert need <= set(RECIPE_NAMES)


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_recipe_runs_end_to_end(recipe, ckpt, tmp_path):
    cfg = compose_cfg(f"recipe={recipe}", f"model.path={ckpt}", "eval=none", "calib.num_sequences=8",
                      "calib.seq_len=64", "generate.max_new_tokens=4", f"cache_dir={tmp_path / 'cache'}")
    ctx = run(cfg, tmp_path / "run")
    out = tmp_path / "run"
    assert (out / "resolved_config.yaml").exists() and (out / "run_meta.json").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"]["name"] == recipe
    meta = json.loads((out / "run_meta.json").read_text())         # what bench/pipeline.py reads
    ran = {"load", "validate", "generate", "outputs"} | ({"plan"} if cfg.recipe.get("planner") else set())
    ran |= {"stats"} if cfg.recipe.get("stats") else set()
    ran |= {"reload"} if cfg.recipe.get("planner") and cfg.recipe.get("export", {}).get("enabled") else set()
    assert set(meta["timings_s"]) - {"plan_build", "plan_apply", "plan_export"} == ran   # stages turned off: no time
    assert meta["wall_s"] >= sum(meta["timings_s"].get(k, 0) for k in ("load", "stats", "plan", "reload"))
    assert meta["gpu_peak_allocated_bytes"] is None                 # CPU run
    if cfg.recipe.get("stats"):
        assert (out / "router_stats.json").exists()
        assert meta["calib_tokens"] == 8 * 64
    if cfg.recipe.get("planner"):
        assert (out / "plan.json").exists()
        assert {"plan_build", "plan_apply"} <= set(meta["timings_s"])
        if cfg.recipe.get("export", {}).get("enabled"):
            import mxq

            again = mxq.load_model(out / "model")
            assert again.config.num_local_experts == ctx.model.config.num_local_experts


def test_default_run_with_quick_eval(ckpt, tmp_path):
    cfg = compose_cfg(f"model.path={ckpt}", f"cache_dir={tmp_path / 'cache'}", "generate.max_new_tokens=4")
    run(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("model", "recipe", "plan", "memory", "speed", "accuracy", "env"):
        assert key in metrics
    assert metrics["memory"]["weight_bytes"] > 0
