"""Damaged weights are refused before any work, naming layer, expert and tensor; standard JSON only.

Each test here failed before ``mxq.validate_weights`` and ``mxq.jsonout`` existed: the damaged checkpoints
loaded and ran, quantizer errors said "weight: non-finite value" with no tensor, metrics.json held bare NaN.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mxq
from mxq.formats import FormatError
from mxq.validate_weights import WeightError, check_model, require_valid


def damage(src: Path, dst: Path, name: str, index: tuple, value) -> Path:
    """Copy checkpoint ``src`` to ``dst`` with ``tensor[index] = value`` in the shard holding ``name``."""
    shutil.copytree(src, dst)
    wm = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    shard = dst / wm[name]
    tensors = load_file(str(shard))
    t = tensors[name].clone()
    t[index] = value
    tensors[name] = t
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def ckpt(make_ckpt):
    return make_ckpt("mxfp4")


@pytest.mark.parametrize("name,index,value,expect", [
    ("model.layers.1.mlp.router.weight", (5, 3), float("nan"), ["layer 1", "expert 5", "router.weight", "1 NaN"]),
    ("model.layers.0.mlp.experts.down_proj_bias", (7, 0), float("inf"), ["layer 0", "expert 7", "down_bias", "1 Inf"]),
    ("model.layers.0.mlp.experts.gate_up_proj_scales", (3, 2, 1), 255, ["layer 0", "expert 3", "scales", "0xFF"]),
    ("model.layers.1.self_attn.q_proj.weight", (0, 0), 1e6, ["layer 1", "q_proj.weight", "beyond"]),
])
def test_damaged_weight_is_named(ckpt, tmp_path, name, index, value, expect):
    bad = damage(ckpt, tmp_path / "bad", name, index, value)
    model = mxq.load_model(bad, dtype=torch.float32)
    with pytest.raises(WeightError) as e:
        require_valid(model)
    msg = str(e.value)
    for part in expect:
        assert part in msg, (part, msg)
    assert "validate.allow_nonfinite=true" in msg


def test_clean_model_has_no_problem_and_every_tensor_is_checked(ckpt):
    model = mxq.load_model(ckpt, dtype=torch.float32)
    problems, n = check_model(model)
    assert problems == []
    want = len(list(model.parameters())) + sum(1 for name, b in model.named_buffers()
                                               if b.is_floating_point() or name.endswith("_scales"))
    assert n == want                    # every parameter, float buffer and MXFP4 scale tensor (nibbles cannot be bad)


def test_allow_records_problems_instead_of_raising(ckpt, tmp_path):
    bad = damage(ckpt, tmp_path / "bad", "model.layers.0.mlp.router.bias", (2,), float("nan"))
    rec = require_valid(mxq.load_model(bad, dtype=torch.float32), allow=True)
    assert rec["allow_nonfinite"] is True and len(rec["problems"]) == 1
    assert rec["problems"][0]["layer"] == 0 and rec["problems"][0]["expert"] == 2


def test_run_refuses_damaged_model_before_stats(ckpt, tmp_path):
    """The reproduction: recipe=prune_25pct on a NaN router ran, picked experts from NaN statistics, exported."""
    from hydra import compose, initialize_config_dir

    from mxq.run import RECIPES, run

    bad = damage(ckpt, tmp_path / "bad", "model.layers.0.mlp.router.weight", (4, 0), float("nan"))
    with initialize_config_dir(config_dir=RECIPES, version_base=None):
        cfg = compose("run", overrides=["recipe=prune_25pct", f"model.path={bad}", "eval=none",
                                        "generate.max_new_tokens=0", f"cache_dir={tmp_path / 'cache'}"])
    out = tmp_path / "run"
    with pytest.raises(WeightError, match="layer 0, expert 4"):
        run(cfg, out)
    assert not (out / "router_stats.json").exists() and not (out / "model").exists()
    assert not (tmp_path / "cache" / "router_stats").exists()
    assert (out / ".incomplete").exists() and "WeightError" in (out / "run.log").read_text()


def test_run_with_allow_records_the_problems_in_run_meta(ckpt, tmp_path):
    from hydra import compose, initialize_config_dir

    from mxq.run import RECIPES, run

    bad = damage(ckpt, tmp_path / "bad", "model.layers.1.mlp.experts.gate_up_proj_bias", (11, 2), float("inf"))
    with initialize_config_dir(config_dir=RECIPES, version_base=None):
        cfg = compose("run", overrides=["recipe=baseline", f"model.path={bad}", "eval=none", "generate.max_new_tokens=0",
                                        "validate.allow_nonfinite=true", f"cache_dir={tmp_path / 'cache'}"])
    run(cfg, tmp_path / "run")
    w = json.loads((tmp_path / "run" / "run_meta.json").read_text())["weights"]
    assert w["allow_nonfinite"] is True and [(p["layer"], p["expert"]) for p in w["problems"]] == [(1, 11)]
    assert "gate_up_bias" in w["problems"][0]["message"]


def test_quantizer_error_names_layer_expert_and_tensor(ckpt):
    from mxq.plan import Plan, apply_

    model = mxq.load_model(ckpt, dtype=torch.float32)
    ex = model.layers[1].mlp.experts
    ex.get_buffer("down_scales")[6, 0, 0] = 255          # NaN scale -> NaN weight -> quantizer refuses
    plan = Plan.uniform(model.config.num_hidden_layers, model.config.num_local_experts, "nvfp4")
    with pytest.raises(FormatError, match=r"model\.layers\.1\.mlp\.experts\.6\.down"):
        apply_(model, plan)


def test_metrics_json_is_standard_json(tmp_path):
    from mxq.evaluate import write_run_outputs

    metrics = {"model": {}, "recipe": {}, "plan": None, "env": {"x": 1},
               "memory": {"weight_bytes": 1}, "speed": {"decode_tokens_per_s": float("inf")},
               "accuracy": {"perplexity": {"mean": float("nan"), "austen": float("nan")}, "kl_vs_baseline": None},
               "eval": {"config": {"report": {"plots": False, "print_summary": False}}}}
    write_run_outputs(tmp_path, metrics)

    def refuse(c):
        raise AssertionError(f"non-standard JSON constant {c}")

    d = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    assert d["accuracy"]["perplexity"]["mean"] is None and d["speed"]["decode_tokens_per_s"] is None


def test_dequantize_checks_the_source_first(ckpt, tmp_path):
    """mxq.dequantize loads no model: the same checks run on the checkpoint's tensors before any output."""
    from mxq.dequantize import dequantize

    bad = damage(ckpt, tmp_path / "bad", "model.layers.0.mlp.experts.gate_up_proj_scales", (9, 0, 0), 255)
    with pytest.raises(WeightError, match=r"layer 0, expert 9, model\.layers\.0\.mlp\.experts\.gate_up_proj_scales"):
        dequantize(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
