"""``RouterObserver``: accumulates every per-(layer, expert) router statistic during calibration.

It implements the ``MoEObserver`` protocol of docs/architecture.md. Why it looks the way it does:
* Vectorised, and without a host sync: counts, gate mass, co-selection and per-domain splits are one
  ``index_add_`` each on flattened (expert, domain) keys; nothing calls ``.item()``/``.tolist()`` or
  boolean-indexes, so the GPU is never stalled by the observer.
* Accumulators are float64 on the model's device: fp32 sums over millions of tokens lose the small terms.
* Per-domain: every token carries its sequence's domain index, and every accumulator has a domain axis;
  whole-set statistics are sums (or maxima) over that axis, so the split costs no second pass.
* Padding (``valid`` False) is masked with ``torch.where``, never multiplied, so a non-finite value on a
  padding position cannot leak into a sum or a maximum.
Layouts are [L, E, D, ...] so that the slice one ``on_expert`` call touches is contiguous.
"""
from __future__ import annotations

import torch
from torch import Tensor


class RouterObserver:
    def __init__(self, num_layers: int, num_experts: int, top_k: int, hidden: int, num_domains: int = 1,
                 device: torch.device | str = "cpu"):
        L, E, D, H = num_layers, num_experts, num_domains, hidden
        self.shape = (L, E, D, H)
        self.top_k = top_k
        self.device = torch.device(device)
        f64 = {"dtype": torch.float64, "device": self.device}
        self.tokens = torch.zeros(L, D, **f64)                   # valid tokens seen by each layer
        self.freq = torch.zeros(L, E, D, **f64)                  # tokens whose top-k contains e
        self.gate_mass = torch.zeros(L, E, D, **f64)             # sum of g_e(x)
        self.reap_sum = torch.zeros(L, E, D, **f64)              # sum of g_e(x) * ||f_e(x)||_2
        self.ean = torch.zeros(L, E, D, **f64)                   # sum of ||f_e(x)||_2
        self.prob_sum = torch.zeros(L, E, D, **f64)              # sum of the full softmax over E
        self.topk_entropy_sum = torch.zeros(L, D, **f64)         # sum of entropies of the top-k weights
        self.coselect = torch.zeros(L, E, E, D, **f64)           # tokens whose top-k holds both a and b
        # Maxima of fp32 values are exact in fp32; 4 bytes per channel keeps [L, E, D, H] small.
        self.max_act_channel = torch.zeros(L, E, D, H, dtype=torch.float32, device=self.device)
        self._tok_dom: Tensor | None = None                      # [N] domain index of every token
        self._valid: dict[int, Tensor] = {}                      # layer -> [N] bool
        self._batch_domains: list[int] = [0]                     # distinct domains of the current batch
        self._maybe_pad = True

    def begin_batch(self, domain_idx: Tensor, seq_len: int, attention_mask: Tensor | None = None) -> None:
        """Domain index [B] of each sequence of the next forward pass (tokens are B*T row-major).

        Pass them on the host: the distinct domains of the batch and whether it has padding are read
        here, before the forward pass, so the per-expert hot path needs neither a scatter nor a sync.
        """
        self._tok_dom = domain_idx.to(self.device, torch.long).repeat_interleave(seq_len)   # [N]
        self._batch_domains = sorted({int(d) for d in domain_idx.tolist()})
        self._maybe_pad = attention_mask is None or not bool(attention_mask.bool().all())
        self._valid.clear()

    def _domains(self, n: int) -> Tensor:
        if self._tok_dom is None or self._tok_dom.numel() != n:
            if self.shape[2] != 1:
                raise RuntimeError("RouterObserver.begin_batch(domain_idx, seq_len) must precede each forward "
                                   "pass when statistics are split by domain")
            return torch.zeros(n, dtype=torch.long, device=self.device)
        return self._tok_dom

    def on_route(self, layer: int, logits: Tensor, topk_idx: Tensor, topk_w: Tensor, valid: Tensor) -> None:
        """logits [N, E] fp32, topk_idx [N, k], topk_w [N, k], valid [N] bool."""
        _, E, D, _ = self.shape
        n, k = topk_idx.shape
        valid = valid.to(self.device)
        self._valid[layer] = valid
        dom = self._domains(n)                                                       # [N]
        vd = valid.to(torch.float64)                                                 # [N]
        self.tokens[layer].index_add_(0, dom, vd)
        key = topk_idx * D + dom[:, None]                                            # [N, k] -> (e, d)
        self.freq[layer].view(-1).index_add_(0, key.flatten(), vd.repeat_interleave(k))
        w = torch.where(valid[:, None], topk_w.to(torch.float64), 0.0)               # [N, k]
        self.gate_mass[layer].view(-1).index_add_(0, key.flatten(), w.flatten())
        pairs = (topk_idx[:, :, None] * E + topk_idx[:, None, :]) * D + dom[:, None, None]   # [N, k, k]
        self.coselect[layer].view(-1).index_add_(0, pairs.flatten(), vd.repeat_interleave(k * k))
        p = torch.softmax(logits.float(), dim=-1).to(torch.float64)                  # [N, E]
        p = torch.where(valid[:, None], p, 0.0)
        self.prob_sum[layer].index_add_(1, dom, p.t())
        tw = topk_w.to(torch.float64)
        h = torch.where(valid, -torch.xlogy(tw, tw).sum(dim=-1), 0.0)               # [N]
        self.topk_entropy_sum[layer].index_add_(0, dom, h)

    def on_expert(self, layer: int, expert: int, token_idx: Tensor, gate_w: Tensor, out: Tensor) -> None:
        """token_idx [n] into N, gate_w [n] = g_e(x), out [n, H] fp32 = f_e(x) before weighting."""
        v = self._valid[layer][token_idx]                                            # [n] bool
        d = self._domains(self._valid[layer].numel())[token_idx]                     # [n]
        norm = torch.linalg.vector_norm(out, dim=-1, dtype=torch.float64)            # [n]
        norm = torch.where(v, norm, 0.0)
        self.ean[layer, expert].index_add_(0, d, norm)
        self.reap_sum[layer, expert].index_add_(0, d, norm * gate_w.to(torch.float64))
        a = out.abs().float()                                                        # [n, H]
        if self._maybe_pad:
            a = torch.where(v[:, None], a, 0.0)
        mac = self.max_act_channel[layer, expert]                                    # [D, H]
        if len(self._batch_domains) == 1:
            d0 = self._batch_domains[0]
            torch.maximum(mac[d0], a.amax(dim=0), out=mac[d0])
        else:  # a few domains per batch at most: one masked reduction each, no atomics
            for d0 in self._batch_domains:
                torch.maximum(mac[d0], torch.where((d == d0)[:, None], a, 0.0).amax(dim=0), out=mac[d0])
