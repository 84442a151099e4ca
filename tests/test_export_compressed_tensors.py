"""compressed-tensors export: the compressed-tensors library decompresses mxq's INT4 / FP8 / NVFP4 experts (and
fp8 attention) to exactly the tensors ``python -m mxq.dequantize`` writes from the same checkpoint."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors.base import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402

from mxq.convert import convert  # noqa: E402
from mxq.dequantize import dequantize  # noqa: E402
from mxq.io.errors import ExportError  # noqa: E402
from mxq.io.sources import open_source  # noqa: E402
from mxq.io.targets import export_checkpoint  # noqa: E402
from mxq.io.targets.compressed_tensors import module_regexes  # noqa: E402
from mxq.plan import PRUNE, Plan  # noqa: E402
from mxq.presets import resolve_preset_path  # noqa: E402

TINY = resolve_preset_path("tiny")
MENU = ["int4_g32", "fp8", "nvfp4", "bf16"]


def _load(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_library_decompresses_exactly_what_mxq_dequantize_writes(tmp_path):
    cfg = open_source(TINY).config
    E, L = cfg.num_local_experts, cfg.num_hidden_layers
    plan = Plan([[PRUNE if e % 4 == 0 else MENU[(e + i) % 4] for e in range(E)] for i in range(L)], attention="fp8")
    src = export_checkpoint(TINY, plan, tmp_path / "mixed")                    # a pruned, mixed mxq-layout run
    ct = convert(src, "compressed-tensors", tmp_path / "ct").path
    ref = _load(dequantize(src, tmp_path / "bf16"))
    got = _load(ct)
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision" and len(qc["config_groups"]) == 3
    rules = module_regexes(qc)
    K = E - E // 4
    checked = set()
    for i in range(L):
        gu = ref[f"model.layers.{i}.mlp.experts.gate_up_proj"].transpose(1, 2)        # [K, 2I, H]
        dn = ref[f"model.layers.{i}.mlp.experts.down_proj"].transpose(1, 2)            # [K, H, I]
        for j in range(K):
            for proj, want in (("gate_proj", gu[j, 0::2]), ("up_proj", gu[j, 1::2]), ("down_proj", dn[j])):
                name = f"model.layers.{i}.mlp.experts.{j}.{proj}"
                hit = [(fmt, args) for rx, fmt, args in rules if rx.match(name)]
                sd = {k.removeprefix(name + "."): v for k, v in got.items() if k.startswith(name + ".")}
                if not hit:                                                          # bf16 expert
                    assert torch.equal(sd["weight"], want)
                    continue
                (fmt, args), = hit
                scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))
                w = BaseCompressor.load_from_registry(fmt).decompress(sd, scheme)["weight"]
                assert torch.equal(w.to(torch.bfloat16), want), name
                checked.add(fmt)
            b = ref[f"model.layers.{i}.mlp.experts.gate_up_proj_bias"][j]
            assert torch.equal(got[f"model.layers.{i}.mlp.experts.{j}.up_proj.bias"], b[1::2])
        for x in "qkvo":
            name = f"model.layers.{i}.self_attn.{x}_proj"
            (fmt, args), = [(fmt, args) for rx, fmt, args in rules if rx.match(name)]
            sd = {k.removeprefix(name + "."): v for k, v in got.items() if k.startswith(name + ".")
                  and not k.endswith(".bias")}
            scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))
            w = BaseCompressor.load_from_registry(fmt).decompress(sd, scheme)["weight"]
            assert torch.equal(w.to(torch.bfloat16), ref[name + ".weight"])
    assert checked == {"pack-quantized", "float-quantized", "nvfp4-pack-quantized"}


def test_formats_compressed_tensors_cannot_hold_are_refused(tmp_path):
    cfg = open_source(TINY).config
    for fmt, why in (("fp8_block", "does not split"), ("int4_g128", "hidden_size=192 is not a multiple"),
                     ("nf4", "no format holding it exactly")):
        src = export_checkpoint(TINY, Plan.uniform(cfg.num_hidden_layers, cfg.num_local_experts, fmt), tmp_path / fmt)
        with pytest.raises(ExportError, match=f"layer 0 has {fmt} experts: .*{why}" if fmt != "int4_g128"
                           else why):
            convert(src, "compressed-tensors", tmp_path / f"ct_{fmt}")
        assert not (tmp_path / f"ct_{fmt}").exists()
