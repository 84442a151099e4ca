"""Memory: exact weight bytes by component, bits per expert weight, and measured peak memory.

Why exact bytes and a measured peak both: the byte count is what a recipe changes and is reproducible to
the byte; the measured peak (weights + KV cache + activations + allocator slack) is what a deployment has
to provision. The peak is taken with the KV cache still alive after prefill + decode, as in the
deployment study of Yadav & Patel ("GPT-OSS-20B: A Comprehensive Deployment-Centric Analysis",
arXiv 2508.16700), not after the cache was freed.
"""
from __future__ import annotations

import re
import resource
from collections import defaultdict
from typing import Any

import torch

from .metrics import iter_experts, param_counts, sync

# Ordered (regex on the parameter/buffer name, component): the first match wins.
COMPONENTS: tuple[tuple[str, str], ...] = (
    (r"^embed_tokens\.", "embeddings"),
    (r"^lm_head\.", "lm_head"),
    (r"\.self_attn\.", "attention"),
    (r"(^|\.)(norm|input_layernorm|post_attention_layernorm)\.weight$", "norms"),
    (r"\.mlp\.router\.", "router"),
    (r"\.mlp\.experts\.(gate_up|down)_bias$", "expert_biases"),
    (r"\.mlp\.experts\.", "experts"),         # packed buffers: counted per expert below
    (r"^rope\.", None),                       # derived (inv_freq), not a weight
)


def _component(name: str) -> str | None:
    for pat, comp in COMPONENTS:
        if re.search(pat, name):
            return comp
    return "other"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def weight_bytes(model) -> dict[str, Any]:
    """Exact bytes of every weight as the model holds them, by component and by expert format.

    Experts are counted through ``experts.packed(kind, e).nbytes`` for each present expert, so a mixed
    plan is split by format. ``experts_held_bytes`` counts the expert buffers actually allocated
    (deduplicated by storage); it exceeds the per-expert sum when a stacked tensor is still referenced
    after some experts were re-packed, which is memory a runtime would waste.
    """
    comp: dict[str, int] = defaultdict(int)
    dense_numel = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        c = _component(name)
        if c is None or c == "experts":
            continue
        comp[c] += _nbytes(t)
        dense_numel += t.numel()
    by_fmt: dict[str, dict[str, float]] = {}
    for li, e, _ in iter_experts(model):
        ex = model.layers[li].mlp.experts
        if not hasattr(ex, "packed"):
            continue
        try:
            ps = [ex.packed(kind, e) for kind in ex.KINDS]
        except RuntimeError:
            continue                           # pruned slot
        f = by_fmt.setdefault(ps[0].format, {"experts": 0, "bytes": 0, "weights": 0})
        f["experts"] += 1
        for p in ps:
            f["bytes"] += p.nbytes
            f["weights"] += p.shape[0] * p.shape[1]
    for name, t in model.named_parameters():   # dense (trainable) experts
        if _component(name) == "experts":
            fmt = "dense-" + str(t.dtype).removeprefix("torch.")
            f = by_fmt.setdefault(fmt, {"experts": 0, "bytes": 0, "weights": 0})
            f["bytes"] += _nbytes(t)
            f["weights"] += t.numel()
            f["experts"] += t.shape[0] if name.endswith("gate_up_weight") else 0
    for f in by_fmt.values():
        f["bits_per_weight"] = 8.0 * f["bytes"] / max(f["weights"], 1)
    comp["experts"] = sum(int(f["bytes"]) for f in by_fmt.values())
    held, seen = 0, set()
    for name, t in model.named_buffers():
        if _component(name) == "experts" and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            held += t.untyped_storage().nbytes()
    expert_weights = sum(int(f["weights"]) for f in by_fmt.values())
    counts = param_counts(model)
    return {
        "weight_bytes": int(sum(comp.values())),
        # the same model with every non-expert tensor at 2 bytes: the published checkpoint convention
        "weight_bytes_bf16_dense": int(comp["experts"] + 2 * dense_numel),
        "by_component": {k: int(v) for k, v in sorted(comp.items())},
        "experts_by_format": {k: {kk: (int(vv) if kk != "bits_per_weight" else round(vv, 4)) for kk, vv in v.items()}
                              for k, v in sorted(by_fmt.items())},
        "experts_held_bytes": int(held) if held else int(comp["experts"]),
        "bits_per_expert_weight": round(8.0 * comp["experts"] / max(expert_weights, 1), 4),
        "params": counts,
    }


@torch.no_grad()
def measure_peak(model, context: int, new_tokens: int, batch: int = 1, seed: int = 0) -> dict[str, Any]:
    """Peak memory of prefill(``context``) + greedy decode(``new_tokens``), read with the KV cache alive.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only, not the
    allocator's reserve, which is reported beside it). CPU: the process RSS (psutil) at that point, and
    the process-lifetime peak RSS (``ru_maxrss``), which includes everything the process ever held.
    """
    dev = model.device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=g).to(dev)   # [B, T]
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    cache = model.new_cache(batch, context + new_tokens)
    out = model(ids, cache=cache)
    step = torch.ones(batch, 1, dtype=torch.long, device=dev)
    for _ in range(new_tokens):
        nxt = out.logits[:, -1].argmax(-1)                                                    # [B]
        out = model(nxt[:, None], attention_mask=step, cache=cache)
    sync(dev)
    res: dict[str, Any] = {"context": context, "new_tokens": new_tokens, "batch": batch,
                           "kv_cache_bytes": int(cache.nbytes)}
    if dev.type == "cuda":
        res["device"] = "cuda"
        res["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(dev))
        res["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(dev))
        res["allocated_bytes_with_cache"] = int(torch.cuda.memory_allocated(dev))
    else:
        import psutil

        res["device"] = "cpu"
        res["host_rss_bytes_with_cache"] = int(psutil.Process().memory_info().rss)
        # ru_maxrss lags the live RSS by a page-table update; the peak is at least what is resident now
        res["host_peak_rss_bytes_process"] = max(int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
                                                 res["host_rss_bytes_with_cache"])
    del cache, out
    return res


def memory_report(model, cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``memory`` section of metrics.json: exact bytes, plus the measured peak when enabled."""
    rep = weight_bytes(model)
    if cfg.get("measure_peak", True):
        rep["peak"] = measure_peak(model, int(cfg.get("context", 128)), int(cfg.get("new_tokens", 16)),
                                   int(cfg.get("batch", 1)), int(cfg.get("seed", 0)))
    return rep
