"""collect_or_load computes once per (model bytes, calibration tokens); files round-trip; outputs exist."""
from __future__ import annotations

import importlib
import json
import logging

import pytest
import torch

import mxq
from mxq.stats import RouterStats, collect_or_load, model_hash, write_report

collect_mod = importlib.import_module("mxq.stats.collect")  # the module (mxq.stats.collect is the function)

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 40



@pytest.fixture(scope="module")
def setup(make_ckpt):
    path = make_ckpt("mxfp4")
    return path, mxq.load_model(path, dtype=torch.float32), mxq.load_tokenizer(path)


def files_cfg(tmp_path, text_a: str) -> dict:
    (tmp_path / "alpha.txt").write_text(text_a)
    (tmp_path / "beta.jsonl").write_text("\n".join(json.dumps({"body": f"Verse {i}. " + TEXT[:300]})
                                                   for i in range(20)))
    return {"source": "files", "paths": [str(tmp_path / "alpha.txt"), str(tmp_path / "beta.jsonl")],
            "text_field": "body", "num_sequences": 4, "seq_len": 24}


def test_second_run_hits_the_cache_and_changed_data_misses(setup, tmp_path, monkeypatch, caplog):
    path, model, tok = setup
    cache = tmp_path / "cache"
    cfg = files_cfg(tmp_path, TEXT)
    with caplog.at_level(logging.INFO, logger="mxq.stats"):
        first = collect_or_load(model, tok, cfg, tmp_path / "run1", cache, 2, plots=False, progress=False)
    assert first.meta["cache"] == "miss" and "cache miss" in caplog.text
    assert first.domains == ["alpha", "beta"] and first.model_hash == model_hash(path, cache / "model_hashes.json")

    calls = []
    real = collect_mod.collect
    monkeypatch.setattr(collect_mod, "collect", lambda *a, **k: calls.append(1) or real(*a, **k))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mxq.stats"):
        second = collect_or_load(model, tok, cfg, tmp_path / "run2", cache, 2, progress=False)
    assert calls == [] and second.meta["cache"] == "hit" and "cache hit" in caplog.text
    assert torch.equal(first.freq, second.freq) and torch.equal(first.coselect, second.coselect)
    for f in ("router_stats.json", "router_stats.safetensors", "router_freq.png", "super_experts.png",
              "domain_specialisation.png"):
        assert (tmp_path / "run2" / f).stat().st_size > 0

    changed = files_cfg(tmp_path, TEXT.replace("fortune", "estate"))       # same config, other bytes
    third = collect_or_load(model, tok, changed, tmp_path / "run3", cache, 2, plots=False, progress=False)
    assert calls == [1] and third.meta["cache"] == "miss"
    again = collect_or_load(model, tok, {**changed, "seed": 1}, tmp_path / "run4", cache, 2, plots=False,
                            progress=False)
    assert calls == [1, 1] and again.meta["cache"] == "miss"


def test_save_load_round_trip_and_report(setup, tmp_path):
    _, model, tok = setup
    stats = collect_or_load(model, tok, files_cfg(tmp_path, TEXT), tmp_path / "run", tmp_path / "cache", 4,
                            plots=False, progress=False)
    back = RouterStats.load(tmp_path / "run")
    for k in ("freq", "gate_mass", "reap", "ean", "max_act", "max_act_channel", "coselect", "uncalibrated"):
        assert torch.equal(getattr(stats, k).nan_to_num(-1), getattr(back, k).nan_to_num(-1)), k
        for d in stats.domains:
            assert torch.equal(stats.by_domain[d][k].nan_to_num(-1), back.by_domain[d][k].nan_to_num(-1))
    assert (back.tokens, back.domains, back.super_experts) == (stats.tokens, stats.domains, stats.super_experts)
    assert back.calib_config == stats.calib_config and back.model_hash == stats.model_hash
    summary = json.loads((tmp_path / "run" / "router_stats.json").read_text())
    assert {"super_experts", "uncalibrated", "layers", "tokens", "calib_config", "model_hash"} <= set(summary)
    assert summary["tokens"] == stats.tokens == sum(summary["domain_tokens"].values())
    assert len(summary["layers"]) == 2 and summary["layers"][0]["cv"] >= 0
    assert set(summary["by_domain"]) == {"alpha", "beta"} and len(summary["by_domain"]["beta"]["cv"]) == 2
    beta = back.for_domain("beta")
    assert beta.tokens == stats.domain_tokens["beta"] and torch.equal(beta.freq, stats.by_domain["beta"]["freq"])
    for name in ("reap", "frequency", "gate_mass", "ean"):
        assert back.score(name).shape == (2, 32)
    with pytest.raises(KeyError):
        back.score("nope")
    md = write_report(back, tmp_path / "run").read_text()
    assert "## Super experts" in md and "| layer | cv |" in md and "alpha" in md


def test_model_hash_is_memoised_and_tracks_content(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"a" * 1000)
    memo = tmp_path / "memo.json"
    h1 = model_hash(tmp_path, memo)
    assert len(json.loads(memo.read_text())) == 2
    assert model_hash(tmp_path, memo) == h1
    (tmp_path / "model.safetensors").write_bytes(b"b" * 1001)
    assert model_hash(tmp_path, memo) != h1
