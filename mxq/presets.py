"""Model presets: the gpt-oss configurations (their published ``config.json``) and the embedded ``tiny`` model.

``tiny`` has the exact GPT-OSS architecture at laptop size: 4 layers x 32 experts with top-4 (like
gpt-oss-20b's routing), alternating sliding/full attention, GQA, YaRN, sinks, clamped SwiGLU, so that
its checkpoint in the native MXFP4 layout stays under 12 MB (small enough to ship inside the package).
"""
from __future__ import annotations

from typing import Any

_GPT_OSS_COMMON: dict[str, Any] = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_key_value_heads": 8,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "use_cache": True,
    "vocab_size": 201088,
}


def _layer_types(n: int) -> list[str]:
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]


def _preset(num_layers: int, num_experts: int, **over: Any) -> dict[str, Any]:
    cfg = dict(_GPT_OSS_COMMON)
    cfg.update(num_hidden_layers=num_layers, num_local_experts=num_experts, **over)
    cfg["layer_types"] = _layer_types(cfg["num_hidden_layers"])
    return cfg


PRESETS: dict[str, dict[str, Any]] = {
    "gpt-oss-20b": _preset(24, 32),
    "gpt-oss-120b": _preset(36, 128),
    # The embedded reference model (mxq/assets/tiny/README.md). Token ids follow its own BPE tokenizer:
    # 0 = <|endoftext|> (pad, eos), 1 = <|startoftext|> (bos).
    "tiny": _preset(
        4, 32,
        hidden_size=192, intermediate_size=128, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
        vocab_size=6144, eos_token_id=0, pad_token_id=0, bos_token_id=1, max_position_embeddings=131072,
    ),
}


def preset_config(name: str) -> dict[str, Any]:
    """A fresh copy of a preset's HF ``config.json`` dict (without ``quantization_config``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    import copy

    return copy.deepcopy(PRESETS[name])


def resolve_preset_path(name: str):
    """The local folder of a preset: the packaged ``tiny`` model, or a gpt-oss checkpoint that a user
    already has in the Hugging Face cache (``HF_HOME``/hub); ``None`` when not found. Nothing is downloaded.
    """
    import os
    from pathlib import Path

    if name == "tiny":
        p = Path(__file__).parent / "assets" / "tiny"
        return p if (p / "config.json").exists() else None
    if name in ("gpt-oss-20b", "gpt-oss-120b"):
        hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
        snaps = sorted((hub.expanduser() / f"models--openai--{name}" / "snapshots").glob("*/config.json"))
        return snaps[-1].parent if snaps else None
    return None
