"""Pruned MXFP4 exports in the exact gpt-oss HF layout: transformers loads them unmodified (float32,
Mxfp4Config(dequantize=True)) with the same logits as mxq, pruning equals excluding the pruned experts
from routing, kept experts keep their bytes, and ``Plan.bytes`` is the exported byte count.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors import safe_open

import mxq
from mxq.io.targets import export_checkpoint, export_model
from mxq.plan import apply_, build_plan

TOL = 1e-4
E = 12                       # experts per layer of the test checkpoint (top-4, 25% pruned -> 9 kept)


@dataclass
class FakeStats:
    """The fields of mxq.stats.RouterStats that planners read."""
    num_layers: int
    num_experts: int
    reap: np.ndarray
    uncalibrated: np.ndarray
    super_experts: list

    def score(self, name: str) -> np.ndarray:
        return self.reap


def read(folder, name):
    wm = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(folder / wm[name]), framework="pt") as f:
        return f.get_tensor(name)


@pytest.fixture(scope="module")
def pruned(make_ckpt, tmp_path_factory):
    src = make_ckpt("mxfp4", num_local_experts=E)
    model = mxq.load_model(src, dtype=torch.float32)
    L = model.config.num_hidden_layers
    stats = FakeStats(L, E, np.random.default_rng(3).random((L, E)), np.zeros((L, E), bool), [(0, 5), (1, 7)])
    recipe = {"planner": "prune", "stats": True, "prune": {"fraction": 0.25, "criterion": "reap"}}
    plan = build_plan(recipe, stats, model)
    apply_(model, plan)
    out = tmp_path_factory.mktemp("export") / "model"
    export_model(model, plan, out, source_dir=src)
    return src, plan, model, out


def hf_logits(folder, ids):
    from transformers import GptOssForCausalLM, Mxfp4Config

    mxfp4 = "mxfp4" in (folder / "config.json").read_text()
    kw = {"quantization_config": Mxfp4Config(dequantize=True)} if mxfp4 else {}
    ref = GptOssForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return ref(ids).logits


def test_pruned_export_loads_in_transformers_with_mxq_logits(pruned):
    src, plan, model, out = pruned
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_local_experts"] == 9 and cfg["quantization_config"]["quant_method"] == "mxfp4"
    assert not (out / "mxq_manifest.json").exists()
    ids = torch.randint(0, model.config.vocab_size, (1, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).logits
        reloaded = mxq.load_model(out, dtype=torch.float32)(ids).logits
    assert torch.equal(ours, reloaded)
    assert (hf_logits(out, ids) - ours).abs().max().item() < TOL


def test_pruning_equals_routing_without_the_pruned_experts(pruned):
    src, plan, model, _ = pruned
    full = mxq.load_model(src, dtype=torch.float32)
    with torch.no_grad():
        for i, e in plan.pruned():
            full.layers[i].mlp.router.bias[e] = float("-inf")
    ids = torch.randint(0, model.config.vocab_size, (1, 140), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = full(ids).logits, model(ids).logits
    assert (a - b).abs().max().item() < 1e-5


def test_kept_experts_keep_their_bytes_and_super_experts_survive(pruned):
    src, plan, _, out = pruned
    assert (0, 5) not in plan.pruned() and (1, 7) not in plan.pruned()
    for i in range(plan.num_layers):
        kept = torch.tensor(plan.kept(i))
        for t in ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales",
                  "gate_up_proj_bias", "down_proj_bias"):
            name = f"model.layers.{i}.mlp.experts.{t}"
            assert torch.equal(read(out, name), read(src, name)[kept]), name
        for t in ("router.weight", "router.bias"):
            name = f"model.layers.{i}.mlp.{t}"
            assert torch.equal(read(out, name), read(src, name)[kept])


def test_plan_bytes_is_the_exported_byte_count(pruned):
    _, plan, model, out = pruned
    total = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert plan.bytes(mxq.load_model(pruned[0]).config)["total"] == total == plan.info["bytes"]["total"]


def test_export_checkpoint_streams_the_same_tensors_as_export_model(pruned, tmp_path):
    src, plan, _, out = pruned
    out2 = export_checkpoint(src, plan, tmp_path / "direct")
    assert json.loads((out2 / "config.json").read_text()) == json.loads((out / "config.json").read_text())
    names = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(names) == set(json.loads((out2 / "model.safetensors.index.json").read_text())["weight_map"])
    for n in names:
        assert torch.equal(read(out, n), read(out2, n)), n


def test_export_refuses_a_model_that_does_not_carry_the_plan(pruned, tmp_path):
    src, plan, _, _ = pruned
    fresh = mxq.load_model(src)
    with pytest.raises(ValueError, match="call mxq.plan.apply_"):
        export_model(fresh, plan, tmp_path / "x")
    assert not (tmp_path / "x").exists()
