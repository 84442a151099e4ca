"""Perplexity on held-out text with a sliding window (the stride is part of the result; always reported).

Window rule (HF's "Perplexity of fixed-length models" scheme, without its one-token loss per window):
windows hold at most ``max_length`` tokens; the first starts at token 0 and scores tokens 1 .. end-1;
every later window starts c = max(max_length - stride, 1) tokens before the first token not yet scored
and scores the rest of the window, so every token after the first is predicted exactly once and, after
the first window, with c tokens of context. ``stride == max_length`` gives disjoint windows overlapping
by the one token needed as context (lm-eval's rolling windows); a smaller stride costs about
max_length/stride times more compute and gives lower, more representative perplexity. Token 0 is scored
only when a ``prefix`` token (lm-eval's BOS/EOS convention) is prepended. Perplexity is token-weighted:
exp(sum NLL / tokens).

The held-out text is scored as raw token ids, no BOS and no harmony wrapper, as lm-eval's HF backend feeds
gpt-oss (its tokenizer adds no special tokens); such scores compare checkpoints with each other, not with
the model card.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Window:
    begin: int        # first input position
    end: int          # one past the last input position
    first: int        # first scored target position (targets are first .. end-1)


def sliding_windows(n: int, max_length: int, stride: int) -> list[Window]:
    """Windows over ``n`` tokens; targets of all windows are exactly positions 1 .. n-1, each once."""
    if not 1 <= stride <= max_length:
        raise ValueError(f"need 1 <= stride ({stride}) <= max_length ({max_length})")
    if max_length < 2:
        raise ValueError("max_length must be at least 2 (one context token and one target)")
    out: list[Window] = []
    ctx = max(max_length - stride, 1)
    scored_to = 1
    while scored_to < n:
        begin = 0 if not out else scored_to - ctx
        end = min(begin + max_length, n)
        out.append(Window(begin, end, scored_to))
        scored_to = end
    return out


Item = tuple[Tensor, Window]      # (token ids of a whole sequence [n], one window over it)


@torch.no_grad()
def window_logprobs(model, items: list[Item], batch_size: int, pad_id: int = 0, progress: bool = False,
                    desc: str = "") -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield per batch of windows (log-probs [m, V] fp32, targets [m], item index [m]) of scored positions.

    Windows of any sequences share a batch (one forward for many short windows: the reference path pays
    a fixed cost per expert per forward); they are right-padded to the longest with ``attention_mask``,
    which never changes the logits of real positions (causal attention, per-token MoE).
    """
    dev = model.device
    for i in tqdm(range(0, len(items), batch_size), desc=desc, disable=not progress, leave=False):
        batch = items[i:i + batch_size]
        width = max(w.end - w.begin for _, w in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)                  # [b, W]
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for r, (toks, w) in enumerate(batch):
            ids[r, :w.end - w.begin] = toks[w.begin:w.end]
            mask[r, :w.end - w.begin] = 1
        logits = model(ids.to(dev), attention_mask=mask.to(dev)).logits                  # [b, W, V]
        rows, tgts, owner = [], [], []
        for r, (toks, w) in enumerate(batch):
            rows.append(logits[r, w.first - 1 - w.begin:w.end - 1 - w.begin])            # predicting first..end-1
            tgts.append(toks[w.first:w.end])
            owner.append(torch.full((w.end - w.first,), i + r, dtype=torch.long))
        lp = torch.log_softmax(torch.cat(rows).float(), dim=-1)                          # [m, V]
        yield lp, torch.cat(tgts).to(dev), torch.cat(owner)


def target_logprobs(model, tokens: Tensor, max_length: int, stride: int, batch_size: int = 8,
                    prefix: int | None = None, pad_id: int = 0) -> Tensor:
    """Log-prob of every scored token of ``tokens`` [n] (n-1 values, or n with a ``prefix`` token)."""
    if prefix is not None:
        tokens = torch.cat([torch.tensor([prefix], dtype=torch.long), tokens.cpu()])
    items = [(tokens, w) for w in sliding_windows(len(tokens), max_length, stride)]
    out = [lp.gather(-1, t[:, None]).squeeze(-1) for lp, t, _ in window_logprobs(model, items, batch_size, pad_id)]
    return torch.cat(out).cpu() if out else torch.zeros(0)


def heldout_tokens(tokenizer, domain: str, max_tokens: int | None) -> Tensor:
    """The first ``max_tokens`` token ids of a domain's held-out split (no special tokens added)."""
    from ..data.corpus import load_text

    text = load_text(domain, "heldout")
    ids = None
    if max_tokens:   # tokenizing the whole split when only a prefix is needed wastes seconds on big splits
        cut = text[: int(max_tokens) * 16]
        ids = tokenizer(cut, add_special_tokens=False).input_ids
        ids = ids[:max_tokens] if len(ids) > max_tokens or len(cut) == len(text) else None
    if ids is None:
        ids = tokenizer(text, add_special_tokens=False).input_ids[:max_tokens or None]
    return torch.tensor(ids, dtype=torch.long)


def perplexity(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count) if count else math.nan
