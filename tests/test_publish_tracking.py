"""Tracking: a 2-run sweep logged to a local MLflow file store and to a local ``mlflow server``, and a W&B
offline run; params, metrics and artifacts read back and compared with the run folders' files."""
from __future__ import annotations

import importlib.util
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


def _wandb_records(path: Path):
    """Records of a W&B transaction log (``run-*.wandb``): a 7-byte header (``:W&B``, magic, version), then
    LevelDB-log framing in 32 KiB blocks (crc32 4, length 2 little-endian, type 1: full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:                    # block trailer too short for a header: padding
            pos += block - pos % block
            continue
        n, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 0 and n == 0:
            continue
        buf = payload if kind in (1, 2) else buf + payload
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            yield r


def test_wandb_offline_run_directory(make_ckpt, tmp_path):
    pytest.importorskip("wandb")
    ckpt = make_ckpt("mxfp4", layers=2)
    cfg = compose_cfg("recipe=prune_25pct", *FAST, f"model.path={ckpt}", f"cache_dir={tmp_path / 'cache'}",
                      "tracking=wandb", f"tracking.dir={tmp_path}")
    out = tmp_path / "sweep" / "0_prune_25pct"
    run(cfg, out)                                     # logs once, as a single run
    rid = track(cfg, out, sweep_dir=tmp_path / "sweep")   # and once as a sweep job
    logs = {p.parent.name: p for p in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")}
    assert len(logs) == 2
    log = next(p for name, p in logs.items() if name.endswith(rid))
    recs = list(_wandb_records(log))
    kinds = {r.WhichOneof("record_type") for r in recs}
    assert {"run", "history", "summary", "artifact"} <= kinds
    runrec = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    assert runrec.run_group == "sweep" and runrec.display_name == "0_prune_25pct"
    conf = {i.key: json.loads(i.value_json) for i in runrec.config.update}       # the resolved config, nested
    assert conf["recipe"]["name"] == "prune_25pct" and conf["model"]["path"] == str(ckpt)
    assert conf["tracking"]["backend"] == "wandb"
    hist = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for r in recs
            if r.WhichOneof("record_type") == "history" for i in r.history.item}
    want = run_metrics(out)
    assert want and {k: hist[k] for k in want} == pytest.approx(want)
    art = next(r.artifact for r in recs if r.WhichOneof("record_type") == "artifact")
    paths = {c.path for c in art.manifest.contents}
    assert art.type == "mxq-run" and {"plan.json", "metrics.json", "model/README.md"} <= paths


@pytest.fixture()
def mlflow_server(tmp_path):
    """``mlflow server`` on 127.0.0.1 (a free port), SQLite backend, artifacts proxied into tmp_path."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    if importlib.util.find_spec("mlflow.server") is None or importlib.util.find_spec("sqlalchemy") is None:
        pytest.skip("the MLflow server needs the full mlflow package (not mlflow-skinny)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "server.log").open("w")         # closed in the finally below, after the server
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'db.sqlite'}",
                             "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"mlflow server exited: {(tmp_path / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer /health within 60 s")
        yield url, tmp_path / "artifacts"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_two_run_sweep_to_server(make_ckpt, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient

    url, art_root = mlflow_server
    ckpt = make_ckpt("mxfp4", layers=2)
    sweep = tmp_path / "sweep"
    for i, recipe in enumerate(("baseline", "prune_25pct")):
        cfg = compose_cfg(f"recipe={recipe}", *FAST, f"model.path={ckpt}", f"cache_dir={tmp_path / 'cache'}",
                          "tracking=mlflow", f"tracking.uri={url}", "tracking.experiment=srv")
        run(cfg, sweep / f"{i}_{recipe}")
        track(cfg, sweep / f"{i}_{recipe}", sweep_dir=sweep)
    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name("srv").experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags.get("mxq.role") == "sweep")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == ["0_baseline", "1_prune_25pct"] and parent.info.status == "FINISHED"
    for name, r in children.items():
        assert r.data.params["recipe.name"] == name.split("_", 1)[1]
        assert r.data.metrics == pytest.approx(run_metrics(sweep / name))
    pr = children["1_prune_25pct"]
    assert "plan.json" in {a.path for a in client.list_artifacts(pr.info.run_id)}
    # the server stored the files it was sent (proxied artifacts), byte for byte
    stored = next(art_root.rglob(f"{pr.info.run_id}/artifacts/model/README.md"))
    assert stored.read_bytes() == (sweep / "1_prune_25pct" / "model" / "README.md").read_bytes()
