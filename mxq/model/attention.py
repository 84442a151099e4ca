"""Attention with learned sinks, GQA and the alternating sliding window (format spec 4.3).

Sinks (one logit per head, unscaled) are appended to each softmax row and their probability dropped,
so rows may sum to less than one; a fully masked row (a padding query) then yields zeros, not NaN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import GptOssConfig
from .cache import KVCache
from .rope import apply_rope


def attention_mask(q_index: Tensor, k_valid: Tensor, window: int | None) -> Tensor:
    """Boolean [B, 1, T, S] mask of allowed keys.

    q_index [T]: cache index of each query; k_valid [B, S]: real keys. Causal and windowed on cache
    indices (transformers does the same), which equals token distance when padding sits at one end.
    """
    s = k_valid.shape[1]
    k_index = torch.arange(s, device=q_index.device)
    allowed = k_index[None, :] <= q_index[:, None]                           # [T, S]
    if window is not None:
        allowed &= k_index[None, :] > q_index[:, None] - window
    return allowed[None, None] & k_valid[:, None, None, :]


class SinkAttention(nn.Module):
    def __init__(self, cfg: GptOssConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.hd, bias=True)
        self.k_proj = nn.Linear(h, self.n_kv * self.hd, bias=True)
        self.v_proj = nn.Linear(h, self.n_kv * self.hd, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.hd, h, bias=True)
        self.sinks = nn.Parameter(torch.zeros(self.n_heads))
        self.window = cfg.sliding_window if cfg.is_sliding(layer) else None
        self.scale = self.hd ** -0.5

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, k_valid: Tensor, q_index: Tensor,
                cache: KVCache | None) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.hd).transpose(1, 2)   # [B, nh, T, d]
        k = self.k_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)      # [B, kv, T, d]
        v = self.v_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                                # [B, kv, S, d]
        s = k.shape[2]
        g = self.n_heads // self.n_kv                                           # query head h uses kv head h // g
        qg = q.view(b, self.n_kv, g * t, self.hd)                               # [B, kv, g*T, d]
        scores = (qg @ k.transpose(-1, -2)).view(b, self.n_heads, t, s).float() * self.scale  # [B, nh, T, S]
        allowed = attention_mask(q_index, k_valid, self.window)                 # [B, 1, T, S]
        scores = scores.masked_fill(~allowed, float("-inf"))
        sink = self.sinks.float().view(1, -1, 1, 1).expand(b, -1, t, 1)         # [B, nh, T, 1]
        probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
        probs = probs.to(v.dtype).view(b, self.n_kv, g * t, s)
        o = (probs @ v).view(b, self.n_heads, t, self.hd)                       # [B, nh, T, d]
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * self.hd))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm in fp32, cast back to the activation dtype (spec 4.2)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * xf).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


__all__ = ["SinkAttention", "RMSNorm", "attention_mask", "rms_norm", "F"]
