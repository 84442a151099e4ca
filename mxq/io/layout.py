"""The exact tensor sets of the two published layouts, per config.

HF: the module shapes of transformers ``models/gpt_oss/modeling_gpt_oss.py`` (459 tensors for gpt-oss-20b);
original: openai/gpt-oss ``gpt_oss/torch/weights.py``, mapped to HF names as transformers'
``convert_gpt_oss_weights_to_hf.py`` maps them.

Every tensor of a checkpoint must be one of these, with this shape and an allowed dtype; nothing may be
missing. This is what keeps mxq from silently skipping or inventing expert weights, as
other tools have (bitsandbytes-foundation/bitsandbytes#1849 skips fused 3-D expert parameters).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import GptOssConfig

FLOAT = ("BF16", "F32", "F16")   # 1-D/2-D float tensors: published files are BF16; F32/F16 load exactly too
U8 = ("U8",)
BF16 = ("BF16",)  # unquantized experts are held as the "bf16" format: stored BF16, kept exactly


@dataclass(frozen=True)
class Expected:
    shape: tuple[int, ...]
    dtypes: tuple[str, ...]


def hf_tensors(cfg: GptOssConfig, experts: str) -> dict[str, Expected]:
    """HF names -> expected shape/dtypes; ``experts`` is "mxfp4" (``*_blocks``/``*_scales``) or "bf16"."""
    H, I, E, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out: dict[str, Expected] = {
        "model.embed_tokens.weight": Expected((V, H), FLOAT),
        "model.norm.weight": Expected((H,), FLOAT),
        "lm_head.weight": Expected((V, H), FLOAT),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": Expected((H,), FLOAT),
            p + "self_attn.q_proj.weight": Expected((q, H), FLOAT), p + "self_attn.q_proj.bias": Expected((q,), FLOAT),
            p + "self_attn.k_proj.weight": Expected((kv, H), FLOAT), p + "self_attn.k_proj.bias": Expected((kv,), FLOAT),
            p + "self_attn.v_proj.weight": Expected((kv, H), FLOAT), p + "self_attn.v_proj.bias": Expected((kv,), FLOAT),
            p + "self_attn.o_proj.weight": Expected((H, q), FLOAT), p + "self_attn.o_proj.bias": Expected((H,), FLOAT),
            p + "self_attn.sinks": Expected((cfg.num_attention_heads,), FLOAT),
            p + "post_attention_layernorm.weight": Expected((H,), FLOAT),
            p + "mlp.router.weight": Expected((E, H), FLOAT), p + "mlp.router.bias": Expected((E,), FLOAT),
            p + "mlp.experts.gate_up_proj_bias": Expected((E, 2 * I), FLOAT),
            p + "mlp.experts.down_proj_bias": Expected((E, H), FLOAT),
        })
        if experts == "mxfp4":
            out.update({
                p + "mlp.experts.gate_up_proj_blocks": Expected((E, 2 * I, H // 32, 16), U8),
                p + "mlp.experts.gate_up_proj_scales": Expected((E, 2 * I, H // 32), U8),
                p + "mlp.experts.down_proj_blocks": Expected((E, H, I // 32, 16), U8),
                p + "mlp.experts.down_proj_scales": Expected((E, H, I // 32), U8),
            })
        else:  # transformers' dequantized layout: input-major ("transposed"), integrations/mxfp4.py
            out.update({
                p + "mlp.experts.gate_up_proj": Expected((E, H, 2 * I), BF16),
                p + "mlp.experts.down_proj": Expected((E, I, H), BF16),
            })
    return out


def original_tensors(cfg: GptOssConfig) -> dict[str, Expected]:
    """Original OpenAI names (``gpt_oss/torch/weights.py``); experts always MXFP4 there."""
    H, I, E, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out = {"embedding.weight": Expected((V, H), FLOAT), "norm.scale": Expected((H,), FLOAT),
           "unembedding.weight": Expected((V, H), FLOAT)}
    for i in range(cfg.num_hidden_layers):
        p = f"block.{i}."
        out.update({
            p + "attn.norm.scale": Expected((H,), FLOAT),
            p + "attn.qkv.weight": Expected((q + 2 * kv, H), FLOAT), p + "attn.qkv.bias": Expected((q + 2 * kv,), FLOAT),
            p + "attn.sinks": Expected((cfg.num_attention_heads,), FLOAT),
            p + "attn.out.weight": Expected((H, q), FLOAT), p + "attn.out.bias": Expected((H,), FLOAT),
            p + "mlp.norm.scale": Expected((H,), FLOAT),
            p + "mlp.gate.weight": Expected((E, H), FLOAT), p + "mlp.gate.bias": Expected((E,), FLOAT),
            p + "mlp.mlp1_weight.blocks": Expected((E, 2 * I, H // 32, 16), U8),
            p + "mlp.mlp1_weight.scales": Expected((E, 2 * I, H // 32), U8),
            p + "mlp.mlp1_bias": Expected((E, 2 * I), FLOAT),
            p + "mlp.mlp2_weight.blocks": Expected((E, H, I // 32, 16), U8),
            p + "mlp.mlp2_weight.scales": Expected((E, H, I // 32), U8),
            p + "mlp.mlp2_bias": Expected((E, H), FLOAT),
        })
    return out


# original name (per block) -> HF name (per layer); qkv is split separately.
ORIGINAL_TO_HF = {
    "attn.norm.scale": "input_layernorm.weight", "attn.sinks": "self_attn.sinks",
    "attn.out.weight": "self_attn.o_proj.weight", "attn.out.bias": "self_attn.o_proj.bias",
    "mlp.norm.scale": "post_attention_layernorm.weight", "mlp.gate.weight": "mlp.router.weight",
    "mlp.gate.bias": "mlp.router.bias", "mlp.mlp1_weight.blocks": "mlp.experts.gate_up_proj_blocks",
    "mlp.mlp1_weight.scales": "mlp.experts.gate_up_proj_scales", "mlp.mlp1_bias": "mlp.experts.gate_up_proj_bias",
    "mlp.mlp2_weight.blocks": "mlp.experts.down_proj_blocks", "mlp.mlp2_weight.scales": "mlp.experts.down_proj_scales",
    "mlp.mlp2_bias": "mlp.experts.down_proj_bias",
}
ORIGINAL_GLOBAL = {"embedding.weight": "model.embed_tokens.weight", "norm.scale": "model.norm.weight",
                   "unembedding.weight": "lm_head.weight"}


def check_tensors(found: dict, expected: dict[str, Expected], where: str) -> None:
    """Every expected tensor present with its shape and an allowed dtype; nothing unexpected."""
    from .safetensors_io import CheckpointError

    for name, exp in expected.items():
        if name not in found:
            raise CheckpointError(f"{where}: missing tensor {name!r} (expected {exp.dtypes[0]}{list(exp.shape)})")
        info = found[name]
        if tuple(info.shape) != exp.shape:
            raise CheckpointError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, expected "
                                  f"{list(exp.shape)} from the config")
        if info.dtype not in exp.dtypes:
            raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}, expected one of {list(exp.dtypes)}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        n = unexpected[0]
        raise CheckpointError(f"{found[n].file}: unexpected tensor {n!r}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
