"""Planners: prune by every criterion (same count per layer, super experts protected, uncalibrated experts
pruned first and noted), uniform, mixed precision under a budget (MILP never worse than greedy on the
real error table), prune-then-quantize."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import mxq
from mxq.formats import get_format
from mxq.plan import PlanError, build_plan
from mxq.formats.convert import relative_errors


@dataclass
class FakeStats:
    """Stand-in with the fields of mxq.stats.RouterStats (NaN REAP where uncalibrated)."""
    num_layers: int
    num_experts: int
    seed: int = 0
    super_experts: list = field(default_factory=list)
    uncal: tuple = ()

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        shape = (self.num_layers, self.num_experts)
        self.uncalibrated = np.zeros(shape, bool)
        for l, e in self.uncal:
            self.uncalibrated[l, e] = True
        self.freq = np.where(self.uncalibrated, 0.0, rng.random(shape))
        self.gate_mass = self.freq * rng.random(shape)
        self.reap = np.where(self.uncalibrated, np.nan, rng.random(shape))
        self.ean = np.where(self.uncalibrated, 0.0, rng.random(shape))
        self.max_act = rng.random(shape)
        self.tokens = 1000

    def score(self, name):
        return {"reap": self.reap, "frequency": self.freq, "gate_mass": self.gate_mass, "ean": self.ean}[name]


@pytest.fixture(scope="module")
def model(make_ckpt):
    """12 experts per layer, top-4."""
    return mxq.load_model(make_ckpt("mxfp4", num_local_experts=12), dtype=torch.float32)


@pytest.fixture(scope="module", autouse=True)
def memo_errors():
    """Measure each (model, experts, menu) error table once in this module (milp and greedy share it)."""
    import mxq.plan.planners as planners

    orig, cache = planners.measure_errors, {}

    def measure(model, kept, menu):
        key = (id(model), tuple(map(tuple, kept)), tuple(menu))
        if key not in cache:
            cache[key] = orig(model, kept, menu)
        return cache[key]

    planners.measure_errors = measure
    yield
    planners.measure_errors = orig


@pytest.fixture(scope="module")
def bf16_model(make_ckpt):
    """bf16 experts (every menu format has a real error), 8 experts per layer to keep measuring fast."""
    return mxq.load_model(make_ckpt("bf16", num_local_experts=8), dtype=torch.float32)


def prune(model, stats, **p):
    return build_plan({"planner": "prune", "stats": stats is not None, "prune": p}, stats, model)


@pytest.mark.parametrize("criterion", ["reap", "frequency", "gate_mass", "ean"])
def test_prune_drops_the_lowest_scores_in_every_layer(model, criterion):
    st = FakeStats(2, 12, seed=4)
    plan = prune(model, st, fraction=0.25, criterion=criterion)
    assert plan.num_kept == 9 and plan.formats_used() == {"mxfp4": 18}
    for i in range(2):
        want = sorted(np.argsort(st.score(criterion)[i], kind="stable")[:3].tolist())
        assert [e for l, e in plan.pruned() if l == i] == want


def test_super_experts_are_protected_unless_asked(model):
    st = FakeStats(2, 12, seed=1)
    weakest = [(i, int(np.argmin(st.reap[i]))) for i in range(2)]
    st.super_experts = weakest
    plan = prune(model, st, fraction=0.5)
    assert not set(weakest) & set(plan.pruned())
    assert any("super experts protected" in n for n in plan.notes)
    plan = prune(model, st, fraction=0.5, protect_super=False)
    assert set(weakest) <= set(plan.pruned())
    st.super_experts = [(0, e) for e in range(8)]
    with pytest.raises(PlanError, match="layer 0: 8 protected super experts leave 4 candidates, cannot prune 6"):
        prune(model, st, fraction=0.5)


def test_uncalibrated_experts_are_pruned_first_and_listed(model):
    st = FakeStats(2, 12, seed=2, uncal=((0, 9), (1, 10), (1, 11)))
    st.reap[0, 9] = 1e9                                   # a stale score must not save an uncalibrated expert
    plan = prune(model, st, fraction=0.25)
    assert {(0, 9), (1, 10), (1, 11)} <= set(plan.pruned())
    assert "layer 1 expert 10: uncalibrated (no calibration token), ranked least important, pruned" in plan.notes
    assert plan.info["prune"]["scores"][1][10] is None


def test_random_criterion_is_seeded_and_needs_no_statistics(model):
    a = prune(model, None, fraction=0.25, criterion="random", seed=7)
    b = prune(model, None, fraction=0.25, criterion="random", seed=7)
    c = prune(model, None, fraction=0.25, criterion="random", seed=8)
    assert a.pruned() == b.pruned() != c.pruned()
    assert "no router statistics: super experts unknown, none protected" in a.notes


def test_statistics_of_another_model_are_rejected(model):
    with pytest.raises(PlanError, match="router statistics are for 3 layers x 12 experts, the model has 2 x 12"):
        prune(model, FakeStats(3, 12), fraction=0.25)


def test_uniform_keep_is_the_identity_and_formats_apply_everywhere(model):
    keep = build_plan({"planner": "uniform", "quant": {"attention": "fp8"}}, None, model)
    assert keep.formats_used() == {"mxfp4": 24} and keep.attention == "fp8"
    nv = build_plan({"planner": "uniform", "quant": {"format": "nvfp4"}}, None, model)
    assert nv.formats_used() == {"nvfp4": 24} and nv.info["bytes"]["expert_bits"] > 4.5


MENU = ["fp8", "nvfp4", "nf4_dq"]


@pytest.mark.parametrize("scope", ["layer", "model"])
def test_mixed_meets_its_budget_and_milp_beats_greedy(bf16_model, scope):
    st = FakeStats(2, 8, seed=3, uncal=((0, 4),))
    r = {"planner": "mixed", "stats": True, "mixed": {"menu": MENU, "budget_bits": 5.0, "scope": scope}}
    milp = build_plan(r, st, bf16_model)
    greedy = build_plan({**r, "mixed": {**r["mixed"], "solver": "greedy"}}, st, bf16_model)
    for plan in (milp, greedy):
        assert plan.info["bytes"]["expert_bits"] <= 5.0
        used, budget = plan.info["mixed"]["used_bytes"], plan.info["mixed"]["budget_bytes"]
        assert all(u <= b for u, b in zip(used, budget))
    assert len(milp.formats_used()) >= 2                  # a real mix, not one format
    assert milp.info["mixed"]["objective"] <= greedy.info["mixed"]["objective"] + 1e-12
    assert any("layer 0 expert 4: uncalibrated, importance set to the layer minimum" in n for n in milp.notes)


def test_mixed_errors_are_measured_by_quantizing(bf16_model):
    r = {"planner": "mixed", "mixed": {"menu": MENU, "budget_bytes": 700_000, "importance": "uniform"}}
    plan = build_plan(r, None, bf16_model)
    assert sum(plan.info["mixed"]["used_bytes"]) <= 700_000 and len(plan.formats_used()) >= 2
    ex = bf16_model.layers[1].mlp.experts
    ws = [get_format("bf16").dequantize(ex.packed(k, 6)) for k in ("gate_up", "down")]
    errs = plan.info["mixed"]["errors"]["1.6"]
    assert [errs[f] for f in MENU] == pytest.approx(relative_errors(ws, "bf16", MENU))
    assert errs["fp8"] < errs["nvfp4"] and all(v > 0 for v in errs.values())


def test_mixed_on_mxfp4_source_prefers_the_lossless_source_format(model):
    """Relative to an MXFP4 source, keeping MXFP4 costs no error: a 4.25-bit budget keeps everything."""
    r = {"planner": "mixed", "mixed": {"menu": ["mxfp4", "nvfp4", "fp8"], "budget_bits": 4.25, "importance": "uniform"}}
    assert build_plan(r, None, model).formats_used() == {"mxfp4": 24}


def test_prune_then_quant_uniform_and_mixed(model):
    st = FakeStats(2, 12, seed=5)
    base = {"planner": "prune_then_quant", "stats": True, "prune": {"fraction": 0.5}}
    a = build_plan({**base, "quant": {"format": "nvfp4"}}, st, model)
    assert a.num_kept == 6 and a.formats_used() == {"nvfp4": 12}
    assert a.pruned() == prune(model, st, fraction=0.5).pruned()
    b = build_plan({**base, "quant": {"format": "mixed"},
                    "mixed": {"menu": ["nf4_dq", "mxfp4"], "budget_bits": 4.2}}, st, model)
    assert b.pruned() == a.pruned() and set(b.formats_used()) == {"nf4_dq", "mxfp4"}
    assert b.info["bytes"]["expert_bits"] <= 4.2
