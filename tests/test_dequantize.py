"""``python -m mxq.dequantize IN OUT``: a standard bf16 HF checkpoint (transformers' dequantized layout, no
quantization_config) from an MXFP4 checkpoint, a pruned export or a mixed-format mxq export; it loads in
transformers with the logits of mxq on the source.
"""
from __future__ import annotations

import json

import pytest
import torch

import mxq
from mxq.dequantize import dequantize, main
from mxq.io.targets import export_model
from mxq.plan import Plan, apply_

TOL = 1e-4
E = 12                       # experts per layer of the test checkpoint


def hf_logits(folder, ids):
    from transformers import GptOssForCausalLM

    ref = GptOssForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(ids).logits


def ids_for(model, seed=0):
    return torch.randint(0, model.config.vocab_size, (1, 140), generator=torch.Generator().manual_seed(seed))


def test_mxfp4_checkpoint_to_bf16_loads_in_transformers(make_ckpt, tmp_path):
    src = make_ckpt("mxfp4", num_local_experts=E)
    main([str(src), str(tmp_path / "bf16")])
    out = tmp_path / "bf16"
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    wm = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(n.endswith(("_blocks", "_scales")) for n in wm)
    from safetensors import safe_open

    with safe_open(str(out / wm["model.layers.0.mlp.experts.gate_up_proj"]), framework="pt") as f:
        p = "model.layers.0.mlp.experts."
        gu, dn = f.get_tensor(p + "gate_up_proj"), f.get_tensor(p + "down_proj")
    H, I = cfg["hidden_size"], cfg["intermediate_size"]
    assert gu.shape == (E, H, 2 * I) and dn.shape == (E, I, H) and gu.dtype == torch.bfloat16
    ours = mxq.load_model(src, dtype=torch.float32)
    ids = ids_for(ours)
    with torch.no_grad():
        a = ours(ids).logits
    assert (hf_logits(out, ids) - a).abs().max().item() < TOL          # MXFP4 -> bf16 is exact
    assert mxq.load_model(out).source_format == "bf16"


def test_original_layout_gives_the_same_bf16_checkpoint(tiny_ckpt, tmp_path):
    a = dequantize(tiny_ckpt, tmp_path / "from_hf")
    b = dequantize(tiny_ckpt / "original", tmp_path / "from_original")
    from safetensors.torch import load_file

    ca, cb = (json.loads((x / "config.json").read_text()) for x in (a, b))
    tokens = ("bos_token_id", "eos_token_id", "pad_token_id")   # OpenAI's original config has none
    assert {k: v for k, v in ca.items() if k not in tokens} == {k: v for k, v in cb.items() if k not in tokens}
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_mixed_mxq_export_to_bf16_loads_in_transformers(make_ckpt, tmp_path):
    src = make_ckpt("mxfp4", num_local_experts=E)
    model = mxq.load_model(src, dtype=torch.float32)
    rows = [["fp8" if e % 3 == 0 else "int4_g32" if e % 3 == 1 else "nvfp4" for e in range(E)] for _ in range(2)]
    for r in rows:
        r[0] = r[9] = "prune"
    plan = Plan(rows, attention="fp8")
    apply_(model, plan)
    mixed = export_model(model, plan, tmp_path / "mixed", source_dir=src)
    out = dequantize(mixed, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 10
    back = mxq.load_model(out, dtype=torch.float32)
    ids = ids_for(model, 1)
    with torch.no_grad():
        exact = back(ids).logits
    assert (hf_logits(out, ids) - exact).abs().max().item() < TOL
    # every weight is the bf16 rounding of the compressed model's exact dequantized weight
    from mxq.formats import get_format

    for i in range(2):
        for j in range(10):
            for kind in ("gate_up", "down"):
                p, q = model.layers[i].mlp.experts.packed(kind, j), back.layers[i].mlp.experts.packed(kind, j)
                want = get_format(p.format).dequantize(p).to(torch.bfloat16)
                assert torch.equal(q.tensors["weight"], want)
        w = model.layers[i].self_attn.q_proj.weight
        assert torch.equal(back.layers[i].self_attn.q_proj.weight, w.to(torch.bfloat16).float())


def test_dequantize_refuses_to_overwrite_and_leaves_nothing_on_failure(make_ckpt, tmp_path, monkeypatch):
    src = make_ckpt("mxfp4", num_local_experts=E)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        dequantize(src, tmp_path / "exists")
    import mxq.io.streams as streams

    def broken(*a, **k):
        raise RuntimeError("interrupted")
        yield

    monkeypatch.setattr(streams, "kept_experts", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        dequantize(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]
