"""Tensor streams of an export: (name, tensor or Packed), one layer at a time, in HF names.

Both streams take a ``WeightSource`` and a plan over that source's experts: pruned experts are skipped,
router rows / bias entries / expert biases are sliced to the kept experts, and every kept expert goes
through ``convert`` (bytes kept when its format does not change). Only one layer's experts are in
memory at a time.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import torch
from torch import Tensor

from ..formats import Packed
from ..formats.convert import convert, quantize_dense
from .errors import ExportError
from .mxq_layout import expert_base

if TYPE_CHECKING:                       # plans are data handed down by the caller; io never imports plan
    from ..plan.plan import Plan

HF_KIND = {"gate_up": "gate_up_proj", "down": "down_proj"}
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def bf16(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.bfloat16)


def linear_item(src, name: str, fmt: str) -> Tensor | Packed:
    """A dense weight as bf16, or packed in ``fmt`` (reusing the source's packed copy when it has one)."""
    if fmt == "bf16":
        return bf16(src.dense(name))
    p = src.linear(name)
    p = quantize_dense(src.dense(name), fmt, name) if p is None else convert(p, fmt, name)
    return Packed(p.format, {k: v.cpu() for k, v in p.tensors.items()}, p.shape, p.meta)


def dense_layer(src, plan: Plan, i: int) -> Iterator[tuple[str, Tensor | Packed]]:
    """Everything of layer ``i`` except the expert weight matrices."""
    p = f"model.layers.{i}."
    idx = torch.tensor(plan.kept(i), dtype=torch.long)
    yield p + "input_layernorm.weight", bf16(src.dense(p + "input_layernorm.weight"))
    for proj in PROJ:
        yield f"{p}self_attn.{proj}.weight", linear_item(src, f"{p}self_attn.{proj}.weight", plan.attention)
        yield f"{p}self_attn.{proj}.bias", bf16(src.dense(f"{p}self_attn.{proj}.bias"))
    yield p + "self_attn.sinks", bf16(src.dense(p + "self_attn.sinks"))
    yield p + "post_attention_layernorm.weight", bf16(src.dense(p + "post_attention_layernorm.weight"))
    for rest in ("mlp.router.weight", "mlp.router.bias", "mlp.experts.gate_up_proj_bias",
                 "mlp.experts.down_proj_bias"):
        t = src.dense(p + rest)
        yield p + rest, bf16(t.index_select(0, idx.to(t.device)))              # [K, ...]


def kept_experts(src, plan: Plan, i: int, kind: str) -> Iterator[Packed]:
    for e in plan.kept(i):
        q = convert(src.expert(i, kind, e), plan.experts[i][e], f"model.layers.{i}.mlp.experts.{e}.{kind}")
        yield Packed(q.format, {k: v.cpu() for k, v in q.tensors.items()}, q.shape, q.meta)


def hf_stream(src, plan: Plan, experts: str) -> Iterator[tuple[str, Tensor]]:
    """The exact gpt-oss HF layout (the published MXFP4 checkpoint's names, or transformers' dequantized
    layout for bf16) with ``experts`` "mxfp4" or "bf16" throughout."""
    if set(plan.formats_used()) != {experts} or plan.attention != "bf16" or plan.lm_head != "bf16":
        raise ExportError(f"the HF layout holds {experts} experts and bf16 attention/lm_head only; this plan has "
                        f"{plan.formats_used()}, attention {plan.attention}, lm_head {plan.lm_head}")
    yield "model.embed_tokens.weight", bf16(src.dense("model.embed_tokens.weight"))
    for i in range(plan.num_layers):
        yield from dense_layer(src, plan, i)
        for kind, hf in HF_KIND.items():
            ps = list(kept_experts(src, plan, i, kind))
            name = f"model.layers.{i}.mlp.experts.{hf}"
            if experts == "mxfp4":
                yield name + "_blocks", torch.stack([p.tensors["blocks"] for p in ps])    # [K, out, in/32, 16]
                yield name + "_scales", torch.stack([p.tensors["scales"] for p in ps])    # [K, out, in/32]
            else:
                w = torch.stack([p.tensors["weight"] for p in ps])                         # [K, out, in]
                yield name, w.transpose(1, 2).contiguous()                                # [K, in, out]
            del ps
    yield "model.norm.weight", bf16(src.dense("model.norm.weight"))
    yield "lm_head.weight", bf16(src.dense("lm_head.weight"))


def mxq_stream(src, plan: Plan) -> Iterator[tuple[str, Tensor | Packed]]:
    """mxq's layout (docs/export.md): dense tensors in HF names, each kept expert's Packed on its own."""
    yield "model.embed_tokens.weight", bf16(src.dense("model.embed_tokens.weight"))
    for i in range(plan.num_layers):
        yield from dense_layer(src, plan, i)
        for kind in HF_KIND:
            for j, p in enumerate(kept_experts(src, plan, i, kind)):
                yield expert_base(i, j, kind), p
    yield "model.norm.weight", bf16(src.dense("model.norm.weight"))
    yield "lm_head.weight", linear_item(src, "lm_head.weight", plan.lm_head)
