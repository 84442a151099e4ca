"""Rotary embeddings with YaRN scaling, as GPT-OSS uses them (openai/gpt-oss ``RotaryEmbedding`` in
``gpt_oss/torch/model.py``; transformers ``modeling_rope_utils.py::_compute_yarn_parameters``).

YaRN: Peng et al., "YaRN: Efficient Context Window Extension of LLMs", arXiv 2309.00071. GPT-OSS sets
``truncate: false``: the correction range [low, high] is used unrounded (a missing key means true in
transformers and vLLM, which is a different model).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import GptOssConfig


def yarn_inv_freq(cfg: GptOssConfig) -> tuple[Tensor, float]:
    """-> (inv_freq [head_dim/2] float64, attention concentration C)."""
    y = cfg.yarn
    d = cfg.head_dim
    base, factor = float(cfg.rope_theta), float(y["factor"])
    ctx0 = float(y["original_max_position_embeddings"])
    beta_fast, beta_slow = float(y["beta_fast"]), float(y["beta_slow"])
    j = torch.arange(0, d, 2, dtype=torch.float64)
    freq = base ** (j / d)                                                   # [d/2]
    if factor == 1.0:
        return 1.0 / freq, 1.0

    def corr(beta: float) -> float:
        return (d * math.log(ctx0 / (beta * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr(beta_fast), corr(beta_slow)
    if y.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0.0), min(high, d - 1.0)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp                                                        # 1 = extrapolate
    inv = (1.0 / (factor * freq)) * (1 - keep) + (1.0 / freq) * keep
    conc = y.get("attention_factor") or (0.1 * math.log(factor) + 1.0)
    return inv, float(conc)


class Rope(torch.nn.Module):
    """cos/sin tables per position; computed in fp32 and cast to the activation dtype (as both references do)."""

    def __init__(self, cfg: GptOssConfig):
        super().__init__()
        inv, conc = yarn_inv_freq(cfg)
        self.register_buffer("inv_freq", inv.float(), persistent=False)
        self.concentration = conc

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # position_ids [B, T] -> cos, sin [B, T, d/2]
        ang = position_ids.float().unsqueeze(-1) * self.inv_freq.to(position_ids.device)
        return (ang.cos() * self.concentration).to(dtype), (ang.sin() * self.concentration).to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Half-split ("NeoX") rotation. x [B, heads, T, d]; cos/sin [B, T, d/2]."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)                                # [B, 1, T, d/2]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
