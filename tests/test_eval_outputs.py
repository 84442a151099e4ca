"""Run outputs on real run folders (evaluate on a tiny synthetic model, two "recipes"): metrics.json schema,
exact memory accounting, speed fields, report.md, metrics.csv, the ablation CLI and the notebook."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from _fixtures_eval import TEST_EVAL, fake_router_stats, make_run

import mxq
from mxq.evaluate.metrics import REQUIRED, missing_keys, param_counts


@pytest.fixture(scope="module")
def sweep(make_ckpt, tmp_path_factory) -> tuple[Path, Path, dict, dict]:
    ckpt = make_ckpt("mxfp4", layers=1, num_local_experts=8)
    root = tmp_path_factory.mktemp("multirun")
    cache = tmp_path_factory.mktemp("cache")
    base = make_run(ckpt, root / "0_baseline", "baseline", TEST_EVAL, cache_dir=cache)
    noisy = make_run(ckpt, root / "1_mxfp4_noise", "mxfp4_noise", TEST_EVAL, noise=0.3, cache_dir=cache)
    fake_router_stats(root / "1_mxfp4_noise", layers=1, experts=8)
    return ckpt, root, base, noisy


def test_metrics_json_schema(sweep):
    _, root, base, noisy = sweep
    for run in ("0_baseline", "1_mxfp4_noise"):
        m = json.loads((root / run / "metrics.json").read_text())
        assert set(REQUIRED) <= set(m) and missing_keys(m) == []
        assert isinstance(m["memory"]["weight_bytes"], int) and m["memory"]["weight_bytes"] > 0
        assert m["speed"]["decode_tokens_per_s"] > 0
        ppl = m["accuracy"]["perplexity"]
        assert set(ppl) == {"austen", "shakespeare", "mean"} and all(v > 1 for v in ppl.values())
        assert {"mean", "p99", "top1_agreement", "per_domain"} <= set(m["accuracy"]["kl_vs_baseline"])
        assert m["precision"] == {"expert_formats": {"mxfp4": 8}, "compute_dtype": "float32",
                                  "attention_dtype": "float32", "path": "mxq-torch-reference", "device": "cpu"}
        for k in ("torch", "transformers", "mxq", "python", "git_revision", "cpu", "cpu_count", "gpu", "date"):
            assert k in m["env"]
        assert m["accuracy"]["lm_eval"]["tasks"]["tiny_cloze_austen"]["acc"] >= 0
    assert base["accuracy"]["kl_vs_baseline"]["mean"] == 0.0
    assert base["accuracy"]["kl_vs_baseline"]["top1_agreement"] == 1.0
    assert noisy["accuracy"]["kl_vs_baseline"]["mean"] > 0.0
    assert noisy["accuracy"]["kl_vs_baseline"]["reference"]["cached"]          # reused from the baseline run


def test_memory_bytes_are_exact(sweep):
    from safetensors import safe_open

    ckpt, _, base, _ = sweep
    on_disk = 0
    with safe_open(str(Path(ckpt) / "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            on_disk += t.numel() * t.element_size()
    mem = base["memory"]
    assert mem["weight_bytes_bf16_dense"] == on_disk                        # bf16 + packed MXFP4, to the byte
    assert mem["weight_bytes"] == sum(mem["by_component"].values())
    assert mem["experts_by_format"]["mxfp4"]["bits_per_weight"] == 4.25
    model = mxq.load_model(ckpt, dtype=torch.float32)
    want = model.config.param_counts()
    got = param_counts(model)
    assert (got["total"], got["active_excl_embedding"]) == (want["total"], want["active_excl_embedding"])
    n_params = sum(p.numel() for p in model.parameters()) + mem["params"]["expert_weights"]
    assert got["total"] == n_params                                         # every tensor counted once
    assert mem["peak"]["host_rss_bytes_with_cache"] > mem["weight_bytes"]


def test_speed_fields_and_runtime_path(sweep):
    from mxq.evaluate.speed import speed_report

    _, _, base, _ = sweep
    row = base["speed"]["by_setting"]["greedy@8"]
    assert row["ttft_s"] > 0 and row["e2e_p95_s"] >= row["e2e_p50_s"] > row["ttft_s"]
    assert row["energy_j_per_1k_tokens"] == "not available"                # CPU: no NVML counter
    assert base["speed"]["ape_decode_tokens_per_s_per_b_active"] == pytest.approx(
        row["decode_tokens_per_s"] / (base["memory"]["params"]["active_excl_embedding"] / 1e9))
    model = mxq.load_model(sweep[0], dtype=torch.float32)
    model.runtime_path = "some-fast-runtime"
    rep = speed_report(model, {"contexts": [4], "new_tokens": 2, "repeats": 1, "warmup": 0,
                               "modes": ["sample"]}, progress=False)
    assert rep["precision"]["path"] == "some-fast-runtime" and "sample@4" in rep["by_setting"]


def test_report_and_csv(sweep):
    _, root, _, _ = sweep
    run = root / "1_mxfp4_noise"
    md = (run / "report.md").read_text()
    for needle in ("## Memory", "## Speed", "## Accuracy", "tiny_cloze_austen", "not comparable with the model card",
                   "mxq-torch-reference", "KL p99", "stride 16"):
        assert needle in md, needle
    for png in ("memory.png", "speed.png", "perplexity.png", "kl_hist.png"):
        assert (run / png).stat().st_size > 1000, png
    rows = list(csv.DictReader(io.StringIO((run / "metrics.csv").read_text())))
    assert len(rows) == 1 and float(rows[0]["accuracy.perplexity.mean"]) > 1
    assert rows[0]["recipe.name"] == "mxfp4_noise"


def test_ablation_cli(sweep, tmp_path):
    from mxq.report import main

    _, root, base, noisy = sweep
    paths = main([str(root), "--out", str(tmp_path)])
    assert {p.name for p in paths.values()} == {"ablation.md", "ablation.csv", "pareto.png", "ablation_tasks.csv",
                                                "ablation_paired.csv"}
    rows = {r["label"]: r for r in csv.DictReader(io.StringIO((tmp_path / "ablation.csv").read_text()))}
    assert set(rows) == {"baseline", "mxfp4_noise"}
    assert float(rows["baseline"]["d_ppl_mean"]) == 0.0
    want = noisy["accuracy"]["perplexity"]["mean"] - base["accuracy"]["perplexity"]["mean"]
    assert float(rows["mxfp4_noise"]["d_ppl_mean"]) == pytest.approx(want)
    md = (tmp_path / "ablation.md").read_text()
    assert "## lm-eval per task" in md and "d[mxfp4_noise]" in md and "## Deltas vs baseline" in md
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    # paired on the same token blocks: the noisy variant's KL is above the baseline's 0 beyond the noise
    assert float(rows["mxfp4_noise"]["kl_mean_ci_low"]) > 0 and float(rows["mxfp4_noise"]["kl_mean_p"]) < 0.05
    lo, hi = float(rows["baseline"]["ppl_mean_lo"]), float(rows["baseline"]["ppl_mean_hi"])
    assert lo < base["accuracy"]["perplexity"]["mean"] < hi


def test_notebook_executes(sweep, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    _, root, _, _ = sweep
    monkeypatch.setenv("MXQ_RUN_DIR", str(root / "1_mxfp4_noise"))
    monkeypatch.setenv("MXQ_SWEEP_DIR", str(root))
    nb = nbformat.read(Path(__file__).resolve().parents[1] / "notebooks" / "explore_run.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 4                     # memory, router heatmap, KL histogram, Pareto
