"""mxq.runtime: a fast GPU decode path (Triton kernels that read each format's packed bytes). See docs/runtime.md.

    from mxq.runtime import fast_generate
    out = fast_generate(model, input_ids, max_new_tokens=64)     # greedy; sets model.runtime_path
    out = fast_generate(model, padded_ids, 64, attention_mask=mask, eos_token_id=eos)   # left-padded batch
    out = fast_generate(model, input_ids, 64, do_sample=True, temperature=0.8, top_p=0.95)

Triton kernels read the experts' packed bytes directly, in every mxq format (MXFP4 and bf16 checkpoints;
nvfp4, nf4, nf4_dq, int4_*, fp8, fp8_block from a plan), mixed formats within a layer included; the decode
step runs without host synchronisation and is replayed from one CUDA graph per batch bucket; batches of
left-padded prompts up to 256 rows and more, the MoE as grouped GEMMs once a batch routes several tokens to an
expert.
"""
from __future__ import annotations

from ._common import HAVE_TRITON
from .sampling import SamplingParams, sample

RUNTIME_PATH = "mxq-triton-cudagraph"

if HAVE_TRITON:
    from .engine import (
        DecodeState,
        Runtime,
        UnsupportedModel,
        batch_bucket,
        decode_bytes_per_step,
        decode_bytes_per_token,
        left_padding,
        stacked_experts,
    )
else:  # CPU-only installs (CI): importable, and every entry point says why it cannot run
    class UnsupportedModel(ValueError):
        pass

    def _no_triton(*_a, **_k):
        raise UnsupportedModel("mxq.runtime needs triton (it ships with CUDA builds of torch)")

    Runtime = DecodeState = decode_bytes_per_token = decode_bytes_per_step = stacked_experts = _no_triton
    batch_bucket = left_padding = _no_triton


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
    """Generation on the fast path: [B, T] -> [B, T + new], as transformers' ``generate``.

    ``attention_mask`` [B, T] (1 = token, 0 = pad): prompts of different lengths, left-padded; each row gets
    RoPE positions from its first token and attends to none of its pads (sliding-window layers included).
    Greedy, or with ``do_sample`` temperature / top-k / top-p sampling inside the captured graph
    (``mxq.runtime.sampling``; default CUDA generator, seed with ``torch.manual_seed``; temperature 0 = greedy).
    ``eos_token_id`` (int or list): each row stops at its first EOS (then eos[0]); decoding ends when all rows
    have. ``prefill="reference"`` runs the prompt through mxq's reference forward instead of the fast prefill.
    ``timings`` (a dict) receives prefill_ms, decode_ms, decode_steps, ttft_rows_ms (CUDA events) and the
    batch bucket whose captured graph ran.
    """
    rt = enable(model)
    return rt.generate(input_ids, max_new_tokens, eos_token_id=eos_token_id, prefill=prefill, timings=timings,
                       do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                       attention_mask=attention_mask)


__all__ = ["HAVE_TRITON", "RUNTIME_PATH", "DecodeState", "Runtime", "SamplingParams", "UnsupportedModel",
           "batch_bucket", "decode_bytes_per_step", "decode_bytes_per_token", "disable", "enable", "fast_generate",
           "left_padding", "sample", "stacked_experts"]
