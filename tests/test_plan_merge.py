"""Expert merging: neuron alignment recovers a planted permutation, merging identical (or permuted) experts
reproduces the expert, the log-sum-exp router row, groupings put planted near-duplicates together, the
recipe is validated by option, and a merged MXFP4 checkpoint loads in transformers with mxq's logits and
the right expert count."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import mxq
from mxq.calib import CalibSet
from mxq.model.experts import clamped_swiglu
from mxq.io.errors import ExportError
from mxq.io.targets import export_checkpoint, export_model
from mxq.plan import Plan, PlanError, apply_, build_plan, validate
from mxq.plan.align import ExpertWeights, align_perm, permute
from mxq.plan.merge import merge_router, merge_weights
from mxq.plan.merge_groups import GROUPINGS, LayerData
from mxq.stats.expert_outputs import collect_expert_outputs

H, I = 24, 16
E = 12                                    # experts per layer of the checkpoint test (top-4, 25% merged -> 9)


def rand_expert(g: torch.Generator) -> ExpertWeights:
    return ExpertWeights(torch.randn(2 * I, H, generator=g), torch.randn(2 * I, generator=g),
                         torch.randn(H, I, generator=g), torch.randn(H, generator=g))


def f(w: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    """The gpt-oss expert function (format spec 4.6) on x [n, H]."""
    a = x.double() @ w.gate_up.double().t() + w.gate_up_bias.double()
    return clamped_swiglu(a, 1.702, 7.0) @ w.down.double().t() + w.down_bias.double()


def test_alignment_recovers_a_known_permutation():
    g = torch.Generator().manual_seed(0)
    a = rand_expert(g)
    p = np.random.default_rng(1).permutation(I)
    b = permute(a, p)                                        # neuron n of b = neuron p[n] of a
    x = torch.randn(7, H, generator=g)
    assert torch.allclose(f(a, x), f(b, x), atol=1e-9)       # the same function, neurons renumbered
    q = align_perm(a, b)
    assert np.array_equal(q, np.argsort(p))                  # the inverse permutation
    back = permute(b, q)
    for name in ("gate_up", "gate_up_bias", "down", "down_bias"):
        assert torch.equal(getattr(back, name), getattr(a, name)), name
    with pytest.raises(ValueError, match="not a permutation"):
        permute(a, np.zeros(I, dtype=np.int64))


@pytest.mark.parametrize("align", [True, False])
def test_merging_identical_experts_reproduces_the_expert(align):
    g = torch.Generator().manual_seed(2)
    a = rand_expert(g)
    x = torch.randn(9, H, generator=g)
    m = merge_weights([a, a, a], [5.0, 1.0, 0.0], align)
    assert (f(m, x) - f(a, x)).abs().max().item() < 1e-5


def test_alignment_is_what_makes_a_permuted_copy_merge_exactly():
    g = torch.Generator().manual_seed(3)
    a = rand_expert(g)
    b = permute(a, np.random.default_rng(4).permutation(I))
    x = torch.randn(9, H, generator=g)
    aligned = merge_weights([a, b], [1.0, 1.0], align=True)
    plain = merge_weights([a, b], [1.0, 1.0], align=False)
    assert (f(aligned, x) - f(a, x)).abs().max().item() < 1e-5
    assert (f(plain, x) - f(a, x)).abs().max().item() > 1e-2


def test_router_rows_of_a_group():
    g = torch.Generator().manual_seed(5)
    row, x = torch.randn(1, H, generator=g), torch.randn(H, generator=g)
    w3, b3 = row.repeat(3, 1), torch.tensor([0.5, 0.5, 0.5])
    w, b = merge_router(w3, b3, [1.0, 1.0, 1.0], "lse")      # identical members: exactly l + log 3
    assert abs(float(x @ w + b) - (float(x @ row[0]) + 0.5 + np.log(3))) < 1e-5
    w, b = merge_router(w3, b3, [2.0, 1.0, 1.0], "mean")
    assert abs(float(x @ w + b) - (float(x @ row[0]) + 0.5)) < 1e-5
    # distinct members: the lse row never exceeds the exact log-sum-exp of the members' logits (Gibbs bound)
    wd, bd = torch.randn(3, H, generator=g), torch.randn(3, generator=g)
    w, b = merge_router(wd, bd, [0.2, 0.3, 0.5], "lse")
    for _ in range(5):
        x = torch.randn(H, generator=g)
        assert float(x @ w + b) <= float(torch.logsumexp(wd @ x + bd, 0)) + 1e-5
    w, b = merge_router(wd, bd, [0.2, 0.3, 0.5], "anchor")
    assert torch.equal(w, wd[0]) and torch.equal(b, bd[0])


def planted_layer(seed: int = 0) -> tuple[LayerData, list[set[int]]]:
    """8 experts in 4 planted near-duplicate pairs, in every representation a grouping reads."""
    rng = np.random.default_rng(seed)
    pairs = [(0, 5), (1, 6), (2, 7), (3, 4)]
    base = rng.normal(size=(4, 32)) * 10
    feats = np.zeros((8, 32))
    for k, (a, b) in enumerate(pairs):
        feats[a] = base[k] + rng.normal(size=32) * 0.01
        feats[b] = base[k] + rng.normal(size=32) * 0.01
    dist = np.linalg.norm(feats[:, None] - feats[None], axis=-1)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    freq = np.array([9.0, 8, 7, 6, 1, 2, 3, 4])              # one of each pair is the frequent one
    data = LayerData(layer=0, freq=freq, saliency=freq.copy(), output_dist=lambda: dist, logit_dist=lambda: dist,
                     logit_cos=lambda: unit @ unit.T, weight_dist=lambda: dist)
    return data, [set(p) for p in pairs]


@pytest.mark.parametrize("grouping", sorted(GROUPINGS))
def test_groupings_put_planted_near_duplicates_together(grouping):
    data, pairs = planted_layer()
    groups = GROUPINGS[grouping](data, list(range(8)), 4)
    assert sorted(map(sorted, (set(g) for g in groups))) == sorted(map(sorted, pairs))
    for g in groups:                                          # the anchor is the more frequently routed member
        assert g[0] == max(g, key=lambda e: data.freq[e])


def test_hc_smoe_cuts_the_tree_into_exactly_n_groups_of_the_candidates():
    data, _ = planted_layer(1)
    for n in (1, 2, 3, 5, 6):
        groups = GROUPINGS["hc_smoe"](data, [0, 1, 2, 3, 5, 6], n)
        assert len(groups) == n and sorted(e for g in groups for e in g) == [0, 1, 2, 3, 5, 6]


@dataclass
class FakeStats:
    """The fields of mxq.stats.RouterStats the merge planner reads, plus expert outputs."""
    num_layers: int
    num_experts: int
    super_experts: list = field(default_factory=list)

    def __post_init__(self):
        rng = np.random.default_rng(0)
        shape = (self.num_layers, self.num_experts)
        self.uncalibrated = np.zeros(shape, bool)
        self.uncalibrated[0, 3] = True
        self.freq = np.where(self.uncalibrated, 0.0, rng.integers(1, 100, shape).astype(float))
        self.reap = np.where(self.uncalibrated, np.nan, rng.random(shape))
        self.route_prob = rng.random(shape)
        self.expert_outputs = None


def calib_set(vocab: int, n: int = 3, t: int = 40) -> CalibSet:
    ids = torch.randint(1, vocab, (n, t), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1, 30:] = 0                                          # padding is not a calibration token
    return CalibSet(ids, mask, ["a"] * n, "test")


@pytest.fixture(scope="module")
def merged(make_ckpt, tmp_path_factory):
    src = make_ckpt("mxfp4", num_local_experts=E)
    model = mxq.load_model(src, dtype=torch.float32)
    L = model.config.num_hidden_layers
    stats = FakeStats(L, E, super_experts=[(0, 5)])
    stats.expert_outputs = collect_expert_outputs(model, calib_set(model.config.vocab_size), batch_size=2)
    recipe = {"planner": "merge", "stats": True, "merge": {"fraction": 0.25, "grouping": "hc_smoe"}}
    plan = build_plan(recipe, stats, model)
    apply_(model, plan)
    out = tmp_path_factory.mktemp("merged") / "model"
    export_model(model, plan, out, source_dir=src)
    return src, plan, model, out, stats


def test_expert_outputs_count_valid_tokens_only(merged):
    outs = merged[4].expert_outputs
    L = merged[2].config.num_hidden_layers
    assert outs.tokens == 3 * 40 - 10
    assert outs.mean_out.shape == (L, E, 192) and outs.logit_gram.shape == (L, E, E)
    assert torch.isfinite(outs.mean_out).all()


def test_merge_plan_groups_keep_supers_alone_and_note_uncalibrated(merged):
    _, plan, _, _, _ = merged
    assert plan.num_kept == 9 and plan.planner == "merge"
    layer0 = plan.merge["groups"][0]
    assert [5] in [g["members"] for g in layer0]                       # the super expert stays alone
    for i, groups in enumerate(plan.merge["groups"]):
        assert sorted(e for g in groups for e in g["members"]) == list(range(E))
        assert sorted(g["members"][0] for g in groups) == plan.kept(i)
    for g in layer0:                                                   # expert 0.3 saw no calibration token
        if 3 in g["members"] and len(g["members"]) > 1:
            assert g["weights"][g["members"].index(3)] == 0.0
            assert any("layer 0 expert 3: uncalibrated" in n for n in plan.notes)
    again = Plan.from_json(plan.to_json())
    assert again.merge == json.loads(json.dumps(plan.merge))


def test_merged_export_loads_in_transformers_with_mxq_logits(merged):
    from test_export_hf import TOL, hf_logits

    src, _, model, out, _ = merged
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_local_experts"] == 9 and cfg["quantization_config"]["quant_method"] == "mxfp4"
    assert not (out / "mxq_manifest.json").exists()
    ids = torch.randint(0, model.config.vocab_size, (1, 120), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).logits
        reloaded = mxq.load_model(out, dtype=torch.float32)(ids).logits
    assert torch.equal(ours, reloaded)
    assert (hf_logits(out, ids) - ours).abs().max().item() < TOL
    full = mxq.load_model(src, dtype=torch.float32)
    with torch.no_grad():
        assert (full(ids).logits - ours).abs().max().item() > 1e-3    # the merge did change the model


def test_merge_plan_refuses_the_streaming_export(merged, tmp_path):
    src, plan, _, _, _ = merged
    with pytest.raises(ExportError, match="apply_"):
        export_checkpoint(src, plan, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_merge_plan_must_keep_anchors_and_cover_every_expert(merged):
    d = json.loads(merged[1].to_json())
    d["merge"]["groups"][0][0]["members"] = d["merge"]["groups"][0][0]["members"][::-1] + [0]
    with pytest.raises(PlanError, match=r"plan.merge.groups\[0\]"):
        Plan.from_dict(d)


@pytest.mark.parametrize("over, option", [
    ({"fraction": 1.0}, "recipe.merge.fraction"),
    ({"fraction": 0.9}, "recipe.merge.fraction"),                    # fewer kept than top-k
    ({"grouping": "kmeans"}, "recipe.merge.grouping"),
    ({"weighting": "size"}, "recipe.merge.weighting"),
    ({"router": "max"}, "recipe.merge.router"),
    ({"align": "yes"}, "recipe.merge.align"),
    ({"typo": 1}, "recipe.merge.typo"),
])
def test_merge_recipe_errors_name_the_option(make_ckpt, over, option):
    cfg = mxq.load_model(make_ckpt("mxfp4", num_local_experts=E)).config
    with pytest.raises(PlanError, match=option.replace(".", r"\.")):
        validate({"planner": "merge", "stats": True, "merge": {"fraction": 0.25, **over}}, cfg)


def test_merge_recipe_needs_stats_and_other_planners_refuse_merge_options(make_ckpt):
    cfg = mxq.load_model(make_ckpt("mxfp4", num_local_experts=E)).config
    with pytest.raises(PlanError, match="recipe.stats=true"):
        validate({"planner": "merge", "merge": {"fraction": 0.25}}, cfg)
    validate({"planner": "merge", "merge": {"fraction": 0.25, "grouping": "weights", "weighting": "uniform",
                                            "router": "anchor"}}, cfg)
    with pytest.raises(PlanError, match=r"recipe\.merge\.fraction.*does not merge"):
        validate({"planner": "prune", "stats": True, "prune": {"fraction": 0.25}, "merge": {"fraction": 0.25}}, cfg)


def test_router_repair_never_raises_the_calibration_error_and_lowers_held_out_error(make_ckpt):
    from mxq.plan.router_repair import capture_layer_io, repair_routers_

    model = mxq.load_model(make_ckpt("mxfp4", num_local_experts=E), dtype=torch.float32)
    ids = torch.randint(1, model.config.vocab_size, (16, 64), generator=torch.Generator().manual_seed(4))
    ios = capture_layer_io(model, CalibSet(ids, torch.ones_like(ids), ["a"] * 16, "t"), 4, max_tokens=1000)
    assert all(io.x.shape == (1000, 192) for io in ios)
    L = model.config.num_hidden_layers
    rng = np.random.default_rng(0)
    rows = [["prune" if e in set(rng.choice(E, 6, replace=False)) else "mxfp4" for e in range(E)] for _ in range(L)]
    apply_(model, Plan(rows, planner="prune"))
    before = [l.mlp.router.weight.clone() for l in model.layers]
    info = repair_routers_(model, ios, steps=100, lr=1e-3, holdout=0.2, validation=0.2)
    for d in info:
        assert (d["tokens"], d["validation_tokens"], d["heldout_tokens"]) == (640, 160, 200)
        assert d["calib_mse_after"] <= d["calib_mse_before"]
        assert d["validation_mse_after"] <= d["validation_mse_before"]
    assert sum(d["heldout_mse_after"] for d in info) < sum(d["heldout_mse_before"] for d in info)
    assert any(not torch.equal(b, l.mlp.router.weight) for b, l in zip(before, model.layers))
    assert all(l.mlp.router.weight.dtype == torch.float32 and torch.equal(
        l.mlp.router.weight, l.mlp.router.weight.bfloat16().float()) for l in model.layers)   # bf16 values


def test_router_repair_options_are_validated(make_ckpt):
    cfg = mxq.load_model(make_ckpt("mxfp4", num_local_experts=E)).config
    with pytest.raises(PlanError, match=r"recipe\.repair\.steps"):
        validate({"planner": "prune", "stats": True, "prune": {"fraction": 0.25}, "repair": {"steps": 0}}, cfg)
    with pytest.raises(PlanError, match=r"recipe\.repair\.enabled.*set a planner"):
        validate({"repair": {"enabled": True}}, cfg)


def test_weight_grouping_finds_a_planted_near_duplicate_in_a_checkpoint(make_ckpt):
    from mxq.formats import get_format
    from mxq.plan.merge_plan import weight_distances

    model = mxq.load_model(make_ckpt("mxfp4", num_local_experts=E), dtype=torch.float32)
    ex = model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(7)
    for kind in ex.KINDS:                                  # expert 7 := expert 2 plus 1% noise, re-quantized
        p = ex.packed(kind, 2)
        w = get_format(p.format).dequantize(p, torch.float32)
        ex.set_expert(kind, 7, get_format(p.format).quantize(w + 0.01 * w.std() * torch.randn(w.shape, generator=g)))
    d = weight_distances(ex)
    np.fill_diagonal(d, np.inf)
    assert np.unravel_index(np.argmin(d), d.shape) in ((2, 7), (7, 2))
