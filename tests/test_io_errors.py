"""Every reader error names the file and the tensor at fault, and nothing half-loaded is returned."""
from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import mxq
from mxq.io import CheckpointError


@pytest.fixture()
def ckpt(make_ckpt, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(make_ckpt("mxfp4", layers=1), dst)
    return dst


def rewrite(folder, fn):
    """Apply fn to the single shard's tensor dict and save it back (and drop the index)."""
    f = next(folder.glob("*.safetensors"))
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").unlink()
    return f


def test_missing_tensor(ckpt):
    rewrite(ckpt, lambda t: t.pop("model.layers.0.mlp.router.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.0\.mlp\.router\.bias'"):
        mxq.load_model(ckpt)


def test_unexpected_tensor(ckpt):
    f = rewrite(ckpt, lambda t: t.__setitem__("model.layers.0.mlp.shared_expert.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=rf"{f.name}.*unexpected tensor 'model\.layers\.0\.mlp\.shared_expert"):
        mxq.load_model(ckpt)


def test_misshaped_tensor(ckpt):
    f = rewrite(ckpt, lambda t: t.__setitem__("model.layers.0.self_attn.sinks", torch.zeros(7, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=rf"{f.name}: tensor 'model\.layers\.0\.self_attn\.sinks' has shape \[7\]"):
        mxq.load_model(ckpt)


def test_mistyped_tensor(ckpt):
    def fn(t):
        t["model.layers.0.mlp.experts.down_proj_scales"] = t["model.layers.0.mlp.experts.down_proj_scales"].float()
    f = rewrite(ckpt, fn)
    with pytest.raises(CheckpointError, match=rf"{f.name}: tensor 'model\.layers\.0\.mlp\.experts\.down_proj_scales' has dtype F32"):
        mxq.load_model(ckpt)


def test_truncated_file(ckpt):
    f = next(ckpt.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match=rf"{f.name}: truncated.*incomplete"):
        mxq.load_model(ckpt)


def test_corrupt_header(ckpt):
    f = next(ckpt.glob("*.safetensors"))
    data = bytearray(f.read_bytes())
    data[8:12] = b"\xff\xfe{x"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{f.name}: corrupt safetensors header"):
        mxq.load_model(ckpt)


def test_header_length_beyond_file(ckpt):
    f = next(ckpt.glob("*.safetensors"))
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 2)
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{f.name}: corrupt safetensors header length"):
        mxq.load_model(ckpt)


def test_config_contradicts_tensors_expert_count(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_local_experts"] = 24
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.mlp\.router\.weight' has shape \[32, 192\], expected \[24, 192\]"):
        mxq.load_model(ckpt)


def test_config_without_quantization_config_for_mxfp4_tensors(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: tensors hold MXFP4 experts"):
        mxq.load_model(ckpt)


def test_config_missing_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["num_experts_per_tok"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: missing required field\(s\) \['num_experts_per_tok'\]"):
        mxq.load_model(ckpt)


def test_topk_larger_than_experts(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_experts_per_tok"] = 40
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"num_experts_per_tok 40 exceeds num_local_experts 32"):
        mxq.load_model(ckpt)


def test_index_disagrees_with_files(ckpt):
    idx = json.loads((ckpt / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"index\.json: tensor 'model\.norm\.weight' listed in model-00009"):
        mxq.load_model(ckpt)


def test_duplicate_tensor_across_files(ckpt):
    save_file({"model.norm.weight": torch.ones(192, dtype=torch.bfloat16)}, str(ckpt / "extra.safetensors"))
    (ckpt / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' also stored in"):
        mxq.load_model(ckpt)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder and not an available preset"):
        mxq.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        mxq.load_model(tmp_path / "empty")


def test_interrupted_write_leaves_no_folder(tmp_path, tiny_ckpt):
    from mxq.io.writer import write_checkpoint

    def stream():
        yield "a", torch.zeros(3)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_checkpoint(tmp_path / "out", {"x": 1}, stream())
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_to_clobber(tmp_path):
    from mxq.io.writer import write_checkpoint

    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        write_checkpoint(tmp_path / "out", {}, iter([("a", torch.zeros(1))]))
