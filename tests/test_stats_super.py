"""Super experts (Su et al., arXiv 2507.23279) are found; experts with no token are reported, not zeroed."""
from __future__ import annotations

import json
import math

import pytest
import torch

import mxq
from mxq.calib import build_calibration
from mxq.stats import RouterStats, SuperExpertConfig, collect, find_super_experts, write_report

CALIB = {"source": "corpus", "num_sequences": 4, "seq_len": 32, "seed": 3}
PLANT_CHANNEL = 7



@pytest.fixture(scope="module")
def planted(make_ckpt):
    """Stats of the untouched model, then of the same model with one expert given a huge output on one
    channel (its down_bias) and another expert made unreachable (router bias -1e4)."""
    path = make_ckpt("mxfp4")
    model = mxq.load_model(path, dtype=torch.float32)
    calib = build_calibration(CALIB, mxq.load_tokenizer(path))
    before = collect(model, calib, batch_size=4, progress=False)
    hot = int(before.freq[0].argmax())
    dead = int(before.freq[1].argmin())
    with torch.no_grad():
        model.layers[0].mlp.experts.down_bias[hot, PLANT_CHANNEL] = 1e3
        model.layers[1].mlp.router.bias[dead] = -1e4
    after = collect(model, calib, batch_size=4, progress=False)
    return before, after, hot, dead


def test_planted_expert_is_the_super_expert(planted):
    before, after, hot, _ = planted
    assert (0, hot) not in before.super_experts
    assert after.super_experts == [(0, hot)]
    assert after.max_act[0, hot] > 900
    assert int(after.max_act_channel[0, hot].argmax()) == PLANT_CHANNEL
    assert after.super_threshold < after.max_act[0, hot].item()


def test_expert_without_tokens_is_uncalibrated_not_unimportant(planted, tmp_path):
    _, after, _, dead = planted
    assert after.uncalibrated[1, dead] and int(after.uncalibrated.sum()) == 1
    assert after.freq[1, dead] == 0 and after.gate_mass[1, dead] == 0
    for name in ("reap", "max_act"):
        assert math.isnan(after.score(name)[1, dead].item())
    assert torch.isnan(after.max_act_channel[1, dead]).all()
    assert (1, dead) not in after.super_experts
    after.save(tmp_path)
    summary = json.loads((tmp_path / "router_stats.json").read_text())
    assert summary["uncalibrated"] == [[1, dead]]
    assert summary["super_experts"] == [list(x) for x in after.super_experts]
    for d in after.domains:  # per domain too: no domain saw it
        assert after.by_domain[d]["uncalibrated"][1, dead]
    text = write_report(RouterStats.load(tmp_path), tmp_path).read_text()
    assert f"L1E{dead}" in text


def test_criterion_percentile_ratio_and_layers():
    m = torch.ones(4, 8, dtype=torch.float64)
    unc = torch.zeros(4, 8, dtype=torch.bool)
    m[0, 2], m[1, 5], m[3, 1] = 50.0, 40.0, 100.0          # layer 3 is outside the first 75%
    found, thr = find_super_experts(m, unc, SuperExpertConfig())
    assert found == [(0, 2)]                                # p99.5 of 24 values lies between 40 and 50
    assert 40.0 < thr < 50.0
    found, _ = find_super_experts(m, unc, SuperExpertConfig(percentile=90.0))
    assert found == [(0, 2), (1, 5)]
    found, _ = find_super_experts(m, unc, SuperExpertConfig(layers_fraction=1.0))
    assert found == [(3, 1)]                                # 50 is not above p99.5 once 100 is included
    found, _ = find_super_experts(m, unc, SuperExpertConfig(percentile=0.0, ratio=0.45, layers_fraction=1.0))
    assert found == [(0, 2), (3, 1)]                        # ratio: > 0.45 * 100
    unc[0, 2] = True
    m[0, 2] = float("nan")
    assert find_super_experts(m, unc, SuperExpertConfig())[0] == [(1, 5)]


def test_config_from_recipe_values():
    assert SuperExpertConfig.from_cfg(None) == SuperExpertConfig()
    assert SuperExpertConfig.from_cfg({"percentile": 99, "protect": "bf16"}).percentile == 99.0
    assert SuperExpertConfig(layers_fraction=0.75).num_layers(24) == 18
    assert SuperExpertConfig(layers_fraction=0.75).num_layers(2) == 2
    with pytest.raises(ValueError, match="layers_fraction"):
        SuperExpertConfig(layers_fraction=0.0)
