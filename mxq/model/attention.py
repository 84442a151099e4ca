"""Attention with learned sinks, GQA and the alternating sliding window, as in openai/gpt-oss
``gpt_oss/torch/model.py`` (``sdpa``, ``AttentionBlock``) and transformers
``models/gpt_oss/modeling_gpt_oss.py`` (``eager_attention_forward``); see docs/references.md.

Sinks (one logit per head, unscaled) are appended to each softmax row and their probability dropped,
so rows may sum to less than one; a fully masked row (a padding query) then yields zeros, not NaN.

Two implementations of the same math (``SinkAttention.impl``):

* ``eager``: the scores [B, nh, T, S] are materialised, masked, concatenated with the sink column and
  softmaxed in fp32 (``eager_sink_attention``). q @ k^T and the probabilities are rounded to the
  activation dtype like the OpenAI torch reference and transformers' eager path do. Exact, but at calibration scale
  (B=64, 64 heads, T=S=512) every layer moves ~30 GB through memory for it.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with the sink as one extra key whose
  key and value rows are zero and whose score comes from the additive mask (``sdpa_sink_attention``).
  Same softmax denominator; the only [*, nh, T, S] tensor is the additive mask, of batch size 1 when
  no key is padding.

``auto`` (the default) is ``sdpa`` for CUDA tensors when no gradient is recorded (calibration,
evaluation, generation) and ``eager`` otherwise:
* CUDA, bf16: the point of SDPA (router statistics over calibration batches at gpt-oss-20b scale). Its kernels keep the
  scores in fp32 and round only the probabilities before @ v, so the result is closer to a float32
  computation than the eager bf16 one (tests/test_attention.py measures both against float32).
* CPU (float32 tests, the tiny model): eager, so that CPU results, the statistics and KL caches built on
  them and the parity tests against transformers' eager attention stay bit for bit what they were. SDPA
  is faster on CPU too (1.7x the forward pass of the tiny preset, ``bench/calib.py --attn sdpa``) and
  agrees with eager within 2e-7 relative in float32; select it with ``set_attention_impl``.
* Training (autograd on): eager, the path training was validated with; the sinks' gradient would
  otherwise flow through the additive mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import GptOssConfig
from .cache import KVCache
from .rope import apply_rope

ATTN_IMPLS = ("auto", "eager", "sdpa")
# Largest additive mask one SDPA call may take, in elements; padded batches are split over the batch
# so that the [b, nh, T, S+1] mask stays below it (256 MiB in fp32, 128 MiB in bf16).
MAX_BIAS_ELEMS = 1 << 26
_BIAS_ALIGN = 16   # mask rows start 16-element aligned, so the memory-efficient CUDA kernel takes it without a copy


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


class AttentionMasks:
    """The allowed-key masks of one forward pass, built once per window type and shared by every layer.

    When no key of the batch is padding the masks have batch size 1 and broadcast, so that the SDPA
    path adds a [1, nh, T, S+1] mask instead of a [B, nh, T, S+1] one. Finding that out costs one host
    sync per forward pass (``k_valid.all()``), not one per layer, and none when the caller knows
    (``dense=True``: no attention mask and no cache).
    """

    def __init__(self, q_index: Tensor, k_valid: Tensor, dense: bool | None = None):
        self.q_index, self.k_valid = q_index, k_valid            # [T], [B, S]
        self._dense = dense                                      # None: find out on first use
        self._masks: dict[int | None, Tensor] = {}

    @property
    def dense(self) -> bool:
        """True when every key of every row is real (no padding)."""
        if self._dense is None:
            self._dense = bool(self.k_valid.all())
        return self._dense

    def allowed(self, window: int | None) -> Tensor:
        """[B or 1, 1, T, S] bool: causal, windowed (``window``) and key-padding mask."""
        if window not in self._masks:
            kv = self.k_valid[:1] if self.dense else self.k_valid
            self._masks[window] = attention_mask(self.q_index, kv, window)
        return self._masks[window]


def eager_sink_attention(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor, scale: float, allowed: Tensor) -> Tensor:
    """Reference sink attention. q [B, nh, T, d], k/v [B, kv, S, d], sinks [nh], allowed [B|1, 1, T, S].

    Query head h uses kv head h // g (g = nh / kv; transformers' ``repeat_kv`` repeats each kv head g times).
    Returns o [B, nh, T, d] in v's dtype.
    """
    b, nh, t, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    g = nh // kv
    qg = q.reshape(b, kv, g * t, d)                                              # [B, kv, g*T, d]
    scores = (qg @ k.transpose(-1, -2)).view(b, nh, t, s).float() * scale        # [B, nh, T, S]
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink = sinks.float().view(1, -1, 1, 1).expand(b, -1, t, 1)                   # [B, nh, T, 1]
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    probs = probs.to(v.dtype).view(b, kv, g * t, s)
    return (probs @ v).view(b, nh, t, d)                                         # [B, nh, T, d]


def sink_bias(allowed: Tensor, sinks: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive mask [b, nh, T, S+1] in ``dtype``: 0 where allowed, -inf where masked, column S = sinks[h].

    allowed [b, 1, T, S] bool, sinks [nh]. The rows live in a buffer whose last dimension is padded to a
    multiple of 16, so every stride but the last is aligned (the memory-efficient kernel would otherwise
    copy the mask to pad it). The sink column is never masked, so no row is empty.
    """
    b, _, t, s = allowed.shape
    nh = sinks.shape[0]
    width = -(-(s + 1) // _BIAS_ALIGN) * _BIAS_ALIGN
    bias = torch.empty(b, nh, t, width, dtype=dtype, device=allowed.device)[..., :s + 1]
    neg = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
    bias[..., :s] = neg                                                          # broadcast over heads
    bias[..., s] = sinks.to(dtype).view(1, nh, 1)
    return bias


def _with_sink_row(x: Tensor) -> Tensor:
    """[B, kv, S, d] -> [B, kv, S+1, d] with a zero last row: the sink's key (score 0 + bias) and value."""
    return torch.cat((x, x.new_zeros(x.shape[0], x.shape[1], 1, x.shape[3])), dim=2)


def sdpa_sink_attention(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor, scale: float, allowed: Tensor,
                        max_bias_elems: int = MAX_BIAS_ELEMS) -> Tensor:
    """Sink attention through ``scaled_dot_product_attention``; same arguments and result as the eager one.

    Why this form (exact, and robust across torch >= 2.4):
    * The sink is a key with a zero key row and a zero value row, and the additive mask holds
      sinks[h] in its column: its score is q . 0 * scale + sinks[h] = sinks[h] (unscaled, as in both references), it
      adds exp(sinks[h]) to the softmax denominator and nothing to the output. No torch API has to
      return the log-sum-exp for this (the public SDPA does not; flex_attention's needs compilation).
    * GQA without ``enable_gqa`` (torch >= 2.5 only, and the memory-efficient kernel, the one that
      accepts an arbitrary mask, does not support it): the g query heads of a kv head are stacked as
      g*T query rows, as in the eager path, so k and v are never repeated. The mask row of query row
      j*T + t is that of (head kv*g + j, position t); causality and the window live in the mask.
    * Padded batches need a per-row mask; it is built for at most ``max_bias_elems`` elements at a time
      by splitting the batch, so that a padded calibration batch cannot allocate gigabytes.
    """
    b, nh, t, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    g = nh // kv
    qg = q.reshape(b, kv, g * t, d)                                              # [B, kv, g*T, d]
    k1, v1 = _with_sink_row(k), _with_sink_row(v)                                # [B, kv, S+1, d]
    rows = allowed.shape[0]                                                      # 1 (broadcast) or B
    step = rows if rows == 1 else max(1, min(b, max_bias_elems // max(1, nh * t * (s + 1))))
    outs = []
    for r0 in range(0, b if rows > 1 else 1, step):
        sl = slice(r0, r0 + step) if rows > 1 else slice(None)
        bias = sink_bias(allowed[sl], sinks, q.dtype).view(-1, kv, g * t, s + 1)   # [b', kv, g*T, S+1]
        outs.append(F.scaled_dot_product_attention(qg[sl], k1[sl], v1[sl], attn_mask=bias, scale=scale))
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)                    # [B, kv, g*T, d]
    return o.reshape(b, nh, t, d)             # SDPA backends may return a non-contiguous layout (fp32 on CUDA)


def resolve_impl(impl: str, device: torch.device, grad: bool) -> str:
    """``auto`` -> ``sdpa`` on CUDA without autograd (``grad`` False), ``eager`` otherwise (module docstring)."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {', '.join(ATTN_IMPLS)}")
    if impl == "auto":
        return "sdpa" if device.type == "cuda" and not grad else "eager"
    return impl


class SinkAttention(nn.Module):
    impl: str = "auto"   # "auto" | "eager" | "sdpa"; set per module or with ``set_attention_impl``

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

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, masks: AttentionMasks, cache: KVCache | None) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.hd).transpose(1, 2)   # [B, nh, T, d]
        k = self.k_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)      # [B, kv, T, d]
        v = self.v_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                                # [B, kv, S, d]
        allowed = masks.allowed(self.window)                                    # [B|1, 1, T, S]
        impl = resolve_impl(self.impl, x.device, torch.is_grad_enabled())
        attend = sdpa_sink_attention if impl == "sdpa" else eager_sink_attention
        o = attend(q, k, v, self.sinks, self.scale, allowed)                    # [B, nh, T, d]
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * self.hd))


def set_attention_impl(model: nn.Module, impl: str) -> None:
    """Select the attention implementation of every ``SinkAttention`` in ``model``."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {', '.join(ATTN_IMPLS)}")
    for m in model.modules():
        if isinstance(m, SinkAttention):
            m.impl = impl


def inference_attention_impl(model: nn.Module) -> str:
    """What ``model``'s attention runs without autograd on its device: "eager", "sdpa" or "mixed"."""
    dev = next(model.parameters()).device
    impls = {resolve_impl(m.impl, dev, False) for m in model.modules() if isinstance(m, SinkAttention)}
    return impls.pop() if len(impls) == 1 else "mixed"


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm in fp32, cast back to the activation dtype (transformers ``GptOssRMSNorm``, OpenAI ``RMSNorm``)."""
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


__all__ = ["ATTN_IMPLS", "AttentionMasks", "SinkAttention", "RMSNorm", "attention_mask", "eager_sink_attention",
           "inference_attention_impl", "rms_norm", "sdpa_sink_attention", "set_attention_impl", "sink_bias", "F"]
