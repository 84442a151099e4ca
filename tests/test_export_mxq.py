"""mxq's own layout (docs/export.md): mixed formats round-trip through ``mxq.load_model`` exactly, every
file's SHA-256 is in the manifest, damaged folders fail loudly, transformers refuses the folder instead of
loading garbage, and an export interrupted midway leaves no folder that looks like a checkpoint.
"""
from __future__ import annotations

import json

import pytest
import torch

import mxq
import mxq.io.streams as streams
import mxq.io.targets.hf as export_hf
from mxq.io import CheckpointError
from mxq.io.mxq_layout import verify
from mxq.io.targets import export_checkpoint, export_model
from mxq.plan import Plan, apply_

FORMATS = ["nvfp4", "nf4", "nf4_dq", "int4_g32", "int4_g32_asym", "fp8", "fp8_block", "bf16", "mxfp4"]
E = 12                       # experts per layer of the test checkpoint; 2 pruned per layer -> 10 kept


def mixed_plan(cfg, attention="fp8", lm_head="fp8_block") -> Plan:
    rows = []
    for i in range(cfg.num_hidden_layers):
        row = [FORMATS[(e + i) % len(FORMATS)] for e in range(cfg.num_local_experts)]
        for e in (3, 10):                           # prune 2 per layer
            row[e] = "prune"
        rows.append(row)
    return Plan(rows, attention, lm_head, planner="test")


@pytest.fixture(scope="module")
def exported(make_ckpt, tmp_path_factory):
    src = make_ckpt("mxfp4", num_local_experts=E)
    model = mxq.load_model(src, dtype=torch.float32)
    plan = mixed_plan(model.config)
    apply_(model, plan)
    out = export_model(model, plan, tmp_path_factory.mktemp("mxq") / "model", source_dir=src)
    return src, plan, model, out


def test_mixed_export_round_trips_exactly(exported):
    src, plan, model, out = exported
    assert model.layers[0].mlp.experts.formats()[:3] == ["nvfp4", "nf4", "nf4_dq"]
    back = mxq.load_model(out, dtype=torch.float32)
    assert back.config.num_local_experts == 10 and back.source_format == "mixed"
    assert back.layers[1].mlp.experts.formats() == model.layers[1].mlp.experts.formats()
    ids = torch.randint(0, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
    for i in range(plan.num_layers):
        for e in range(10):
            for kind in ("gate_up", "down"):
                a, b = model.layers[i].mlp.experts.packed(kind, e), back.layers[i].mlp.experts.packed(kind, e)
                assert a.format == b.format and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_manifest_metadata_and_bytes(exported):
    _, plan, model, out = exported
    man = json.loads((out / "mxq_manifest.json").read_text())
    assert man["format"] == "mxq" and man["format_version"] == 1
    assert Plan.from_dict(man["plan"]) == plan
    verify(out)
    assert man["config"]["num_local_experts"] == 10 and "quantization_config" not in man["config"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "mxq"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        md = f.metadata()
        spec = json.loads(md["model.layers.0.mlp.experts.0.gate_up"])
        assert spec["format"] == "nvfp4" and spec["shape"] == [256, 192]
        assert f.get_tensor("model.layers.0.mlp.experts.0.gate_up.packed").shape == (256, 96)
        assert json.loads(md["lm_head.weight"])["format"] == "fp8_block"
    total = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert plan.bytes(mxq.load_model(exported[0]).config)["total"] == total


def test_checkpoint_path_writes_identical_weights(exported, tmp_path):
    src, plan, model, out = exported
    out2 = export_checkpoint(src, plan, tmp_path / "direct")
    a = json.loads((out / "mxq_manifest.json").read_text())["files"]
    b = json.loads((out2 / "mxq_manifest.json").read_text())["files"]
    assert a == b                                               # same bytes, same SHA-256


def test_transformers_refuses_the_mxq_layout(exported):
    """The guard config.json: transformers fails at once, naming the way to load the folder, instead of
    random-initialising the experts it cannot map (what it does with an unknown quantization_config)."""
    from transformers import AutoModelForCausalLM, GptOssForCausalLM

    for cls in (GptOssForCausalLM, AutoModelForCausalLM):
        with pytest.raises(Exception, match="load with mxq.load_model"):
            cls.from_pretrained(exported[3])


def test_damaged_folders_fail_loudly(exported, tmp_path):
    import shutil

    out = exported[3]
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.seek(-5, 2)
        f.write(b"XXXXX")
    with pytest.raises(CheckpointError, match="SHA-256"):
        verify(bad)
    with open(bad / "model.safetensors", "ab") as f:
        f.write(b"1")
    with pytest.raises(CheckpointError, match="bytes, mxq_manifest.json says"):
        mxq.load_model(bad)
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    man = json.loads((bad / "mxq_manifest.json").read_text())
    man["format_version"] = 99
    (bad / "mxq_manifest.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="version 99 is not supported"):
        mxq.load_model(bad)


def test_missing_expert_is_reported(make_ckpt, tmp_path):
    """A stream that drops one expert's tensors writes a folder the reader rejects by name."""
    src = make_ckpt("mxfp4", num_local_experts=E)
    plan = Plan.uniform(2, E, "mxfp4", attention="fp8")             # mxq layout, no expert conversion
    orig = streams.mxq_stream

    def dropping(s, p):
        return ((n, t) for n, t in orig(s, p) if n != "model.layers.1.mlp.experts.5.down")

    import mxq.io.targets as export
    export.mxq_stream, saved = dropping, export.mxq_stream
    try:
        out = export_checkpoint(src, plan, tmp_path / "m")
    finally:
        export.mxq_stream = saved
    with pytest.raises(CheckpointError, match="missing packed weight 'model.layers.1.mlp.experts.5.down'"):
        mxq.load_model(out)


@pytest.mark.parametrize("layout", ["hf", "mxq"])
def test_interrupted_export_leaves_no_checkpoint(make_ckpt, tmp_path, monkeypatch, layout):
    src = make_ckpt("mxfp4", num_local_experts=E)
    model = mxq.load_model(src)
    plan = Plan.uniform(2, E, "mxfp4", attention="bf16" if layout == "hf" else "fp8")
    apply_(model, plan)
    calls = {"n": 0}

    def boom(orig):
        def wrapped(*a, **k):
            calls["n"] += 1
            if calls["n"] == 3:                     # midway: layer 1, after layer 0 was streamed
                raise RuntimeError("disk full")
            return orig(*a, **k)
        return wrapped

    if layout == "hf":
        monkeypatch.setattr(export_hf, "expert_stack", boom(export_hf.expert_stack))
    else:
        monkeypatch.setattr(streams, "kept_experts", boom(streams.kept_experts))
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(model, plan, tmp_path / "model", source_dir=src, shard_bytes=100_000)
    assert calls["n"] == 3
    assert list(tmp_path.iterdir()) == []           # no model/, no hidden partial folder
