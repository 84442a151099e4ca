"""Shared facts and helpers of the evaluation: the metrics.json schema, CSV flattening, what precision and
code path actually ran, and parameter counts of the model as it is (pruned experts included).

Why the precision block exists: transformers silently dequantizes MXFP4 to bf16 when its kernels are
missing (transformers ``quantizers/quantizer_mxfp4.py``, ``validate_environment``), so users cannot tell what
they measured. Every mxq report therefore states
the expert formats that are held, the compute dtype and the code path (``model.runtime_path``).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace
from typing import Any, Iterator

import torch

SCHEMA_VERSION = 1
DEFAULT_PATH = "mxq-torch-reference"
# Top-level keys of metrics.json and the keys each section must carry.
REQUIRED: dict[str, tuple[str, ...]] = {
    "model": (), "recipe": (), "plan": (), "env": (),
    "memory": ("weight_bytes",),
    "speed": ("decode_tokens_per_s",),
    "accuracy": ("perplexity", "kl_vs_baseline"),
}
LOGLIKELIHOOD_NOTE = (
    "Log-likelihood scores (perplexity, KL, cloze/next-sentence accuracy) compare compressed variants of "
    "one model with each other; they are not comparable with the model card, whose numbers come from "
    "generation in the harmony chat format with reasoning (gpt-oss model card, arXiv 2508.10925; harmony: "
    "https://github.com/openai/harmony)."
)


def missing_keys(metrics: dict[str, Any]) -> list[str]:
    """Required keys absent from ``metrics`` (dotted paths); empty when the schema is satisfied."""
    out = []
    for top, subs in REQUIRED.items():
        if top not in metrics:
            out.append(top)
            continue
        sec = metrics[top]
        for s in subs:
            if not isinstance(sec, dict) or s not in sec:
                out.append(f"{top}.{s}")
    return out


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> one flat ``{"a.b.c": scalar}`` row (lists become JSON strings) for metrics.csv."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, (list, tuple)):
        out[prefix[:-1]] = json.dumps(d, default=str)
    else:
        out[prefix[:-1]] = d
    return out


def get_path(d: dict[str, Any], path: str, default: Any = None) -> Any:
    """``get_path(m, "accuracy.perplexity.mean")``: a nested value or ``default``."""
    cur: Any = d
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def quantile(values: torch.Tensor, q: float) -> float:
    """The q-quantile (linear interpolation) of a 1-D tensor, exact for any size (no torch 16M limit)."""
    v = values.detach().double().flatten().sort().values
    if v.numel() == 0:
        return math.nan
    pos = q * (v.numel() - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


def sync(device: torch.device) -> None:
    """Wait for queued device work so wall-clock timings measure it (CUDA is asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- experts
def iter_experts(model) -> Iterator[tuple[int, int, Any]]:
    """``(layer, expert, Packed or None)`` for every expert slot; None marks a pruned or dense expert."""
    for li, layer in enumerate(model.layers):
        ex = layer.mlp.experts
        for e in range(ex.num_experts):
            packed = None
            if hasattr(ex, "packed"):
                try:
                    packed = ex.packed("gate_up", e)
                except RuntimeError:   # an expert slot without weights (pruned in place)
                    packed = None
            yield li, e, packed


def experts_per_layer(model) -> list[int]:
    """Experts that hold weights, per layer (pruned slots excluded)."""
    counts = [0] * len(model.layers)
    for li, _, p in iter_experts(model):
        counts[li] += p is not None or not hasattr(model.layers[li].mlp.experts, "packed")
    return counts


def precision(model) -> dict[str, Any]:
    """What actually runs: expert formats held (count of (layer, expert) pairs), dtypes, code path."""
    formats: Counter[str] = Counter()
    for li, e, p in iter_experts(model):
        if p is not None:
            formats[p.format] += 1
        elif not hasattr(model.layers[li].mlp.experts, "packed"):
            formats["dense-" + str(model.dtype).removeprefix("torch.")] += 1
    attn = model.layers[0].self_attn.q_proj.weight.dtype
    return {
        "expert_formats": dict(sorted(formats.items())),
        "compute_dtype": str(model.dtype).removeprefix("torch."),
        "attention_dtype": str(attn).removeprefix("torch."),
        "path": getattr(model, "runtime_path", DEFAULT_PATH),
        "device": str(model.device),
    }


def param_counts(model) -> dict[str, int]:
    """Total / active parameters of the model as it is (``GptOssConfig.param_counts`` formula,
    per-layer expert count).

    ``GptOssConfig.param_counts`` assumes every layer keeps all E experts; after pruning each layer l has
    E_l experts, so the per-layer count is re-derived from the config with E_l experts.
    """
    cfg = model.config
    v, h, n_layers = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers
    k = cfg.num_experts_per_tok
    per_e = experts_per_layer(model)
    total = 2 * v * h + h
    active = v * h + h
    cache: dict[int, tuple[int, int]] = {}
    for e_l in per_e:
        if e_l < k:
            raise ValueError(f"a layer keeps {e_l} experts, fewer than top-k = {k}: the model cannot route")
        if e_l not in cache:
            c = replace(cfg, num_local_experts=e_l, layer_types=list(cfg.layer_types)).param_counts()
            cache[e_l] = ((c["total"] - 2 * v * h - h) // n_layers,
                          (c["active_excl_embedding"] - v * h - h) // n_layers)
        total += cache[e_l][0]
        active += cache[e_l][1]
    return {"total": total, "active_excl_embedding": active, "active_incl_embedding": active + v * h,
            "experts": sum(per_e), "expert_weights": sum(per_e) * 3 * cfg.intermediate_size * h}
