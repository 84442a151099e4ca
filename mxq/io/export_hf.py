"""Streaming a loaded mxq model back out as an exact gpt-oss checkpoint (HF layout or original/)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from ..formats import get_format
from ..formats.mxfp4 import quantize_mxfp4
from .layout import ORIGINAL_GLOBAL, ORIGINAL_TO_HF
from .writer import MXFP4_QUANT_CONFIG, write_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.bfloat16)


def expert_stack(experts, kind: str, target: str) -> dict[str, torch.Tensor]:
    """One layer's experts as stacked tensors in ``target`` ("mxfp4": blocks/scales; "bf16": [E, out, in]).

    MXFP4 experts whose target is MXFP4 keep their bytes; anything else goes through exact dequantization.
    """
    if hasattr(experts, "gate_up_weight"):                       # DenseExperts (training)
        w = (experts.gate_up_weight if kind == "gate_up" else experts.down_weight).detach().float()
        dense = [w[e] for e in range(experts.num_experts)]
        packed = None
    else:
        packed = [experts.packed(kind, e) for e in range(experts.num_experts)]
        dense = None
    if target == "mxfp4":
        blocks, scales = [], []
        for e in range(experts.num_experts):
            if packed is not None and packed[e].format == "mxfp4":
                b, s = packed[e].tensors["blocks"], packed[e].tensors["scales"]
            else:
                w = dense[e] if dense is not None else get_format(packed[e].format).dequantize(packed[e])
                b, s = quantize_mxfp4(w)
            blocks.append(b.cpu())
            scales.append(s.cpu())
        return {"blocks": torch.stack(blocks), "scales": torch.stack(scales)}
    ws = [dense[e] if dense is not None else get_format(packed[e].format).dequantize(packed[e], torch.float32)
          for e in range(experts.num_experts)]
    return {"weight": torch.stack([_bf16(w).cpu() for w in ws])}


def hf_tensor_stream(model, experts: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in HF names, layer by layer; one layer's experts in memory at a time."""
    yield "model.embed_tokens.weight", _bf16(model.embed_tokens.weight)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", _bf16(layer.input_layernorm.weight)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m = getattr(layer.self_attn, proj)
            yield f"{p}self_attn.{proj}.weight", _bf16(m.weight)
            yield f"{p}self_attn.{proj}.bias", _bf16(m.bias)
        yield p + "self_attn.sinks", _bf16(layer.self_attn.sinks)
        yield p + "post_attention_layernorm.weight", _bf16(layer.post_attention_layernorm.weight)
        yield p + "mlp.router.weight", _bf16(layer.mlp.router.weight)
        yield p + "mlp.router.bias", _bf16(layer.mlp.router.bias)
        ex = layer.mlp.experts
        for kind, hf in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
            st = expert_stack(ex, kind, experts)
            if experts == "mxfp4":
                yield f"{p}mlp.experts.{hf}_blocks", st["blocks"]
                yield f"{p}mlp.experts.{hf}_scales", st["scales"]
            else:
                yield f"{p}mlp.experts.{hf}", st["weight"].transpose(1, 2).contiguous()   # [E, in, out]
            yield f"{p}mlp.experts.{hf}_bias", _bf16(getattr(ex, f"{kind}_bias"))
    yield "model.norm.weight", _bf16(model.norm.weight)
    yield "lm_head.weight", _bf16(model.lm_head.weight)


def original_tensor_stream(hf_stream: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """An HF stream with MXFP4 experts renamed to OpenAI's original layout (gpt_oss/torch/weights.py): q/k/v -> qkv."""
    inv_global = {v: k for k, v in ORIGINAL_GLOBAL.items()}
    inv = {v: k for k, v in ORIGINAL_TO_HF.items()}
    pending: dict[str, torch.Tensor] = {}
    for name, t in hf_stream:
        if name in inv_global:
            yield inv_global[name], t
            continue
        _, _, i, rest = name.split(".", 3)
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            pending[rest] = t
            if len(pending) == 6:
                for kind in ("weight", "bias"):
                    yield f"block.{i}.attn.qkv.{kind}", torch.cat(
                        [pending[f"self_attn.{x}.{kind}"] for x in ("q_proj", "k_proj", "v_proj")])
                pending = {}
            continue
        yield f"block.{i}.{inv[rest]}", t


def generation_config(cfg) -> dict:
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id, cfg.pad_token_id]
    out = {"bos_token_id": cfg.bos_token_id, "do_sample": True, "eos_token_id": [e for e in eos if e is not None],
           "pad_token_id": cfg.pad_token_id}
    return {k: v for k, v in out.items() if v is not None}


def save_model(model, out_dir: str | Path, experts: str = "mxfp4", tokenizer_dir: str | Path | None = None,
               with_original: bool = False, overwrite: bool = False, shard_bytes: int | None = None) -> Path:
    """Write ``model`` as an exact gpt-oss HF checkpoint (experts "mxfp4" or "bf16"), atomically.

    ``tokenizer_dir`` defaults to the folder the model was loaded from. ``with_original`` also writes the
    OpenAI ``original/`` folder (config + MXFP4 safetensors) beside it, as the published repos have.
    """
    if experts not in ("mxfp4", "bf16"):
        raise ValueError(f"experts must be 'mxfp4' or 'bf16', got {experts!r}")
    cfg = model.config
    cfg_d = cfg.to_hf_dict()
    if experts == "mxfp4":
        cfg_d["quantization_config"] = dict(MXFP4_QUANT_CONFIG)
    tok_src = Path(tokenizer_dir) if tokenizer_dir else (Path(model.source) if model.source else None)
    extra: dict = {}
    if tok_src is not None:
        for f in TOKENIZER_FILES:
            if (tok_src / f).exists():
                extra[f] = tok_src / f
    subdirs = {}
    if with_original:
        import json

        from .writer import write_shards

        def write_original(folder: Path) -> None:
            write_shards(folder, original_tensor_stream(hf_tensor_stream(model, "mxfp4")), shard_bytes or 4 * 1024**3)
            (folder / "config.json").write_text(json.dumps(cfg.to_original_dict(), indent=2) + "\n")

        subdirs["original"] = write_original
    kw = {} if shard_bytes is None else {"shard_bytes": shard_bytes}
    return write_checkpoint(out_dir, cfg_d, hf_tensor_stream(model, experts), extra, generation_config(cfg),
                            overwrite=overwrite, subdir_files=subdirs, **kw)
