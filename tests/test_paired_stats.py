"""Intervals and paired comparisons on synthetic per-unit values (no model runs): the value of a ratio
metric, interval coverage, the Wilson interval of accuracies, planted vs null differences, unit
alignment checks, and the ablation report over three fake run folders (baseline, a planted difference, a
null difference) plus a calibration-seed pair."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mxq.evaluate import per_doc
from mxq.evaluate.intervals import Settings, Units, interval, paired_difference, spread
from mxq.evaluate.paired import NOISE, verdict

S = Settings(n_resamples=1000, seed=0)


def _nll(rng: np.random.Generator, n: int = 120, tokens: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per-block NLL sums with a large between-block spread (hard and easy text) and block token counts."""
    per_tok = rng.gamma(4.0, 1.0, n)                       # mean NLL of each block, nats: 1 .. 10
    return per_tok * tokens, np.full(n, float(tokens))


def test_ratio_value_and_interval_cover_the_point():
    rng = np.random.default_rng(1)
    num, den = _nll(rng)
    u = Units(num, den, "exp")
    assert u.value() == pytest.approx(math.exp(num.sum() / den.sum()))
    lo, hi = interval(u, S)
    assert lo < u.value() < hi and hi / lo < 2.0
    assert interval(Units(num[:1], den[:1], "exp"), S) is None                 # one unit: no interval
    same = Units(np.full(10, 3.0), np.ones(10))
    assert interval(same, S) == (3.0, 3.0)                                      # degenerate, not NaN


def test_accuracy_gets_wilson_interval_even_at_zero():
    lo, hi = interval(Units.mean([0] * 8), S)
    assert lo == 0.0 and 0.25 < hi < 0.40                                       # Wilson 0/8: [0, 0.324]
    lo, hi = interval(Units.mean([1] * 30 + [0] * 70), S)
    assert lo < 0.3 < hi


