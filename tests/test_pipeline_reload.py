"""A run's numbers describe the folder it exports: the pipeline evaluates the exported checkpoint as reloaded
from disk, an evaluation of that folder in a fresh process gives the same metrics, and an export that does
not hold the planned model stops the run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mxq.evaluate.reload import ExportMismatchError, reload_exported
from mxq.run import run

from test_recipes import compose_cfg

EVAL = ["eval=quick", "eval.speed.enabled=false", "eval.lm_eval.enabled=false", "eval.memory.measure_peak=false",
        "eval.report.plots=false", "eval.perplexity.max_tokens=96", "eval.perplexity.max_length=48",
        "eval.perplexity.stride=48"]

FRESH = """
import json, sys, torch, mxq
from omegaconf import OmegaConf
from mxq.evaluate import evaluate
run_dir, out = sys.argv[1], sys.argv[2]
cfg = OmegaConf.load(f"{run_dir}/resolved_config.yaml")
model = mxq.load_model(f"{run_dir}/model", device="cpu", dtype=torch.float32)
m = evaluate(model, mxq.load_tokenizer(f"{run_dir}/model"), OmegaConf.to_container(cfg.eval), out,
             baseline_source=cfg.model.path)
json.dump(m["accuracy"], open(f"{out}/accuracy.json", "w"))
"""


@pytest.fixture(scope="module")
def pruned_run(make_ckpt, tmp_path_factory):
    ckpt = make_ckpt("mxfp4", layers=2)
    tmp = tmp_path_factory.mktemp("reload")
    cfg = compose_cfg("recipe=prune_25pct", f"model.path={ckpt}", "calib.num_sequences=8", "calib.seq_len=64",
                      "generate.max_new_tokens=0", f"cache_dir={tmp / 'cache'}", *EVAL)
    ctx = run(cfg, tmp / "run")
    return ctx, tmp / "run"


def test_run_evaluates_the_reloaded_export(pruned_run):
    ctx, run_dir = pruned_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["evaluated"] == {"model": str(run_dir / "model"), "reloaded_from_disk": True}
    assert Path(ctx.model.source) == run_dir / "model"        # the model measured is the one read back


def test_fresh_process_evaluation_equals_run_metrics(pruned_run, tmp_path):
    _, run_dir = pruned_run
    subprocess.run([sys.executable, "-c", FRESH, str(run_dir), str(tmp_path)], check=True, cwd=tmp_path)
    fresh = json.loads((tmp_path / "accuracy.json").read_text())
    ran = json.loads((run_dir / "metrics.json").read_text())["accuracy"]
    assert fresh["perplexity"] == ran["perplexity"]
    for key in ("mean", "p99", "top1_agreement"):
        assert fresh["kl_vs_baseline"][key] == ran["kl_vs_baseline"][key], key
    assert ran["kl_vs_baseline"]["mean"] > 0                  # pruning changed the model: the check has teeth


def test_export_that_differs_stops_the_run(pruned_run):
    ctx, run_dir = pruned_run
    model = ctx.model
    with torch.no_grad():
        router = model.layers[0].mlp.router.weight
        router[0, 0] += 0.5                                   # the in-memory model no longer matches the folder
        try:
            with pytest.raises(ExportMismatchError, match="reloaded logits differ"):
                reload_exported(model, run_dir / "model", torch.device("cpu"), torch.float32)
        finally:
            router[0, 0] -= 0.5
