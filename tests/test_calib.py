"""Calibration sets: deterministic windows of the model's own tokens, equal domain shares, clear errors."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import mxq
from mxq.calib import CalibConfig, CalibError, build_calibration
from mxq.data.corpus import DOMAINS, load_text

CALIB_DIR = Path(__file__).resolve().parents[1] / "recipes" / "calib"



@pytest.fixture(scope="module")
def tok(make_ckpt):
    return mxq.load_tokenizer(make_ckpt("mxfp4"))


@pytest.fixture(scope="module")
def corpus_set(tok):
    return build_calibration({"source": "corpus", "num_sequences": 10, "seq_len": 64, "seed": 0}, tok)


def test_corpus_windows_are_real_text_in_equal_shares(tok, corpus_set):
    cs = corpus_set
    assert cs.input_ids.shape == cs.attention_mask.shape == (10, 64) and cs.input_ids.dtype == torch.long
    assert bool(cs.attention_mask.all()) and cs.num_tokens == 640
    assert cs.domain_names == list(DOMAINS)
    counts = [cs.domains.count(d) for d in DOMAINS]
    assert counts == [3, 3, 2, 2]                              # equal shares, remainder to the first domains
    for row, dom in ((0, cs.domains[0]), (9, cs.domains[9])):
        assert tok.decode(cs.input_ids[row]) in load_text(dom, "calib")
    assert len({tuple(r) for r in cs.input_ids.tolist()}) == 10


def test_deterministic_for_a_config_and_seed_sensitive(tok, corpus_set):
    again = build_calibration({"source": "corpus", "num_sequences": 10, "seq_len": 64, "seed": 0}, tok)
    assert torch.equal(again.input_ids, corpus_set.input_ids) and again.config_hash == corpus_set.config_hash
    other = build_calibration({"source": "corpus", "num_sequences": 10, "seq_len": 64, "seed": 1}, tok)
    assert not torch.equal(other.input_ids, corpus_set.input_ids) and other.config_hash != corpus_set.config_hash


def test_domain_subset_and_split(tok):
    cs = build_calibration({"source": "corpus", "domains": ["austen"], "split": "heldout", "num_sequences": 2,
                            "seq_len": 32}, tok)
    assert cs.domains == ["austen", "austen"]
    assert tok.decode(cs.input_ids[0]) in load_text("austen", "heldout")


def test_files_source_txt_jsonl_and_padding(tok, tmp_path, caplog):
    (tmp_path / "long.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200)
    (tmp_path / "short.jsonl").write_text("\n".join(json.dumps({"body": w}) for w in ("Hello there.", "Bye.")))
    cfg = {"source": "files", "paths": [str(tmp_path / "long.txt"), str(tmp_path / "short.jsonl")],
           "text_field": "body", "num_sequences": 4, "seq_len": 32}
    with caplog.at_level(logging.WARNING, logger="mxq.calib"):
        cs = build_calibration(cfg, tok)
    assert cs.domains == ["long", "long", "short"]             # the short file gives one padded window
    assert "only" in caplog.text
    n = int(cs.attention_mask[2].sum())
    assert 0 < n < 32 and not cs.attention_mask[2, n:].any()  # right padding
    assert (cs.input_ids[2, n:] == tok.pad_token_id).all()
    assert tok.decode(cs.input_ids[2, :n]) == "Hello there.\n\nBye."
    with pytest.raises(CalibError, match="no field 'text'"):
        build_calibration({**cfg, "text_field": "text"}, tok)


@pytest.mark.parametrize("cfg, match", [
    ({"source": "web"}, "calib.source"),
    ({"source": "files"}, "calib.paths"),
    ({"source": "hf"}, "calib.dataset"),
    ({"source": "corpus", "domains": ["klingon"]}, "unknown corpus domain"),
    ({"source": "corpus", "split": "test"}, "not a corpus split"),
    ({"source": "corpus", "num_sequences": 2}, "less than the 4 domains"),
    ({"source": "corpus", "nmu_sequences": 2}, "unknown calib keys: nmu_sequences"),
    ({"source": "files", "paths": ["/nonexistent/x.txt"]}, "does not exist"),
])
def test_bad_configs_fail_with_the_field_named(tok, cfg, match):
    with pytest.raises(CalibError, match=match):
        build_calibration(cfg, tok)


def test_recipe_group_files_parse():
    assert {p.stem for p in CALIB_DIR.glob("*.yaml")} >= {"tiny_mixed", "files", "hf", "large"}
    default = CalibConfig.from_cfg(OmegaConf.load(CALIB_DIR / "tiny_mixed.yaml"))
    assert (default.source, default.domains, default.num_sequences, default.seq_len) == ("corpus", "all", 64, 256)
    large = CalibConfig.from_cfg(OmegaConf.load(CALIB_DIR / "large.yaml"))
    assert large.num_sequences * large.seq_len == 131072
    for name, key in (("files", "paths"), ("hf", "dataset")):
        with pytest.raises(CalibError, match=f"unset.*{key}"):
            CalibConfig.from_cfg(OmegaConf.load(CALIB_DIR / f"{name}.yaml"))
    hf = CalibConfig.from_cfg(OmegaConf.merge(OmegaConf.load(CALIB_DIR / "hf.yaml"), {"dataset": "x/y"}))
    assert (hf.source, hf.split, hf.text_field) == ("hf", "train", "text")


@pytest.mark.parametrize("offline", [True, False])
def test_hf_without_network_fails_fast_and_clearly(tok, monkeypatch, offline):
    """Offline flag set after import (the hard case), or no flag and an endpoint that refuses connections."""
    import mxq.calib.hf as hf

    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setattr(hf, "hub_endpoint", lambda: "http://127.0.0.1:9")
    t0 = time.perf_counter()
    with pytest.raises(CalibError, match="hub cannot be reached"):
        build_calibration({"source": "hf", "dataset": "mxq-test/surely-not-cached-dataset", "split": "train"}, tok)
    assert time.perf_counter() - t0 < 10


def test_hf_local_dataset_folder(tok, tmp_path):
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({"text": f"Line {i} of a local dataset. " * 5})
                                                     for i in range(30)))
    cs = build_calibration({"source": "hf", "dataset": str(tmp_path), "split": "train", "num_sequences": 2,
                            "seq_len": 16}, tok)
    assert cs.domains == [tmp_path.name] * 2 and bool(cs.attention_mask.all())
