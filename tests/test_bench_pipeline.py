"""bench/pipeline.py's table builder on fake run folders (the files ``python -m mxq.run`` writes), its failure
and budget rows, and the override handling of its command line (runs replaced by fakes: no subprocess)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bp():
    spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "bench" / "pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_run(folder: Path, recipe: str, *, path: str = "mxq-triton-cudagraph", reason: str | None = None,
             export: str | None = "hf", stats: str | None = "miss") -> Path:
    folder.mkdir(parents=True)
    timings = {"load": 9.5, "validate": 0.01, "stats": 14.2, "plan_build": 0.3, "plan_apply": 1.2,
               "plan_export": 21.0, "plan": 22.5, "generate": 3.1, "evaluate": 61.0, "outputs": 2.0}
    (folder / "run_meta.json").write_text(json.dumps({
        "env": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "cuda": "13.0"}, "timings_s": timings,
        "wall_s": 112.3, "gpu_peak_allocated_bytes": {"load": 13_800_000_000, "stats": 21_500_000_000,
                                                      "evaluate": 27_900_000_000},
        "calib_tokens": 131072 if stats else None}))
    (folder / "metrics.json").write_text(json.dumps({
        "recipe": {"name": recipe}, "model": {"num_local_experts": 24},
        "memory": {"weight_bytes": 10_400_000_000, "bits_per_expert_weight": 4.25,
                   "peak": {"peak_allocated_bytes": 15_000_000_000}},
        "speed": {"decode_tokens_per_s": 231.5, "ttft_s": 0.138, "headline": "greedy@2048", "code_path": path,
                  "fallback_reason": reason, "peak_allocated_bytes": 14_600_000_000,
                  "by_setting": {"greedy@2048": {"decode_tokens_per_s": 231.5, "ttft_s": 0.138},
                                 "sample@2048": {"decode_tokens_per_s": 220.0, "ttft_s": 0.140}}},
        "precision": {"expert_formats": {"mxfp4": 576}},
        "accuracy": {"perplexity": {"mean": 201000.0}, "kl_vs_baseline": {"mean": 0.12}},
        "eval": {"timings_s": {"memory": 4.0, "speed": 40.0, "accuracy": 17.0}}}))
    if stats:
        (folder / "router_stats.json").write_text(json.dumps(
            {"tokens": 131072, "meta": {"cache": stats, "seconds": 9.8, "tokens_per_s": 13374.7}}))
    if export:
        m = folder / "model"
        m.mkdir()
        (m / "model-00001-of-00001.safetensors").write_bytes(b"x" * 1000)
        if export == "mxq":
            (m / "mxq_manifest.json").write_text("{}")
    return folder


def test_collect_run_reads_every_column(bp, tmp_path):
    row = bp.collect_run(fake_run(tmp_path / "prune", "prune_25pct"))
    assert row["status"] == "ok" and row["recipe"] == "prune_25pct"
    assert row["timings_s"]["stats"] == 14.2 and row["timings_s"]["plan_export"] == 21.0
    assert row["pipeline_s"] == 112.3 and row["calib_tokens"] == 131072 and row["calib_cache"] == "miss"
    assert row["peak_gpu_bytes"] == 27_900_000_000                       # the largest of stages, probe, sweep
    assert row["decode_tokens_per_s"] == 231.5 and row["code_path"] == "mxq-triton-cudagraph"
    assert row["export_bytes"] == 1000 and row["export_layout"] == "hf"
    assert row["device"].startswith("NVIDIA H100")


def test_markdown_table_and_notes(bp, tmp_path):
    runs = [bp.collect_run(fake_run(tmp_path / "a", "prune_25pct")),
            bp.collect_run(fake_run(tmp_path / "b", "mixed_budget", path="mxq-torch-reference",
                                    reason="UnsupportedModel: expert 1 gate_up is not a view of the stacked buffer",
                                    export="mxq", stats="hit")),
            bp.collect_run(tmp_path / "never_ran", "baseline",
                           {"status": "failed (exit 1)", "error": "CUDA out of memory", "wall_s": 3.0}),
            {"recipe": "extra", "status": "skipped (budget spent)"}]
    md = bp.markdown({"source_desc": "synthetic gpt-oss-20b, 13.76 GB", "synth_s": 24.8, "runs": runs,
                      "device": runs[0]["device"], "command": "python -m mxq.run ..."})
    lines = md.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("| recipe"))
    assert lines[head].count("|") == lines[head + 1].count("|") == lines[head + 2].count("|") == 16
    prune = lines[head + 2]
    for needle in ("prune_25pct", "| ok |", "22.5 (0.3/1.2/21.0)", "61.0 (4/40/17)", "112.3",
                   "131,072 (miss, 9.8 s)", "27.90", "231.5 (mxq-triton-cudagraph)", "138.0", "10.40", "0.00 (hf)"):
        assert needle in prune, needle
    mixed = lines[head + 3]
    assert "131,072 (hit)" in mixed and "(mxq-torch-reference)" in mixed and "(mxq)" in mixed
    failed = lines[head + 4]
    assert "failed (exit 1)" in failed and failed.count(" - ") >= 10
    assert "skipped (budget spent)" in lines[head + 5]
    assert "mixed_budget: speed measured on `mxq-torch-reference`: UnsupportedModel: expert 1" in md
    assert "baseline: failed (exit 1): CUDA out of memory" in md
    assert "greedy@2048 231.5 tok/s, sample@2048 220.0 tok/s" in md
    assert "NVIDIA H100" in md and "24.8 s" in md


def test_main_runs_each_recipe_with_the_overrides_and_writes_as_it_goes(bp, tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    seen = []

    def fake(recipe, src_, work, overrides, cache, timeout, keep_export, device="cuda"):
        seen.append((recipe, overrides, cache, device))
        if recipe == "mixed_budget":            # the table must already hold the first recipe
            assert "prune_25pct" in (tmp_path / "out.md").read_text()
        return bp.collect_run(fake_run(work / "runs" / recipe, recipe), recipe, {"status": "ok", "wall_s": 120.0})

    monkeypatch.setattr(bp, "run_recipe", fake)
    bp.main(["--work", str(tmp_path / "w"), "--model", str(src), "--set", "eval.speed.contexts=[128]",
             "--set", "calib.num_sequences=128", "--md", str(tmp_path / "out.md"), "--json", str(tmp_path / "o.json")])
    assert [s[0] for s in seen] == ["prune_25pct", "mixed_budget", "baseline"]
    ov = seen[0][1]
    assert "eval.speed.contexts=[128]" in ov and "eval.speed.contexts=[2048]" not in ov
    assert "calib=large" in ov and "calib.num_sequences=128" in ov and "eval=speed" in ov
    assert len({s[2] for s in seen}) == 1                                 # one shared cache
    out = json.loads((tmp_path / "o.json").read_text())
    assert [r["recipe"] for r in out["runs"]] == ["prune_25pct", "mixed_budget", "baseline"]
    assert out["device"].startswith("NVIDIA H100") and out["total_s"] >= 0

    seen.clear()
    bp.main(["--work", str(tmp_path / "w2"), "--model", str(src), "--recipes", "prune_25pct,baseline",
             "--cache", "fresh", "--budget-s", "0", "--md", str(tmp_path / "out2.md")])
    assert not seen and "skipped (budget spent)" in (tmp_path / "out2.md").read_text()
