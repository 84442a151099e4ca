"""mxq.runtime: a fast GPU decode path (Triton kernels that read each format's packed bytes). See docs/runtime.md.

    from mxq.runtime import fast_generate
    out = fast_generate(model, input_ids, max_new_tokens=64)     # greedy; sets model.runtime_path
    out = fast_generate(model, input_ids, 64, do_sample=True, temperature=0.8, top_p=0.95)

Triton kernels read the experts' packed bytes directly, in every mxq format (MXFP4 and bf16 checkpoints;
nvfp4, nf4, nf4_dq, int4_*, fp8, fp8_block from a plan), mixed formats within a layer included; the decode
step runs without host synchronisation and is replayed from one CUDA graph.
"""
from __future__ import annotations

from ._common import HAVE_TRITON
from .sampling import SamplingParams, sample

RUNTIME_PATH = "mxq-triton-cudagraph"

if HAVE_TRITON:
    from .engine import DecodeState, Runtime, UnsupportedModel, decode_bytes_per_token, stacked_experts
else:  # CPU-only installs (CI): importable, and every entry point says why it cannot run
    class UnsupportedModel(ValueError):
        pass

    def _no_triton(*_a, **_k):
        raise UnsupportedModel("mxq.runtime needs triton (it ships with CUDA builds of torch)")

    Runtime = DecodeState = decode_bytes_per_token = stacked_experts = _no_triton


def enable(model, use_graph: bool | None = None) -> Runtime:
    """Attach (once) a ``Runtime`` to ``model`` and mark ``model.runtime_path = "mxq-triton-cudagraph"``."""
    rt = model.__dict__.get("_mxq_runtime")
    if rt is None or (use_graph is not None and rt.use_graph != use_graph):
        rt = Runtime(model, use_graph=use_graph)
        model.__dict__["_mxq_runtime"] = rt
    model.runtime_path = RUNTIME_PATH
    return rt


def disable(model) -> None:
    """Drop the runtime (its KV cache and graph) and the ``runtime_path`` mark."""
    model.__dict__.pop("_mxq_runtime", None)
    model.__dict__.pop("runtime_path", None)


def fast_generate(model, input_ids, max_new_tokens: int, attention_mask=None, eos_token_id=None,
                  prefill: str = "fast", timings: dict | None = None, do_sample: bool = False,
                  temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0):
    """Generation on the fast path: [B, T] -> [B, T + new] (rows without padding).

    Greedy, or with ``do_sample`` temperature / top-k / top-p sampling inside the captured graph
    (``mxq.runtime.sampling``; default CUDA generator, seed with ``torch.manual_seed``; temperature 0 = greedy).
    ``prefill="reference"`` runs the prompt through mxq's reference forward instead of the fast prefill.
    ``timings`` (a dict) receives prefill_ms, decode_ms and decode_steps (CUDA events).
    """
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("fast_generate does not support padded batches yet (attention_mask has zeros)")
    rt = enable(model)
    return rt.generate(input_ids, max_new_tokens, eos_token_id=eos_token_id, prefill=prefill, timings=timings,
                       do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k)


__all__ = ["fast_generate", "enable", "disable", "Runtime", "DecodeState", "UnsupportedModel", "RUNTIME_PATH",
           "decode_bytes_per_token", "stacked_experts", "HAVE_TRITON", "SamplingParams", "sample"]
