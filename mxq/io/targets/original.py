"""OpenAI's ``original/`` layout: ``config.json`` in OpenAI's keys and one safetensors set with fused ``qkv`` and
MXFP4 experts (``block.{i}.mlp.mlp1_weight.blocks`` ...), what OpenAI's reference implementation loads.

OpenAI's loader (github.com/openai/gpt-oss at 0568dfc, ``gpt_oss/torch/weights.py``) reads every expert matrix as MXFP4
blocks and scales, so MXFP4 experts are copied byte for byte and bf16 experts are quantized to MXFP4 with
OpenAI's own rule (``mxq.formats.mxfp4``, the Triton reference quantizer); other formats are refused.
Its model (``gpt_oss/torch/model.py``: ``AttentionBlock``, ``RMSNorm``, ``swiglu``) fixes what the HF config spells out: sliding window on even layers,
RMSNorm eps 1e-5, SwiGLU alpha 1.702; a checkpoint that differs would load there and compute something
else, so it is refused.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..writer import AtomicFolder
from ..errors import ExportError
from ..streams import hf_stream
from ..writer import DEFAULT_SHARD_BYTES, write_shards
from .hf import original_tensor_stream

if TYPE_CHECKING:
    from ...plan.plan import Plan
    from . import Written


def check_original(cfg, plan: Plan) -> None:
    """The rules above, before anything is written."""
    other = sorted(set(plan.formats_used()) - {"mxfp4", "bf16"})
    if other:
        raise ExportError(f"original: OpenAI's layout holds MXFP4 experts (bf16 ones are quantized to MXFP4); this "
                          f"checkpoint has {', '.join(other)} experts. Convert to bf16 first (python -m mxq.dequantize)")
    if plan.attention != "bf16" or plan.lm_head != "bf16":
        raise ExportError(f"original: attention and lm_head must be bf16 there, not {plan.attention} / {plan.lm_head}")
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg.num_hidden_layers)]
    fixed = {"layer_types": (cfg.layer_types, alternating), "rms_norm_eps": (cfg.rms_norm_eps, 1e-5),
             "swiglu_alpha": (cfg.swiglu_alpha, 1.702)}
    for key, (have, want) in fixed.items():
        if have != want:
            raise ExportError(f"original: OpenAI's reference model fixes {key}={want!r}; this model has {have!r} and "
                              "would compute differently there")
    if (cfg.rope_scaling or {}).get("rope_type") != "yarn":
        raise ExportError("original: OpenAI's config.json describes YaRN RoPE only (rope_scaling_factor, "
                          "rope_ntk_alpha/beta); this model has no YaRN rope_scaling")


def write_original(src, plan: Plan, out: Path, overwrite: bool = False, shard_bytes: int | None = None) -> Written:
    from . import Written

    cfg = src.config
    check_original(cfg, plan)
    n_bf16 = sum(1 for i in range(plan.num_layers) for f in plan.kept_formats(i) if f == "bf16")
    mx = replace(plan, experts=[[f if f == "prune" else "mxfp4" for f in row] for row in plan.experts])
    with AtomicFolder(out, overwrite) as tmp:
        write_shards(tmp, original_tensor_stream(hf_stream(src, mx, "mxfp4")), shard_bytes or DEFAULT_SHARD_BYTES)
        orig = replace(cfg, num_local_experts=plan.num_kept).to_original_dict()
        (tmp / "config.json").write_text(json.dumps(orig, indent=2) + "\n")
    notes = [f"{n_bf16} bf16 experts quantized to MXFP4 (OpenAI's rule; lossy)"] if n_bf16 else []
    return Written(Path(out), notes)
