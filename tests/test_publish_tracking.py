"""tracking=mlflow: a 2-run sweep logged to a local MLflow file store; params, metrics and artifacts read back
with MlflowClient and compared with the run folders' files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from mxq.publish.tracking import flatten, run_metrics, track
from mxq.run import run

mlflow = pytest.importorskip("mlflow")

# this checkout's recipes (an editable install may map mxq.recipes to another checkout)
RECIPES = str(Path(__file__).resolve().parents[1] / "recipes")
FAST = ("eval=none", "calib.num_sequences=8", "calib.seq_len=64", "generate.max_new_tokens=0")


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=RECIPES, version_base=None):
        return compose("run", overrides=list(overrides))


def test_two_run_sweep_to_file_store(make_ckpt, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    ckpt = make_ckpt("mxfp4", layers=2)
    store = tmp_path / "mlruns"
    sweep = tmp_path / "sweep"
    dirs = {}
    for i, recipe in enumerate(("baseline", "prune_25pct")):
        cfg = compose_cfg(f"recipe={recipe}", *FAST, f"model.path={ckpt}", f"cache_dir={tmp_path / 'cache'}",
                          "tracking=mlflow", f"tracking.uri={store}", "tracking.experiment=t")
        dirs[recipe] = sweep / f"{i}_{recipe}"
        run(cfg, dirs[recipe])                         # no Hydra multirun here: log again as sweep children
        track(cfg, dirs[recipe], sweep_dir=sweep)
    client = MlflowClient(store.resolve().as_uri())
    exp = client.get_experiment_by_name("t")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("mxq.role") == "sweep"]
    assert len(parents) == 1 and parents[0].data.tags["mxq.sweep_dir"] == str(sweep.resolve())
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == ["0_baseline", "1_prune_25pct"]
    assert len(runs) == 5                              # 2 standalone (from run()), 1 parent, 2 children
    for r in children:
        d = sweep / r.info.run_name
        cfg = flatten(yaml.safe_load((d / "resolved_config.yaml").read_text()))
        assert r.data.params["recipe.name"] == cfg["recipe.name"]
        assert r.data.params["tracking.backend"] == "mlflow" and r.data.params["model.path"] == str(ckpt)
        assert r.data.metrics == pytest.approx(run_metrics(d)) and r.data.metrics
        arts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"metrics.json", "resolved_config.yaml", "run_meta.json"} <= arts
    pruned = next(r for r in children if r.info.run_name == "1_prune_25pct")
    m = json.loads((dirs["prune_25pct"] / "metrics.json").read_text())
    assert pruned.data.metrics["plan.num_kept"] == m["plan"]["num_kept"] == 24
    assert pruned.data.metrics["plan.bytes.total"] == m["plan"]["bytes"]["total"]
    arts = {a.path for a in client.list_artifacts(pruned.info.run_id)}
    assert "plan.json" in arts and "model" in arts
    assert [a.path for a in client.list_artifacts(pruned.info.run_id, "model")] == ["model/README.md"]


def test_flatten_and_metric_selection(tmp_path):
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": [1, 2], "d": None}
    (tmp_path / "metrics.json").write_text(json.dumps({
        "accuracy": {"perplexity": {"mean": 3.5}, "notes": ["x"]}, "env": {"cpu_count": 2}, "ok": True,
        "speed": {"decode_tokens_per_s": None, "energy": "not available"}, "timings_s": {"load": 0.5}}))
    assert run_metrics(tmp_path) == {"accuracy.perplexity.mean": 3.5, "timings_s.load": 0.5}


def test_unknown_backend(tmp_path):
    with pytest.raises(ValueError, match="tracking.backend='nope'"):
        track({"tracking": {"backend": "nope"}}, tmp_path)
    assert track({"tracking": {"backend": "none"}}, tmp_path) is None
