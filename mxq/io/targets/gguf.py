"""GGUF for llama.cpp, architecture ``gpt-oss``, written with the llama.cpp project's own ``gguf`` package.

What llama.cpp expects was read from ggml-org/llama.cpp at 0c1e57098 (the revision llama-cpp-python 0.3.36
vendors): ``conversion/gpt_oss.py`` (GptOssModel: tensor names, the gate/up split of the interleaved
``gate_up_proj`` rows, the MXFP4 repack), ``conversion/base.py`` (TextModel.set_gguf_parameters: the
hyper-parameter keys; prepare_tensors: 1-D tensors, norms, biases and the router in F32),
``src/models/openai-moe.cpp`` (the tensors and keys the loader requires) and ``src/llama-vocab.cpp`` (the
pre-tokenizer names).

Experts are stored per layer as three tensors ``ffn_{gate,up,down}_exps`` of numpy shape [K, out, in]
(ggml ne = [in, out, K]) in one GGML type:

* MXFP4 experts are copied bit for bit into GGML's MXFP4 blocks (``block_mxfp4``: one E8M0 byte, then
  16 bytes where byte j holds element j in the low nibble and element j+16 in the high one; the HF
  layout keeps elements 2j / 2j+1 in byte j, so nibbles move but no value is re-rounded). The E2M1 codes
  index the same table (ggml doubles its ``kvalues`` and halves the scale: the same value).
* ``int4_g32`` experts (symmetric, nibble = q + 8) map exactly onto Q4_0 (fp16 d; byte j = elements j and
  j+16): the codes are kept, the bf16 scales become fp16 (checked to be exact, else refused).
* bf16 experts are written as BF16.
* Any other format has no exact GGML type and is refused, unless ``gguf_type`` asks for re-quantization
  (from the exact float32 dequantization, by gguf-py's reference quantizer); the relative Frobenius
  error of every re-quantized tensor is measured and returned (``mxq.convert`` prints it); the file records
  the type as ``mxq.requantized_to``.

Dense weights keep their bytes (BF16), 1-D tensors, norms, biases, the router and sinks are F32 (exact
from bf16), as llama.cpp's converter does; an fp8 attention projection or lm_head is written as its exact
float32 dequantization. The tokenizer is written in full (tokens, types, merges, special ids, chat
template) with ``tokenizer.ggml.pre`` set explicitly; see ``tokenizer_metadata``. Loader rules checked
before anything is written are listed in ``check_llama_cpp`` and docs/export.md.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ...formats import Packed, get_format
from ...formats.convert import convert
from ..errors import ExportError
from ..streams import dense_layer, kept_experts, linear_item

if TYPE_CHECKING:
    from ...plan.plan import Plan

ARCH = "gpt-oss"
LLAMA_CPP_REVISION = "ggml-org/llama.cpp@0c1e57098"
LLAMA_MAX_EXPERTS = 1024                 # src/llama-hparams.h
SWIGLU = (1.702, 7.0)                    # alpha, limit: constants of LLM_FFN_SWIGLU_OAI_MOE, src/llama-graph.cpp
KINDS = ("gate", "up", "down")
EXACT = ("mxfp4", "int4_g32", "bf16")     # expert formats with an exact GGML type: MXFP4, Q4_0, BF16


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF export needs the gguf package (the llama.cpp project's writer): pip install gguf") \
            from None
    return gguf


GGUF_TYPE_NAMES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "mxfp4")


def gguf_types() -> dict[str, object]:
    """``--gguf-type`` names -> GGMLQuantizationType: the types gguf-py can write from float32."""
    g = _gguf().GGMLQuantizationType
    return {n: getattr(g, n.upper()) for n in GGUF_TYPE_NAMES}


# ---------------------------------------------------------------------------------------------- tensors
def mxfp4_to_ggml(blocks: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """HF MXFP4 [..., n/32, 16] + [..., n/32] -> ggml ``block_mxfp4`` bytes [..., n/32 * 17] (bit-exact)."""
    lo, hi = blocks & 0x0F, blocks >> 4                                        # elements 2j, 2j+1
    codes = torch.stack((lo, hi), dim=-1).flatten(-2)                          # [..., n/32, 32]
    qs = codes[..., :16] | (codes[..., 16:] << 4)                              # byte j: j | (j + 16) << 4
    out = torch.cat((scales.unsqueeze(-1), qs), dim=-1)                        # [..., n/32, 17]
    return out.flatten(-2).contiguous().numpy()


def int4_to_q4_0(packed: torch.Tensor, scales: torch.Tensor, where: str) -> np.ndarray:
    """mxq ``int4_g32`` ([..., n/2] u8, element 2j low, nibble = q + 8; bf16 scales [..., n/32]) -> ggml
    ``block_q4_0`` bytes [..., n/32 * 18] (fp16 d, then byte j = element j | element j+16 << 4; value
    (nibble - 8) * d). Exact when every scale is an fp16 number, which is checked."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)            # [..., n]
    codes = codes.unflatten(-1, (-1, 32))                                              # [..., n/32, 32]
    qs = codes[..., :16] | (codes[..., 16:] << 4)                                      # [..., n/32, 16]
    d = scales.float().to(torch.float16)
    if not torch.equal(d.float(), scales.float()):
        raise ExportError(f"gguf: {where}: an int4_g32 scale is not an fp16 number, so Q4_0 cannot hold it "
                          "exactly; pass --gguf-type (e.g. q8_0) to re-quantize")
    out = torch.cat((d.contiguous().view(torch.uint8).unflatten(-1, (-1, 2)), qs), dim=-1)   # [..., n/32, 18]
    return out.flatten(-2).contiguous().numpy()


