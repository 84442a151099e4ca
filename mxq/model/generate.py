"""Token generation with the KV cache (prefill once, then one token per step)."""
from __future__ import annotations

import torch
from torch import Tensor


def sample_next(logits: Tensor, do_sample: bool, temperature: float, top_p: float,
                generator: torch.Generator | None) -> Tensor:
    """logits [B, V] -> next ids [B]; greedy, or temperature + nucleus (top-p) sampling."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / max(temperature, 1e-6), dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p                    # always keeps the top token
        sp = sp * keep
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(model, input_ids: Tensor, max_new_tokens: int, attention_mask: Tensor | None, do_sample: bool,
             temperature: float, top_p: float, eos_token_id, generator) -> Tensor:
    b, t = input_ids.shape
    cache = model.new_cache(b, t + max_new_tokens)
    out = model(input_ids, attention_mask=attention_mask, cache=cache, logits="last")     # [B, 1, V]
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []),
                       device=input_ids.device, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    seqs = [input_ids]
    step_mask = torch.ones(b, 1, dtype=torch.long, device=input_ids.device)
    for _ in range(max_new_tokens):
        nxt = sample_next(out.logits[:, -1], do_sample, temperature, top_p, generator)
        if eos.numel():
            nxt = torch.where(done, eos[0], nxt)
            done |= torch.isin(nxt, eos)
        seqs.append(nxt[:, None])
        if bool(done.all()):
            break
        out = model(nxt[:, None], attention_mask=step_mask, cache=cache)
    return torch.cat(seqs, dim=1)