def test_planted_difference_is_found_and_null_is_noise():
    rng = np.random.default_rng(2)
    num, den = _nll(rng)
    base = Units(num, den, "exp", tuple(f"d:{i}" for i in range(len(num))))
    # planted: +0.1 nats per token everywhere, with per-block noise of the same size
    worse = Units(num + den * (0.1 + rng.normal(0, 0.1, len(num))), den, "exp", base.ids)
    # null: per-block noise only, mean zero by construction (antithetic pairs)
    eps = rng.normal(0, 0.1, len(num) // 2)
    null = Units(num + den * np.concatenate([eps, -eps]), den, "exp", base.ids)
    c = paired_difference(worse, base, S)
    assert c.significant and c.p < 0.01 and c.ci_low > 0 and verdict(c, "ppl_mean") == "worse"
    assert c.delta == pytest.approx(worse.value() - base.value())
    n = paired_difference(null, base, S)
    assert not n.significant and n.p > 0.05 and n.ci_low < 0 < n.ci_high and verdict(n, "ppl_mean") == NOISE
    # unpaired intervals of the planted pair overlap: only the paired test sees the difference
    (_, base_hi), (worse_lo, _) = interval(base, S), interval(worse, S)
    assert worse_lo < base_hi
    # accuracy: 40 more items right out of 400 is "better"; higher is better for acc
    a0 = rng.random(400) < 0.5
    a1 = a0.copy()
    a1[np.flatnonzero(~a0)[:40]] = True
    c = paired_difference(Units.mean(a1.astype(float)), Units.mean(a0.astype(float)), S)
    assert verdict(c, "tiny_cloze_austen.acc") == "better"
    same = paired_difference(base, base, S)
    assert same.delta == 0 and same.p == 1.0 and verdict(same, "ppl_mean") == NOISE


def test_pairing_refuses_different_units():
    a = Units(np.ones(4), np.array([1.0, 2, 3, 4]), "exp", ("a", "b", "c", "d"))
    with pytest.raises(ValueError, match="3 units"):
        paired_difference(a, Units(np.ones(3), np.ones(3)), S)
    with pytest.raises(ValueError, match="unit 1 differs"):
        paired_difference(a, Units(np.ones(4), a.den, "exp", ("a", "x", "c", "d")), S)
    with pytest.raises(ValueError, match="denominators"):
        paired_difference(a, Units(np.ones(4), np.ones(4), "exp", a.ids), S)


def test_heldout_blocks_sum_tokens_per_domain():
    dom = torch.tensor([0, 0, 0, 1, 1])
    pos = torch.tensor([1, 2, 3, 1, 2])               # target positions inside each domain's sequence
    nll = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    h = per_doc.heldout_units(["a", "b"], dom, pos, nll, block_tokens=2)
    assert h["ids"] == ["a:0", "a:1", "b:0"] and h["tokens"] == [2, 1, 2] and h["nll"] == [3.0, 3.0, 9.0]
    u = per_doc.heldout_metric(h, "perplexity", "b")
    assert u.value() == pytest.approx(math.exp(4.5))


def test_spread_of_repeats():
    sp = spread([10.0, 12.0, None, 14.0])
    assert sp["n"] == 3 and sp["median"] == 12.0 and sp["min"] == 10.0 and sp["std"] == pytest.approx(2.0)


# ------------------------------------------------------------------------------------- ablation report
def _fake_run(folder: Path, name: str, nll: np.ndarray, tokens: np.ndarray, acc: np.ndarray, seed: int = 0,
              criterion: str = "reap") -> None:
    folder.mkdir(parents=True)
    ids = [f"austen:{i}" for i in range(len(nll))]
    ppl = math.exp(nll.sum() / tokens.sum())
    metrics = {"recipe": {"name": name, "prune": {"criterion": criterion}}, "memory": {"weight_bytes": 1000},
               "speed": {"decode_tokens_per_s": 10.0},
               "accuracy": {"perplexity": {"austen": ppl, "mean": ppl}, "kl_vs_baseline": None,
                            "lm_eval": {"tasks": {"tiny_cloze_austen": {"acc": float(acc.mean())}}}}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "resolved_config.yaml").write_text(f"calib:\n  seed: {seed}\n")
    per_doc.write(folder, {
        "heldout": {"block_tokens": 32, "ids": ids, "domain": ["austen"] * len(ids), "tokens": tokens.tolist(),
                    "nll": nll.tolist(), "kl": None, "top1": None},
        "lm_eval": {"tiny_cloze_austen": {"doc_id": list(range(len(acc))), "metrics": {
            "acc": {"aggregation": "mean", **Units.mean(acc).to_json()}}}}})


def test_ablation_report_classifies_planted_and_null(tmp_path, capsys):
    from mxq.report import main

    rng = np.random.default_rng(3)
    nll, tokens = _nll(rng, 80)
    acc = (rng.random(200) < 0.4).astype(float)
    eps = rng.normal(0, 0.1, 40)
    _fake_run(tmp_path / "0_baseline", "baseline", nll, tokens, acc)
    _fake_run(tmp_path / "1_planted", "planted", nll + tokens * (0.15 + rng.normal(0, 0.1, 80)), tokens,
              np.where(rng.random(200) < 0.3, 0.0, acc))
    _fake_run(tmp_path / "2_null", "null", nll + tokens * np.concatenate([eps, -eps]), tokens, acc)
    _fake_run(tmp_path / "3_null_s1", "null", nll + tokens * np.concatenate([-eps, eps]), tokens, acc, seed=1)
    paths = main([str(tmp_path), "--out", str(tmp_path / "report"), "--resamples", "1000",
                  "--pair", "planted:null/s0"])
    rows = {r["label"]: r for r in csv.DictReader(io.StringIO(paths["csv"].read_text()))}
    assert set(rows) == {"baseline", "planted", "null/s0", "null/s1"}
    for col in ("ppl_mean_delta", "ppl_mean_ci_low", "ppl_mean_ci_high", "ppl_mean_p",
                "tiny_cloze_austen.acc_delta", "tiny_cloze_austen.acc_p"):
        assert col in rows["planted"]
    assert float(rows["planted"]["ppl_mean_ci_low"]) > 0 and float(rows["planted"]["ppl_mean_p"]) < 0.01
    assert float(rows["planted"]["tiny_cloze_austen.acc_ci_high"]) < 0
    assert float(rows["null/s0"]["ppl_mean_ci_low"]) < 0 < float(rows["null/s0"]["ppl_mean_ci_high"])
    assert float(rows["null/s0"]["tiny_cloze_austen.acc_delta"]) == 0.0
    long = list(csv.DictReader(io.StringIO(paths["paired_csv"].read_text())))
    v = {(r["variant"], r["reference"], r["metric"]): r["verdict"] for r in long}
    assert v[("planted", "baseline", "ppl_mean")] == "worse" and v[("null/s0", "baseline", "ppl_mean")] == NOISE
    assert v[("planted", "null/s0", "ppl_mean")] == "worse"                    # the asked-for extra pair
    seeds = list(csv.DictReader(io.StringIO(paths["seeds_csv"].read_text())))
    assert [(s["group"], s["seeds"], s["n"]) for s in seeds] == [("null", "0,1", "2")]
    md = paths["md"].read_text()
    assert "## Paired differences" in md and "## Calibration seeds" in md
    out = capsys.readouterr().out
    assert "worse" in out and NOISE in out
    tables = [line for line in out.splitlines() if not line.endswith((".md", ".csv", ".png"))]  # not the paths
    assert max(len(line) for line in tables) <= 80                              # readable in 80 columns


def test_lmeval_samples_become_ratio_units_matching_lm_eval():
    """Per-document values reproduce lm-eval's aggregate of each metric (mean, perplexity, word perplexity,
    bits per byte), so intervals are built around exactly the reported number."""
    ll = [-3.0, -5.0, -4.0]
    rows = [{"doc_id": i, "acc": a, "perplexity": x, "word_perplexity": (x, w), "bits_per_byte": (x, 4 * w)}
            for i, (a, x, w) in reversed(list(enumerate(zip([1, 0, 1], ll, [2, 3, 1]))))]
    cfg = {"metric_list": [{"metric": "perplexity", "aggregation": "perplexity"}, {"metric": "acc"}]}
    t = per_doc.lmeval_units({"t": rows}, {"t": cfg}, {"t": ["acc", "perplexity", "word_perplexity",
                                                             "bits_per_byte"]})["t"]
    assert t["doc_id"] == [0, 1, 2]
    val = {m: per_doc.lmeval_metric(t, m).value() for m in t["metrics"]}
    assert val["acc"] == pytest.approx(2 / 3)
    assert val["perplexity"] == pytest.approx(math.exp(4.0))                    # exp(-mean loglik)
    assert val["word_perplexity"] == pytest.approx(math.exp(12.0 / 6))          # exp(-sum ll / sum words)
    assert val["bits_per_byte"] == pytest.approx(12.0 / 24 / math.log(2))
    assert {m: d["aggregation"] for m, d in t["metrics"].items()} == {
        "acc": "mean", "perplexity": "perplexity", "word_perplexity": "weighted_perplexity",
        "bits_per_byte": "bits_per_byte"}


def test_labels_name_what_differs_and_group_seeds():
    from mxq.evaluate.seeds import group_of, labels

    def run(name, crit, seed, d):
        return {"recipe": name, "dir": Path(d), "config": {"calib": {"seed": seed}},
                "metrics": {"recipe": {"name": name, "prune": {"criterion": crit, "fraction": 0.5}}}}

    runs = [run("baseline", "reap", 0, "a"), run("prune_50pct", "reap", 0, "b"), run("prune_50pct", "reap", 1, "c"),
            run("prune_50pct", "frequency", 0, "d"), run("mxfp4", "reap", 0, "e"), run("mxfp4", "reap", 0, "f")]
    got = labels(runs)
    assert got == ["baseline", "prune_50pct/reap/s0", "prune_50pct/reap/s1", "prune_50pct/frequency/s0",
                   "mxfp4 [e]", "mxfp4 [f]"]
    assert group_of(got[1]) == group_of(got[2]) == "prune_50pct/reap" != group_of(got[3])
