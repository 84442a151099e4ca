"""After ``apply_``, a layer whose kept experts share one format holds them as one stacked buffer per tensor
(every expert a view ``buffer[e]``), which is what the fast runtime requires (``mxq.runtime.stacked_experts``);
stacking moves no value, so the exported bytes are the same as with per-expert tensors."""
from __future__ import annotations

import hashlib

import pytest
import torch

import mxq
from mxq.io.targets import export_model
from mxq.plan import Plan, apply_, build_plan
from mxq.plan import apply as apply_mod

E = 12


def assert_views_of_one_buffer(ex, kind: str) -> str:
    """The check of ``mxq.runtime.stacked_experts`` without triton: one format, every expert ``buffer[e]``."""
    fmt, _, _, refs = ex._spec[kind][0]
    assert refs and all(stacked for _, stacked in refs.values()), f"{kind}: per-expert tensors {refs}"
    for e in range(ex.num_experts):
        p = ex.packed(kind, e)
        assert p.format == fmt and ex._spec[kind][e][3] == refs
        for name, (buf, _) in refs.items():
            b = getattr(ex, buf)
            assert b.shape[0] == ex.num_experts and p.tensors[name].data_ptr() == b[e].data_ptr()
    return fmt


def runtime_accepts(model) -> None:
    from mxq.runtime import HAVE_TRITON

    if HAVE_TRITON:           # the runtime's own check, where triton is installed
        from mxq.runtime import stacked_experts

        for layer in model.layers:
            for kind in ("gate_up", "down"):
                stacked_experts(layer.mlp.experts, kind)


@pytest.mark.parametrize("experts", ["mxfp4", "bf16"])
def test_planner_prune_keeps_every_layer_stacked(make_ckpt, experts):
    model = mxq.load_model(make_ckpt(experts, num_local_experts=E), dtype=torch.bfloat16)
    recipe = {"planner": "prune", "prune": {"fraction": 0.25, "criterion": "random", "seed": 1}}
    plan = build_plan(recipe, None, model)
    apply_(model, plan)
    for layer in model.layers:
        ex = layer.mlp.experts
        assert ex.num_experts == 9
        for kind in ex.KINDS:
            assert assert_views_of_one_buffer(ex, kind) == experts
    runtime_accepts(model)


def file_digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("fmt", ["bf16", "nvfp4"])
def test_repacked_uniform_layers_are_stacked_again_and_export_the_same_bytes(make_ckpt, tmp_path, monkeypatch, fmt):
    src = make_ckpt("mxfp4", num_local_experts=E)
    rows = [["prune" if e % 4 == 0 else fmt for e in range(E)] for _ in range(2)]
    stacked = mxq.load_model(src, dtype=torch.float32)
    apply_(stacked, Plan([list(r) for r in rows]))
    for layer in stacked.layers:
        for kind in ("gate_up", "down"):
            assert assert_views_of_one_buffer(layer.mlp.experts, kind) == fmt
    export_model(stacked, Plan([list(r) for r in rows]), tmp_path / "stacked", source_dir=src)

    monkeypatch.setattr(apply_mod, "_stackable", lambda qs: False)       # the previous behaviour: per expert
    loose = mxq.load_model(src, dtype=torch.float32)
    apply_(loose, Plan([list(r) for r in rows]))
    assert not loose.layers[0].mlp.experts._spec["down"][0][3]["weight" if fmt == "bf16" else "packed"][1]
    export_model(loose, Plan([list(r) for r in rows]), tmp_path / "loose", source_dir=src)

    a, b = file_digests(tmp_path / "stacked"), file_digests(tmp_path / "loose")
    assert a == b and any(n.endswith(".safetensors") for n in a)
    x = torch.randint(0, stacked.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(stacked(x).logits, loose(x).logits)


def test_mixed_formats_in_a_layer_stay_per_expert(make_ckpt):
    model = mxq.load_model(make_ckpt("mxfp4", num_local_experts=E), dtype=torch.float32)
    rows = [["prune" if e % 4 == 0 else ("nvfp4" if e % 2 else "mxfp4") for e in range(E)] for _ in range(2)]
    apply_(model, Plan(rows))
    ex = model.layers[0].mlp.experts
    assert ex.formats() == [rows[0][e] for e in range(E) if e % 4]
    assert not any(stacked for _, stacked in ex._spec["gate_up"][0][3].values())
    # the kept MXFP4 experts own copies of their bytes: the source's stacked buffers are not held any more
    assert "gate_up_blocks" not in dict(ex.named_buffers())
    from mxq.runtime import HAVE_TRITON

    if HAVE_TRITON:              # the fast runtime groups such a layer per format (fmt_kernels)
        from mxq.runtime import stacked_experts
        from mxq.runtime.fmt_kernels import FmtExperts

        gu = stacked_experts(ex, "gate_up")
        assert isinstance(gu, FmtExperts) and sorted(st.fmt for st in gu.stacks) == ["mxfp4", "nvfp4"]