def _bf16_bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.uint8).numpy()


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


@dataclass
class Item:
    """One GGUF tensor: its name, numpy (byte) shape and type, and how to produce its data."""
    name: str
    shape: tuple[int, ...]                     # the numpy shape of ``make()``'s array
    np_dtype: type
    ggml_type: object | None                   # None: plain F32/F16 by numpy dtype
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.np_dtype).itemsize


@dataclass
class Requantized:
    """Relative Frobenius error ||W - Q(W)|| / ||W|| of every re-quantized tensor (W: mxq's dequantization)."""
    target: str
    errors: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        if not self.errors:
            return "no tensor re-quantized: every weight kept its exact values"
        e = np.array(list(self.errors.values()))
        return (f"{len(e)} expert tensors re-quantized to {self.target}: relative Frobenius error mean "
                f"{e.mean():.4g}, max {e.max():.4g} ({max(self.errors, key=self.errors.get)})")


class _LayerExperts:
    """The kept experts of one layer, converted to their plan formats, read once and reused for the
    three GGUF tensors of the layer (only this layer's experts are in memory)."""

    def __init__(self, src, plan: Plan):
        self.src, self.plan, self.key, self.cache = src, plan, None, {}

    def get(self, layer: int, kind: str) -> list[Packed]:
        if self.key != layer:
            self.key, self.cache = layer, {}
        if kind not in self.cache:
            self.cache[kind] = list(kept_experts(self.src, self.plan, layer, kind))
        return self.cache[kind]


def _rows(part: str) -> slice:
    """gate = even rows of gate_up, up = odd rows (HF interleaves them: conversion/gpt_oss.py)."""
    return {"gate": slice(0, None, 2), "up": slice(1, None, 2)}.get(part, slice(None))


