"""Token streams and batches for training the embedded model: equal domain mixing, contiguous chunks.

Each domain's text is tokenized once into one long stream. A training sequence is a contiguous window of
``seq_len + 1`` tokens at a uniformly random offset (inputs = window[:-1], targets = window[1:]); every
batch holds the same number of windows from each domain, so the smaller domains are not under-weighted.
Half the windows (by a fixed pattern) start with ``<|startoftext|>`` in place of their first token, so the
model has seen BOS at position 0 (lm-eval prepends it to the first perplexity window) and also plain text
at position 0 (lm-eval adds no BOS before a non-empty context).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from mxq.data.corpus import DOMAINS, load_text

BOS_ID = 1


@lru_cache(maxsize=16)
def tokenize(tokenizer, text: str) -> Tensor:
    """text -> LongTensor [n] of token ids (no special tokens added); cached, as runs share the corpus."""
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


@dataclass
class DomainStreams:
    """One token stream per domain (a ``split`` of the corpus), kept on ``device``."""
    streams: dict[str, Tensor]      # domain -> [n_d] long

    @classmethod
    def build(cls, tokenizer, split: str, domains: tuple[str, ...] = DOMAINS, max_chars: int | None = None,
              device: str | torch.device = "cpu") -> "DomainStreams":
        out = {}
        for d in domains:
            text = load_text(d, split)
            out[d] = tokenize(tokenizer, text if max_chars is None else text[:max_chars]).to(device)
        return cls(out)

    def num_tokens(self) -> dict[str, int]:
        return {d: int(s.numel()) for d, s in self.streams.items()}


class MixedBatches:
    """Random contiguous windows, ``batch_size / len(domains)`` per domain per batch (seeded)."""

    def __init__(self, data: DomainStreams, batch_size: int, seq_len: int, seed: int):
        n_dom = len(data.streams)
        if batch_size % n_dom:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the {n_dom} domains")
        for d, s in data.streams.items():
            if s.numel() <= seq_len + 1:
                raise ValueError(f"domain {d} has only {s.numel()} tokens, fewer than seq_len + 1")
        self.data, self.seq_len, self.per_domain = data, seq_len, batch_size // n_dom
        self.gen = torch.Generator().manual_seed(seed)
        self.bos = (torch.arange(batch_size) % 2 == 0)                      # [B] which rows start with BOS

    def next(self) -> tuple[Tensor, Tensor]:
        """-> (inputs [B, T], targets [B, T]) on the streams' device."""
        rows = []
        for s in self.data.streams.values():
            starts = torch.randint(0, s.numel() - self.seq_len - 1, (self.per_domain,), generator=self.gen)
            idx = starts[:, None] + torch.arange(self.seq_len + 1)                       # [b, T+1]
            rows.append(s[idx.to(s.device)])
        win = torch.cat(rows)                                                             # [B, T+1]
        win[self.bos.to(win.device), 0] = BOS_ID
        return win[:, :-1], win[:, 1:]


def eval_windows(data: DomainStreams, seq_len: int, per_domain: int) -> dict[str, Tensor]:
    """Fixed, evenly spaced, non-overlapping windows [per_domain, seq_len + 1] per domain (for eval loss)."""
    out = {}
    for d, s in data.streams.items():
        n = min(per_domain, s.numel() // (seq_len + 1))
        step = s.numel() // n
        starts = torch.arange(n) * step
        out[d] = s[(starts[:, None] + torch.arange(seq_len + 1)).to(s.device)]
    return out
