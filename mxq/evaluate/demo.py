"""Small real run folders for tests, the benchmark and the notebook: a synthetic tiny checkpoint, a
"compressed" variant of it, and ``evaluate`` + ``write_run_outputs`` on each.

Why here and not in tests/: the notebook test, the ablation tests and ``bench/eval_quick.py`` all need the
same folders, and they must come from the real ``evaluate`` (no hand-written metrics.json), so that
reports are always exercised on what a run really writes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Small enough for CPU tests (seconds), still every kind of number.
TEST_EVAL: dict[str, Any] = {
    "name": "test", "progress": False, "threads": 1,
    "memory": {"context": 8, "new_tokens": 2},
    "speed": {"contexts": [8], "new_tokens": 3, "repeats": 2, "warmup": 1},
    "perplexity": {"domains": ["austen", "shakespeare"], "max_tokens": 64, "max_length": 32, "stride": 16,
                   "batch_size": 4},
    "kl": {"enabled": True},
    "lm_eval": {"enabled": True, "tasks": ["tiny_cloze_austen"], "limit": 2, "batch_size": 4},
    "report": {"plots": True, "print_summary": False},
}


def tiny_checkpoint(out: str | Path, layers: int = 2, seed: int = 0, experts: str = "mxfp4") -> Path:
    """A synthetic checkpoint of the tiny preset (exact gpt-oss layout) with ``layers`` layers."""
    from ..synth import synth

    out = Path(out)
    if (out / "config.json").is_file():
        return out
    return synth(out, "tiny", experts, seed, "cpu", overrides={"num_hidden_layers": layers})


@torch.no_grad()
def requantize_with_noise_(model, noise: float = 0.25, fmt: str = "mxfp4", seed: int = 0) -> None:
    """Stand-in for a compression recipe: every expert dequantized, perturbed by Gaussian noise of
    ``noise`` x its RMS, and re-packed in ``fmt`` (mxq.formats), in place."""
    from ..formats import get_format

    f = get_format(fmt)
    g = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        ex = layer.mlp.experts
        for e in range(ex.num_experts):
            for kind in ex.KINDS:
                p = ex.packed(kind, e)
                w = get_format(p.format).dequantize(p, torch.float32)                    # [out, in]
                w = w + noise * w.pow(2).mean().sqrt() * torch.randn(w.shape, generator=g)
                ex.set_expert(kind, e, f.quantize(w.to(torch.bfloat16), axis=-1))


def make_run(ckpt: str | Path, run_dir: str | Path, recipe: str = "baseline", eval_cfg: dict | None = None,
             noise: float = 0.0, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Load ``ckpt``, optionally perturb its experts, evaluate against ``ckpt``, write the run outputs."""
    from .. import load_model, load_tokenizer
    from .pipeline import evaluate, write_run_outputs

    cfg = dict(eval_cfg or TEST_EVAL)
    if cache_dir is not None:
        cfg["cache_dir"] = str(cache_dir)
    model = load_model(ckpt, dtype=torch.float32)
    tok = load_tokenizer(ckpt)
    if noise:
        requantize_with_noise_(model, noise)
    metrics = evaluate(model, tok, cfg, run_dir, baseline_source=str(ckpt))
    c = model.config
    metrics["model"] = {"source": str(ckpt), "num_hidden_layers": c.num_hidden_layers,
                        "num_local_experts": c.num_local_experts, "dtype": "float32", "device": "cpu"}
    metrics["recipe"] = {"name": recipe, "noise": noise}
    metrics["plan"] = None
    return write_run_outputs(run_dir, metrics)


def fake_router_stats(run_dir: str | Path, layers: int, experts: int, seed: int = 0) -> Path:
    """router_stats.safetensors with a ``freq`` [L, E] tensor (rows sum to 1), for notebooks and tests
    when no statistics were collected."""
    from ..atomic import save_safetensors_atomic

    g = torch.Generator().manual_seed(seed)
    freq = torch.rand(layers, experts, generator=g) ** 3
    freq = freq / freq.sum(dim=1, keepdim=True)
    path = Path(run_dir) / "router_stats.safetensors"
    save_safetensors_atomic(path, {"freq": freq.contiguous()})
    return path
