"""Sampling for the fast decode: temperature, top-k and top-p (nucleus) without host synchronisation.

Everything here has fixed shapes and no data-dependent control flow, so it runs inside the captured decode
graph (docs/runtime.md):

* the parameters live in device tensors (``DeviceSampler``): one captured graph serves any temperature, top-p
  and top-k; only whether the distribution is truncated at all (``SamplingParams.filtered``: top-p < 1 or
  top-k > 0, which needs a sort of the vocabulary) is fixed at capture time;
* the draw is the exponential race (Gumbel-max): ``argmax_i (log p_i - log E_i)`` with ``E_i = -log U_i``,
  ``U_i`` uniform, which picks i with probability p_i exactly. ``torch.multinomial`` is not used: it checks
  its input on the host (a sync, illegal during capture in older torch);
* random numbers come from ``torch.rand`` on the default CUDA generator, which torch registers with every
  graph capture: each replay advances the generator's Philox offset by what the captured step consumed, so
  every replay draws fresh numbers and ``torch.manual_seed`` makes a run reproducible. A custom
  ``generator`` is accepted outside graphs only (eager use, CPU tests).

Semantics follow transformers' ``generate`` order: logits / temperature, then top-k, then top-p over the
renormalised top-k distribution (the token that crosses p is kept, so the top token always survives);
temperature 0 is greedy (argmax of the raw logits, exactly, ties to the lowest id like ``torch.argmax``).
With top-k = 0 and top-p = 1 this is ``mxq.model.generate.sample_next`` in distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0            # 0: no top-k

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def filtered(self) -> bool:
        """Whether the distribution is truncated (needs the sorted vocabulary)."""
        return self.top_p < 1.0 or self.top_k > 0


def sample(logits: Tensor, temperature: Tensor | float = 1.0, top_p: Tensor | float = 1.0,
           top_k: Tensor | int = 0, filtered: bool | None = None,
           generator: torch.Generator | None = None) -> Tensor:
    """logits [B, V] -> token ids [B] (int64). Parameters may be Python numbers or device tensors of shape [1];
    ``filtered`` (default: derived from Python parameters, True for tensors) enables the top-k/top-p path."""
    if filtered is None:
        filtered = not (isinstance(top_p, (int, float)) and top_p >= 1.0 and isinstance(top_k, int) and top_k <= 0)
    x = logits.float()
    b, v = x.shape
    if isinstance(temperature, Tensor):
        temp = temperature.float()
        greedy = temp <= 0                                                  # [1] on the device
        x = x / torch.where(greedy, torch.ones_like(temp), temp)
    else:
        if temperature <= 0:
            return logits.argmax(dim=-1)
        greedy = None
        x = x / float(temperature)
    u = torch.rand(b, v, device=x.device, generator=generator)
    noise = -torch.log(-torch.log(u))                                       # Gumbel(0, 1); u = 0 -> -inf
    if filtered:
        sx, si = torch.sort(x, dim=-1, descending=True)                     # [B, V]
        p = torch.softmax(sx, dim=-1)
        rank = torch.arange(v, device=x.device)
        k = top_k if isinstance(top_k, Tensor) else torch.tensor(int(top_k), device=x.device)
        keep = (k <= 0) | (rank < k)                                        # top-k (0: all)
        pk = p * keep
        cum = pk.cumsum(-1)
        # top-p of the renormalised top-k; top_p >= 1 keeps everything (the fp32 cumsum saturates near 1, so
        # the comparison alone would drop tail tokens)
        keep = keep & (((cum - pk) < top_p * cum[:, -1:]) | (top_p >= 1))
        score = torch.where(keep, sx + noise, float("-inf"))
        nxt = si.gather(-1, score.argmax(-1, keepdim=True)).squeeze(-1)
    else:
        nxt = (x + noise).argmax(-1)
    if greedy is not None:
        nxt = torch.where(greedy, logits.argmax(dim=-1), nxt)
    return nxt


class DeviceSampler:
    """Sampling parameters in device tensors, so that a captured graph reads whatever ``set`` wrote last."""

    def __init__(self, device: torch.device | str, filtered: bool):
        self.filtered = filtered
        self.temperature = torch.ones(1, device=device)
        self.top_p = torch.ones(1, device=device)
        self.top_k = torch.zeros(1, dtype=torch.long, device=device)

    def set(self, params: SamplingParams) -> None:
        if params.filtered and not self.filtered:
            raise ValueError(f"{params} truncates the distribution: it needs a DeviceSampler(filtered=True)")
        self.temperature.fill_(params.temperature)          # device fills: no host sync
        self.top_p.fill_(params.top_p)
        self.top_k.fill_(params.top_k)

    def __call__(self, logits: Tensor) -> Tensor:
        return sample(logits, self.temperature, self.top_p, self.top_k, self.filtered)
