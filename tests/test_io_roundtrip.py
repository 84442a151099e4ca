"""Layouts and round trips: original vs HF layout, write-then-read bit-exactness, packed experts, counts."""
from __future__ import annotations

import json

import torch
from safetensors import safe_open

import mxq
from mxq.config import GptOssConfig
from mxq.io.layout import hf_tensors, original_tensors
from mxq.presets import preset_config


def all_tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def test_original_and_hf_layouts_give_identical_logits(tiny_ckpt):
    ids = torch.randint(0, 6144, (2, 50), generator=torch.Generator().manual_seed(0))
    hf = mxq.load_model(tiny_ckpt, dtype=torch.float32)
    orig = mxq.load_model(tiny_ckpt / "original", dtype=torch.float32)
    assert orig.source.endswith("original")
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, orig(ids).logits)


def test_original_layout_auto_detected_from_parent(tiny_ckpt, tmp_path):
    # a folder holding only original/ (as when a user downloads just that part)
    import shutil

    shutil.copytree(tiny_ckpt / "original", tmp_path / "only" / "original")
    m = mxq.load_model(tmp_path / "only", dtype=torch.float32)
    assert m.source.endswith("original")


def test_write_then_read_is_bit_exact(tiny_ckpt, tmp_path):
    m = mxq.load_model(tiny_ckpt, dtype=torch.bfloat16)
    out = mxq.save_model(m, tmp_path / "again", experts="mxfp4", shard_bytes=1_000_000)
    a, b = all_tensors(tiny_ckpt), all_tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 1          # really sharded
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    assert cfg["rope_scaling"]["truncate"] is False
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()


def test_mxfp4_experts_stay_packed_in_memory(tiny_ckpt):
    m = mxq.load_model(tiny_ckpt, dtype=torch.bfloat16)
    ex = m.layers[0].mlp.experts
    assert ex.formats() == ["mxfp4"] * 32
    p = ex.gate_up[3]
    assert p.tensors["blocks"].dtype == torch.uint8 and p.tensors["blocks"].shape == (256, 6, 16)
    # views into the stacked checkpoint tensor: no per-expert copy
    assert p.tensors["blocks"].untyped_storage().data_ptr() == ex.gate_up_blocks.untyped_storage().data_ptr()
    floats = [n for n, b in ex.named_buffers() if b.is_floating_point() and b.numel() > 32 * 256]
    assert floats == []


def test_bf16_export_loads_back_equal(tiny_ckpt, tmp_path):
    m = mxq.load_model(tiny_ckpt, dtype=torch.float32)
    out = mxq.save_model(m, tmp_path / "bf16", experts="bf16")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    b = mxq.load_model(out, dtype=torch.float32)
    ids = torch.randint(0, 6144, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, b(ids).logits)   # MXFP4 values are exact in bf16


def test_published_tensor_counts():
    c20 = GptOssConfig.from_hf_dict(preset_config("gpt-oss-20b"))
    c120 = GptOssConfig.from_hf_dict(preset_config("gpt-oss-120b"))
    assert len(hf_tensors(c20, "mxfp4")) == 459 and len(hf_tensors(c120, "mxfp4")) == 687
    assert len(original_tensors(c20)) == 363
    assert c20.param_counts()["total"] == 20_914_757_184
    assert c120.param_counts()["active_excl_embedding"] == 5_132_849_472


def test_synth_is_deterministic(make_ckpt):
    a = all_tensors(make_ckpt("mxfp4", seed=7, layers=1))
    from mxq.synth import synth_stream

    cfg_d = preset_config("tiny")
    cfg_d.update(num_hidden_layers=1)
    cfg_d.pop("layer_types")
    again = dict(synth_stream(GptOssConfig.from_hf_dict(cfg_d), "mxfp4", 7, torch.device("cpu")))
    assert all(torch.equal(a[k], again[k]) for k in a)


def test_synthetic_activations_finite_and_routing_spread(make_ckpt):
    m = mxq.load_model(make_ckpt("mxfp4", layers=4), dtype=torch.float32)
    ids = torch.randint(0, 6144, (4, 64), generator=torch.Generator().manual_seed(0))
    seen = []

    class Obs:
        def on_route(self, layer, logits, idx, w, valid):
            seen.append(torch.bincount(idx.flatten(), minlength=32))

        def on_expert(self, *a):
            pass

    with torch.no_grad(), mxq.observe(m, Obs()):
        logits = m(ids).logits
    assert torch.isfinite(logits).all()
    for counts in seen:
        assert (counts > 0).sum() >= 24        # not collapsed onto a few experts
        assert counts.max() < 0.25 * counts.sum()
