"""python -m mxq.convert: the export-target registry over every source layout (HF, original/, mxq layout,
a run folder), byte-exact round trips, refusals naming the rule, atomic and 0644 outputs."""
from __future__ import annotations

import stat

import pytest
import torch

import mxq
from mxq.convert import convert, main, resolve_run_folder
from mxq.io.errors import ExportError
from mxq.io.targets import TARGETS, export_checkpoint
from mxq.plan import Plan
from mxq.presets import resolve_preset_path

TINY = resolve_preset_path("tiny")


def _modes(folder) -> set[int]:
    return {stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


def test_registry_lists_the_targets():
    assert {"hf", "original", "gguf", "mxq"} <= set(TARGETS)


def test_hf_original_hf_round_trip_is_byte_identical_and_0644(tmp_path):
    orig = convert(TINY, "original", tmp_path / "orig").path
    back = convert(orig, "hf", tmp_path / "hf").path
    assert (back / "model.safetensors").read_bytes() == (TINY / "model.safetensors").read_bytes()
    assert _modes(orig) == {0o644} and _modes(back) == {0o644}
    ref, got = mxq.load_model(TINY, dtype=torch.float32), mxq.load_model(orig, dtype=torch.float32)
    ids = torch.arange(40).reshape(2, 20)
    assert torch.equal(ref(ids).logits, got(ids).logits)


def test_bf16_checkpoint_to_original_quantizes_to_mxfp4_and_says_so(tmp_path):
    cfg = mxq.load_model(TINY).config
    bf16 = export_checkpoint(TINY, Plan.uniform(cfg.num_hidden_layers, cfg.num_local_experts, "bf16"), tmp_path / "b")
    w = convert(bf16, "original", tmp_path / "o")
    assert w.notes and "quantized to MXFP4" in w.notes[0]
    # MXFP4 -> bf16 is exact and every value is again an MXFP4 value: re-quantizing loses nothing
    ref, got = mxq.load_model(TINY, dtype=torch.float32), mxq.load_model(w.path, dtype=torch.float32)
    ids = torch.arange(40).reshape(2, 20)
    assert torch.equal(ref(ids).logits, got(ids).logits)


def test_refusals_name_the_rule(tmp_path):
    cfg = mxq.load_model(TINY).config
    mixed = export_checkpoint(TINY, Plan([["nvfp4" if e % 2 else "mxfp4" for e in range(cfg.num_local_experts)]
                                          for _ in range(cfg.num_hidden_layers)]), tmp_path / "mixed")
    with pytest.raises(ExportError, match=r"hf: the HF layout holds experts all MXFP4 or all bf16.*--to gguf"):
        convert(mixed, "hf", tmp_path / "x")
    with pytest.raises(ExportError, match=r"original: OpenAI's layout holds MXFP4 experts.*nvfp4"):
        convert(mixed, "original", tmp_path / "y")
    with pytest.raises(ExportError, match="takes no option gguf_type"):
        convert(TINY, "hf", tmp_path / "z", gguf_type="q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed"]


def test_cli_refuses_an_existing_out_and_accepts_a_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    export_checkpoint(TINY, Plan([["mxfp4"] * 32] * 4), run / "model")
    assert resolve_run_folder(run) == run / "model"
    assert main([str(run), "--to", "original", "--out", str(tmp_path / "o")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main([str(run), "--to", "original", "--out", str(tmp_path / "o")]) == 2
    assert "already exists" in capsys.readouterr().err