def _expert_items(src, plan: Plan, i: int, experts: _LayerExperts, target, req: Requantized | None) -> list[Item]:
    cfg = src.config
    H, I, K = cfg.hidden_size, cfg.intermediate_size, plan.num_kept
    fmts = sorted(set(plan.kept_formats(i)))
    g = _gguf()
    out = []
    for part in KINDS:
        kind = "down" if part == "down" else "gate_up"
        rows, cols = (H, I) if part == "down" else (I, H)
        name = f"blk.{i}.ffn_{part}_exps.weight"

        def packed(kind=kind, part=part) -> list[Packed]:
            return experts.get(i, kind)

        if fmts == ["mxfp4"]:                                   # exact layers stay exact, whatever gguf_type says
            def make(packed=packed, part=part) -> np.ndarray:
                ps = packed()
                b = torch.stack([p.tensors["blocks"][_rows(part)] for p in ps])        # [K, rows, cols/32, 16]
                s = torch.stack([p.tensors["scales"][_rows(part)] for p in ps])        # [K, rows, cols/32]
                return mxfp4_to_ggml(b, s)
            out.append(Item(name, (K, rows, cols // 32 * 17), np.uint8, g.GGMLQuantizationType.MXFP4, make))
        elif fmts == ["int4_g32"]:
            def make(packed=packed, part=part, name=name) -> np.ndarray:
                ps = packed()
                q = torch.stack([p.tensors["packed"][_rows(part)] for p in ps])            # [K, rows, cols/2]
                s = torch.stack([p.tensors["scales"][_rows(part)] for p in ps])            # [K, rows, cols/32]
                return int4_to_q4_0(q, s, name)
            out.append(Item(name, (K, rows, cols // 32 * 18), np.uint8, g.GGMLQuantizationType.Q4_0, make))
        elif fmts == ["bf16"]:
            def make(packed=packed, part=part) -> np.ndarray:
                w = torch.stack([p.tensors["weight"][_rows(part)] for p in packed()])   # [K, rows, cols]
                return _bf16_bytes(w)
            out.append(Item(name, (K, rows, cols * 2), np.uint8, g.GGMLQuantizationType.BF16, make))
        else:
            out.append(_requantized_item(name, packed, part, (K, rows, cols), target, req))
    return out


def _requantized_item(name: str, packed, part: str, shape: tuple[int, int, int], target, req: Requantized) -> Item:
    g = _gguf()
    K, rows, cols = shape
    block, size = g.GGML_QUANT_SIZES[target]
    if cols % block:
        raise ExportError(f"{name}: rows of {cols} values cannot be stored as {target.name} (blocks of {block})")

    def make() -> np.ndarray:
        w = torch.stack([get_format(p.format).dequantize(p, torch.float32)[_rows(part)]
                         for p in packed()]).numpy()                                       # [K, rows, cols] fp32
        if target == g.GGMLQuantizationType.MXFP4:       # mxq's MXFP4 quantizer; MXFP4 experts keep their bytes
            ms = [convert(p, "mxfp4") for p in packed()]
            q = np.stack([mxfp4_to_ggml(m.tensors["blocks"][_rows(part)], m.tensors["scales"][_rows(part)])
                          for m in ms])
        elif target == g.GGMLQuantizationType.F32:
            q = w
        elif target == g.GGMLQuantizationType.F16:
            q = w.astype(np.float16)
        else:
            q = g.quants.quantize(w, target)
        back = q.astype(np.float32) if q.dtype != np.uint8 else g.quants.dequantize(q, target).reshape(w.shape)
        den = float(np.sqrt((w.astype(np.float64) ** 2).sum()))
        num = float(np.sqrt(((w.astype(np.float64) - back) ** 2).sum()))
        req.errors[name] = num / den if den > 0 else 0.0
        return q

    if target in (g.GGMLQuantizationType.F32, g.GGMLQuantizationType.F16):
        dt = np.float32 if target == g.GGMLQuantizationType.F32 else np.float16
        return Item(name, (K, rows, cols), dt, None, make)
    return Item(name, (K, rows, cols // block * size), np.uint8, target, make)


HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.sinks": "attn_sinks.weight", "mlp.router.weight": "ffn_gate_inp.weight",
    "mlp.router.bias": "ffn_gate_inp.bias",
}
BF16_WEIGHTS = {"attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight"}


class _Lazy:
    """Dense tensors of one layer, read from the source only when the writer reaches them."""

    def __init__(self, src, plan: Plan):
        self.src, self.plan, self.layer, self.items = src, plan, None, {}

    def get(self, i: int, hf: str):
        if self.layer != i:
            self.layer, self.items = i, dict(dense_layer(self.src, self.plan, i))
        return self.items[f"model.layers.{i}.{hf}"]


def tensor_items(src, plan: Plan, target=None, req: Requantized | None = None) -> list[Item]:
    """Every tensor of the GGUF, in file order, each produced on demand (one layer in memory at a time)."""
    cfg = src.config
    V, H = cfg.vocab_size, cfg.hidden_size
    g = _gguf()
    items = [Item("token_embd.weight", (V, H * 2), np.uint8, g.GGMLQuantizationType.BF16,
                  lambda: _bf16_bytes(src.dense("model.embed_tokens.weight")))]
    lazy, experts = _Lazy(src, plan), _LayerExperts(src, plan)
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    K = plan.num_kept
    shapes = {"input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
              "self_attn.q_proj.weight": (q, H), "self_attn.q_proj.bias": (q,),
              "self_attn.k_proj.weight": (kv, H), "self_attn.k_proj.bias": (kv,),
              "self_attn.v_proj.weight": (kv, H), "self_attn.v_proj.bias": (kv,),
              "self_attn.o_proj.weight": (H, q), "self_attn.o_proj.bias": (H,),
              "self_attn.sinks": (cfg.num_attention_heads,), "mlp.router.weight": (K, H), "mlp.router.bias": (K,)}
    for i in range(plan.num_layers):
        for hf, gg in HF_TO_GGUF.items():
            name = f"blk.{i}.{gg}"
            shape = shapes[hf]
            if gg in BF16_WEIGHTS and plan.attention == "bf16":
                items.append(Item(name, (*shape[:-1], shape[-1] * 2), np.uint8, g.GGMLQuantizationType.BF16,
                                  lambda i=i, hf=hf: _bf16_bytes(lazy.get(i, hf))))
            elif gg in BF16_WEIGHTS:                             # fp8: exact float32 dequantization
                items.append(Item(name, shape, np.float32, None, lambda i=i, hf=hf: _f32(
                    get_format(lazy.get(i, hf).format).dequantize(lazy.get(i, hf), torch.float32))))
            else:
                items.append(Item(name, shape, np.float32, None, lambda i=i, hf=hf: _f32(lazy.get(i, hf))))
        for part, hf in (("gate", "gate_up_proj_bias"), ("up", "gate_up_proj_bias"), ("down", "down_proj_bias")):
            n = H if part == "down" else cfg.intermediate_size
            sl = _rows(part)
            items.append(Item(f"blk.{i}.ffn_{part}_exps.bias", (K, n), np.float32, None,
                              lambda i=i, hf=hf, sl=sl: _f32(lazy.get(i, f"mlp.experts.{hf}")[:, sl])))
        items.extend(_expert_items(src, plan, i, experts, target, req))
    items.append(Item("output_norm.weight", (H,), np.float32, None, lambda: _f32(src.dense("model.norm.weight"))))
    if plan.lm_head == "bf16":
        items.append(Item("output.weight", (V, H * 2), np.uint8, g.GGMLQuantizationType.BF16,
                          lambda: _bf16_bytes(src.dense("lm_head.weight"))))
    else:
        items.append(Item("output.weight", (V, H), np.float32, None, lambda: _f32(get_format(plan.lm_head).dequantize(
            linear_item(src, "lm_head.weight", plan.lm_head), torch.float32))))
    return items


# ---------------------------------------------------------------------------------------------- rules
def check_llama_cpp(src, plan: Plan, target) -> None:
    """Refuse, before writing, what llama.cpp's gpt-oss loader cannot hold or would run differently.

    Rules (llama.cpp 0c1e57098): one GGML type per layer's expert tensor (``ffn_*_exps`` is one
    [in, out, n_expert] tensor, src/models/openai-moe.cpp); the same expert count in every layer (one
    ``expert_count`` key); n_expert <= LLAMA_MAX_EXPERTS (src/llama-hparams.h) and top-k <= n_expert;
    SwiGLU alpha 1.702 and limit 7.0 (constants in src/llama-graph.cpp, not read from the file);
    block-quantized rows a multiple of the block (32 for MXFP4/Q4_0/Q8_0); RoPE plain or YaRN.
    """
    cfg = src.config
    K = plan.num_kept
    if K > LLAMA_MAX_EXPERTS:
        raise ExportError(f"gguf: {K} experts per layer; llama.cpp holds at most {LLAMA_MAX_EXPERTS} (LLAMA_MAX_EXPERTS)")
    if cfg.num_experts_per_tok > K:
        raise ExportError(f"gguf: top-k {cfg.num_experts_per_tok} exceeds the {K} experts kept per layer")
    if (cfg.swiglu_alpha, cfg.swiglu_limit) != SWIGLU:
        raise ExportError(f"gguf: llama.cpp's gpt-oss SwiGLU uses alpha={SWIGLU[0]}, limit={SWIGLU[1]} as constants; "
                          f"this model has alpha={cfg.swiglu_alpha}, limit={cfg.swiglu_limit} and would run "
                          "differently there")
    rope = (cfg.rope_scaling or {}).get("rope_type")
    if rope not in (None, "default", "yarn"):
        raise ExportError(f"gguf: rope_scaling type {rope!r} is not one llama.cpp's gpt-oss reads (yarn or none)")
    for i in range(plan.num_layers):
        fmts = sorted(set(plan.kept_formats(i)))
        if len(fmts) > 1 and target is None:
            raise ExportError(
                f"gguf: layer {i} holds experts in {', '.join(fmts)}; llama.cpp stores a layer's experts as one "
                "tensor of one type. Options: a plan with one format per layer (every layer may differ), or "
                "--gguf-type T to re-quantize such layers to T (the added error is reported)")
        if target is None and fmts[0] not in EXACT:
            raise ExportError(
                f"gguf: layer {i} experts are {fmts[0]}, which has no exact GGML type (exact: mxfp4 -> MXFP4, "
                f"int4_g32 -> Q4_0, bf16 -> BF16). Pass --gguf-type with one of {', '.join(gguf_types())} to re-quantize from "
                "the exact dequantization (the added error is reported), or convert to bf16 first")
    for dim, what in ((cfg.hidden_size, "hidden_size"), (cfg.intermediate_size, "intermediate_size")):
        blk = 32 if target is None else _gguf().GGML_QUANT_SIZES[target][0]
        if dim % blk:
            raise ExportError(f"gguf: {what}={dim} is not a multiple of the {blk}-value quantization block")


# ---------------------------------------------------------------------------------------------- tokenizer
def _o200k_pattern() -> str:
    from ...tokenizer import O200K_PATTERN

    return O200K_PATTERN


def tokenizer_metadata(tok_dir: Path | None, cfg) -> dict:
    """Tokens, types, merges and special ids for ``tokenizer.ggml.*`` from the source's ``tokenizer.json``.

    llama.cpp picks its pre-tokenizer from ``tokenizer.ggml.pre`` (src/llama-vocab.cpp); a missing or unknown
    name falls back to a hash lookup in its converter. Here the name is set explicitly, after checking that
    the tokenizer's split regex is the one that name implements (tiktoken's o200k pattern -> "gpt-4o").
    Ids below ``vocab_size`` that the tokenizer does not define are written as unused ``[PAD{id}]`` tokens,
    as llama.cpp's converter does.
    """
    path = Path(tok_dir) / "tokenizer.json" if tok_dir else None
    if path is None or not path.is_file():
        raise ExportError(f"gguf: the tokenizer is part of a GGUF, and {path or 'the source'} has no tokenizer.json")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"{path}: tokenizer model {model.get('type')!r}; the GGUF export writes byte-level BPE only")
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [p for p in parts if p.get("type") == "Split"]
    regex = splits[0].get("pattern", {}).get("Regex") if len(splits) == 1 else None
    if not (regex == _o200k_pattern() and any(p.get("type") == "ByteLevel" for p in parts)):
        raise ExportError(f"{path}: pre-tokenizer {json.dumps(pre)[:200]} is not tiktoken's o200k split + byte level; "
                          "llama.cpp has no pre-tokenizer name known to match it exactly, so tokenization would differ")
    vocab: dict[str, int] = dict(model["vocab"])
    special = set()
    for t in tj.get("added_tokens") or []:
        vocab[t["content"]] = t["id"]
        if t.get("special"):
            special.add(t["id"])
    n = cfg.vocab_size
    if max(vocab.values()) >= n:
        raise ExportError(f"{path}: token id {max(vocab.values())} is outside the model's vocab_size {n}")
    T = _gguf().TokenType
    tokens, types = [f"[PAD{i}]" for i in range(n)], [int(T.UNUSED)] * n
    for s, i in vocab.items():
        tokens[i] = s
        types[i] = int(T.CONTROL if i in special else (T.USER_DEFINED if s not in model["vocab"] else T.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    tc_path = Path(tok_dir) / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    chat = Path(tok_dir) / "chat_template.jinja"
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    return {"pre": "gpt-4o", "tokens": tokens, "types": types, "merges": merges, "bos": cfg.bos_token_id,
            "eos": eos, "pad": cfg.pad_token_id, "add_bos": bool(tc.get("add_bos_token", False)),
            "chat_template": chat.read_text(encoding="utf-8") if chat.is_file() else tc.get("chat_template")}


# ---------------------------------------------------------------------------------------------- writing
def _write_metadata(w, cfg, plan: Plan, tok: dict, name: str, ftype: int | None, req: Requantized | None) -> None:
    g = _gguf()
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_theta))
    y = cfg.rope_scaling or {}
    if y.get("rope_type") == "yarn":
        w.add_rope_scaling_type(g.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(y["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(y["original_max_position_embeddings"]))
        w.add_rope_scaling_yarn_beta_fast(float(y.get("beta_fast", 32.0)))
        w.add_rope_scaling_yarn_beta_slow(float(y.get("beta_slow", 1.0)))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_expert_count(plan.num_kept)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_feed_forward_length(cfg.intermediate_size)
    w.add_sliding_window(cfg.sliding_window)
    w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])   # explicit, per layer
    if ftype is not None:
        w.add_file_type(ftype)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
        if tok[key] is not None:
            fn(int(tok[key]))
    w.add_add_bos_token(tok["add_bos"])
    if tok["chat_template"]:
        w.add_chat_template(tok["chat_template"])
    w.add_string("mxq.plan_formats", json.dumps(plan.formats_used(), sort_keys=True))
    if req is not None:
        w.add_string("mxq.requantized_to", req.target)


def _file_type(plan: Plan, target) -> int | None:
    g = _gguf()
    used = set(plan.formats_used())
    if target is None and used == {"mxfp4"}:
        return int(g.LlamaFileType.MOSTLY_MXFP4_MOE)
    if target is None and used == {"bf16"}:
        return int(g.LlamaFileType.MOSTLY_BF16)
    return None


def write_gguf(src, plan: Plan, out: str | Path, overwrite: bool = False, gguf_type: str | None = None,
               name: str | None = None) -> tuple[Path, Requantized | None]:
    """Write ``src`` under ``plan`` as one GGUF file ``out`` (atomic: a temp file renamed when complete)."""
    g = _gguf()
    types = gguf_types()
    if gguf_type is not None and gguf_type not in types:
        raise ExportError(f"--gguf-type {gguf_type!r}: choose from {', '.join(types)}")
    target = types[gguf_type] if gguf_type else None
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    plan.check(src.config)
    check_llama_cpp(src, plan, target)
    tok = tokenizer_metadata(src.tokenizer_dir, src.config)
    req = Requantized(gguf_type) if target is not None else None
    items = tensor_items(src, plan, target, req)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    logging.getLogger("gguf").setLevel(logging.WARNING)      # its per-file INFO lines repeat what we print
    try:
        w = g.GGUFWriter(str(tmp), ARCH)
        _write_metadata(w, src.config, plan, tok, name or out.stem, _file_type(plan, target), req)
        for it in items:
            w.add_tensor_info(it.name, it.shape, np.dtype(it.np_dtype), it.nbytes, raw_dtype=it.ggml_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for it in items:
            a = it.make()
            if a.shape != it.shape or a.dtype != np.dtype(it.np_dtype):
                raise ExportError(f"gguf: internal error, {it.name} is {a.dtype}{list(a.shape)}, "
                                  f"announced {np.dtype(it.np_dtype)}{list(it.shape)}")
            w.write_tensor_data(a)
        w.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out, req
