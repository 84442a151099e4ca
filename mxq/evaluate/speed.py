"""Speed: TTFT, prefill and decode throughput, p50/p95 end-to-end latency, energy, APE.

Protocol of Yadav & Patel, "GPT-OSS-20B: A Comprehensive Deployment-Centric Analysis" (arXiv 2508.16700):
* TTFT is the *true* time to first token: cache allocation + prefill of the whole prompt + choosing the
  first token, measured from the request until the first token id exists on the host side of a sync.
* Decode throughput covers the *full* decode: (g - 1) further tokens over the time after the first token
  (every one of the g tokens is generated; no early EOS stop, so all settings do the same work).
* End-to-end latency per request (TTFT + decode) is reported as p50 and p95 over the repeats.
* Energy per 1,000 generated tokens from the NVML total-energy counter read before and after the timed
  repeats (prefill energy included, i.e. energy per generated token end to end); "not available" off NVIDIA.
* APE (Active Parameter Efficiency): decode tokens/s per billion active parameters (model-card convention,
  embedding table excluded), so sparse and dense models or pruned variants compare per unit of compute.
Device work is synchronised around every timing; each setting is warmed up first; prompts are random
token ids from a fixed seed (the speed of this model does not depend on the token values, only on routing,
which random ids exercise broadly).

Code path (``speed.runtime``: auto | fast | reference): on CUDA, ``auto`` measures the fast runtime
(``mxq.runtime``: Triton kernels, decode replayed from a CUDA graph, greedy or sampling inside the graph);
the reference torch forward (``model(ids, cache=...)`` per token) is measured on the CPU, when asked for, or
when the runtime refuses the model (``UnsupportedModel``, e.g. several expert formats in a layer); the
reason is recorded (``fallback_reason``) beside ``code_path``. The fast path keeps its KV cache and graphs
per (batch, capacity) between requests (static buffers, allocated and captured during the warm-up), so its
TTFT is prefill + first token; the reference path allocates its cache inside every request.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from ..model.generate import sample_next
from .intervals import spread
from .metrics import DEFAULT_PATH, param_counts, precision, quantile, sync

NOT_AVAILABLE = "not available"
# Batch sizes of the throughput sweep (``speed.batch_sizes``) when the preset names none; it runs on the fast
# runtime only (a GPU), greedy, at ``speed.batch_context`` prompt tokens (default 1,024).
DEFAULT_BATCH_SIZES = (1, 4, 16, 64)
DEFAULT_BATCH_CONTEXT = 1024
FAST_PATH = "mxq-triton-cudagraph"           # mxq.runtime.RUNTIME_PATH (not imported: triton is optional)
RUNTIMES = ("auto", "fast", "reference")


class EnergyMeter:
    """NVML total energy counter (millijoules since driver load) of the GPU the model runs on."""

    def __init__(self, device: torch.device):
        self.handle = None
        self.reason = "not an NVIDIA GPU"
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            idx = device.index if device.index is not None else torch.cuda.current_device()
            props = torch.cuda.get_device_properties(idx)
            try:   # CUDA_VISIBLE_DEVICES renumbers GPUs for CUDA but not for NVML: match by PCI address
                pci = (f"{getattr(props, 'pci_domain_id', 0):08x}:{props.pci_bus_id:02x}:"
                       f"{getattr(props, 'pci_device_id', 0):02x}.0")
                self.handle = pynvml.nvmlDeviceGetHandleByPciBusId(pci)
            except Exception:  # noqa: BLE001 - older torch without PCI fields, or a format NVML rejects
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(idx)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self._nvml = pynvml
        except Exception as e:  # noqa: BLE001 - any NVML failure means "no energy figure", never a crash
            self.handle, self.reason = None, f"NVML energy counter unavailable: {type(e).__name__}: {e}"

    def read_j(self) -> float | None:
        if self.handle is None:
            return None
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0


@torch.no_grad()
def timed_generate(model, ids: torch.Tensor, new_tokens: int, do_sample: bool, temperature: float,
                   top_p: float, gen: torch.Generator | None) -> tuple[float, float]:
    """One request: ids [B, T] -> (TTFT seconds, end-to-end seconds) for exactly ``new_tokens`` tokens."""
    dev = ids.device
    b, t = ids.shape
    sync(dev)
    t0 = time.perf_counter()
    cache = model.new_cache(b, t + new_tokens)
    out = model(ids, cache=cache, logits="last")                                            # [B, 1, V]
    nxt = sample_next(out.logits[:, -1], do_sample, temperature, top_p, gen)                # [B]
    sync(dev)
    t_first = time.perf_counter()
    step = torch.ones(b, 1, dtype=torch.long, device=dev)
    for _ in range(new_tokens - 1):
        out = model(nxt[:, None], attention_mask=step, cache=cache)
        nxt = sample_next(out.logits[:, -1], do_sample, temperature, top_p, gen)
    sync(dev)
    return t_first - t0, time.perf_counter() - t0


@torch.no_grad()
def timed_generate_fast(rt, ids: torch.Tensor, new_tokens: int, do_sample: bool, temperature: float,
                        top_p: float) -> tuple[float, float]:
    """One request on the fast runtime ``rt`` (``mxq.runtime.Runtime``): (TTFT s, end-to-end s), same protocol
    as ``timed_generate``: prefill + first token, host sync, g - 1 graph-replayed decode steps, host sync."""
    from ..runtime.sampling import SamplingParams

    dev = ids.device
    b, t = ids.shape
    params = SamplingParams(temperature, top_p) if do_sample else None
    sync(dev)
    t0 = time.perf_counter()
    st = rt.state_for(b, t + new_tokens)
    rt.use_sampling(st, params)
    logits = rt.prefill(st, ids)
    st.seq[:b, t] = rt.choose(st, logits).to(torch.int32)
    sync(dev)
    t_first = time.perf_counter()
    for _ in range(new_tokens - 1):
        rt.step(st)
    sync(dev)
    return t_first - t0, time.perf_counter() - t0


def reference_path(model) -> str:
    """The name of the path ``model(ids, cache=...)`` runs (an attached mxq runtime does not change forward())."""
    ref = getattr(model, "runtime_path", DEFAULT_PATH)
    return DEFAULT_PATH if ref == FAST_PATH else ref


def choose_runtime(model, want: str = "auto") -> tuple[Any, str, str | None]:
    """(fast runtime or None, code path, why the fast path is not used or None) for ``speed.runtime``."""
    if want not in RUNTIMES:
        raise ValueError(f"speed.runtime must be one of {RUNTIMES}, got {want!r}")
    ref = reference_path(model)
    if want == "reference":
        return None, ref, "speed.runtime=reference: the reference torch path was asked for"
    if want == "auto" and model.device.type != "cuda":
        return None, ref, f"model on {model.device.type}: the fast runtime (mxq.runtime) needs a CUDA GPU"
    from ..runtime import UnsupportedModel, enable

    try:
        rt = enable(model)
    except UnsupportedModel as e:
        return None, ref, f"UnsupportedModel: {e}"
    return rt, rt.path, None


def _setting(model, context: int, mode: str, cfg: dict[str, Any], meter: EnergyMeter, active_b: float,
             bar: tqdm, rt=None) -> dict[str, Any]:
    g, batch, reps = int(cfg["new_tokens"]), int(cfg.get("batch_size", 1)), int(cfg["repeats"])
    do_sample = mode == "sample"
    dev = model.device
    vocab = int(cfg.get("vocab_size") or model.config.vocab_size)
    prompt_gen = torch.Generator().manual_seed(int(cfg.get("seed", 0)) * 100_003 + context)
    sample_gen = torch.Generator(device=dev).manual_seed(int(cfg.get("seed", 0))) if do_sample else None
    temp, top_p = float(cfg.get("temperature", 1.0)), float(cfg.get("top_p", 1.0))

    def prompt() -> torch.Tensor:
        return torch.randint(0, vocab, (batch, context), generator=prompt_gen).to(dev)     # [B, T]

    def request(ids: torch.Tensor) -> tuple[float, float]:
        if rt is not None:
            return timed_generate_fast(rt, ids, g, do_sample, temp, top_p)
        return timed_generate(model, ids, g, do_sample, temp, top_p, sample_gen)

    # the fast path always gets an untimed request first: Triton compilation, autotuning and graph capture
    for _ in range(max(int(cfg.get("warmup", 1)), 1 if rt is not None else 0)):
        request(prompt())
    prompts = [prompt() for _ in range(reps)]
    e0 = meter.read_j()
    ttft, e2e = [], []
    for ids in prompts:
        a, b = request(ids)
        ttft.append(a)
        e2e.append(b)
        bar.update(1)
    e1 = meter.read_j()
    decode = [(g - 1) * batch / max(b - a, 1e-12) for a, b in zip(ttft, e2e)] if g > 1 else []
    row: dict[str, Any] = {
        "context": context, "mode": mode, "batch": batch, "new_tokens": g, "repeats": reps,
        "ttft_s": statistics.median(ttft),
        "prefill_tokens_per_s": context * batch / statistics.median(ttft),
        "decode_tokens_per_s": statistics.median(decode) if decode else None,
        "e2e_p50_s": quantile(torch.tensor(e2e), 0.50), "e2e_p95_s": quantile(torch.tensor(e2e), 0.95),
        "generated_tokens_per_s": g * batch / statistics.median(e2e),
    }
    row["ape_decode"] = row["decode_tokens_per_s"] / active_b if decode else None
    row["spread"] = {"ttft_s": spread(ttft), "decode_tokens_per_s": spread(decode), "e2e_s": spread(e2e)}
    if e0 is not None and e1 is not None:
        joules = e1 - e0
        tokens = reps * g * batch
        row["energy_j"] = joules
        row["energy_j_per_1k_tokens"] = 1000.0 * joules / tokens
        row["tokens_per_j"] = tokens / joules if joules > 0 else None
    else:
        row["energy_j_per_1k_tokens"] = NOT_AVAILABLE
        row["tokens_per_j"] = NOT_AVAILABLE
    return row


@torch.no_grad()
def batch_sweep(rt, model, cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Throughput against concurrency on the fast runtime ``rt``: for each B of ``speed.batch_sizes``, B
    random prompts of ``speed.batch_context`` tokens decoded together (``Runtime.generate``, greedy, g =
    ``speed.new_tokens``; one untimed request first: compilation, autotuning, the bucket's graph). Per B:
    decode tokens/s in total and per sequence, generated tokens/s end to end (prefill included), TTFT p50/p95
    over the rows (the end of each row's prefill chunk), peak allocated bytes. A B whose KV cache would not
    fit in free device memory is skipped with the reason (a 120b model leaves no room for B = 256)."""
    from ..runtime import batch_bucket

    sizes = cfg.get("batch_sizes", DEFAULT_BATCH_SIZES)
    if not sizes:
        return {}
    ctx = int(cfg.get("batch_context") or DEFAULT_BATCH_CONTEXT)
    g = max(int(cfg["new_tokens"]), 2)
    dev = model.device
    vocab = int(cfg.get("vocab_size") or model.config.vocab_size)
    gen = torch.Generator().manual_seed(int(cfg.get("seed", 0)) * 100_003 + ctx + 1)
    rows: dict[str, dict[str, Any]] = {}
    for b in (int(v) for v in sizes):
        need = rt.state_bytes(batch_bucket(b), -(-(ctx + g) // 256) * 256)
        rt._states.clear()
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(dev)[0]
        if need * 1.1 + (2 << 30) > free:
            rows[str(b)] = {"batch": b, "context": ctx, "skipped": f"KV cache {need / 1e9:.1f} GB + 2 GB of work "
                                                                  f"space > {free / 1e9:.1f} GB free"}
            continue
        ids = torch.randint(0, vocab, (b, ctx), generator=gen).to(dev)
        rt.generate(ids, 2)
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        tm: dict[str, Any] = {}
        rt.generate(ids, g, timings=tm)
        steps, dec_s = tm["decode_steps"], tm["decode_ms"] / 1e3
        ttft = torch.tensor(tm["ttft_rows_ms"]) / 1e3
        rows[str(b)] = {
            "batch": b, "context": ctx, "new_tokens": g, "bucket": tm["batch_bucket"],
            "decode_tokens_per_s": b * steps / dec_s, "per_sequence_tokens_per_s": steps / dec_s,
            "generated_tokens_per_s": b * g / ((tm["prefill_ms"] + tm["decode_ms"]) / 1e3),
            "ttft_p50_s": quantile(ttft, 0.50), "ttft_p95_s": quantile(ttft, 0.95),
            "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(dev)),
        }
    rt._states.clear()
    return rows


def speed_report(model, cfg: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """The ``speed`` section: one row per (mode, context) in ``by_setting``, headline figures on top; on the
    fast runtime also ``by_batch`` (``batch_sweep``: throughput at ``speed.batch_sizes``) and its best total
    decode tokens/s (``batch_decode_tokens_per_s_max``). Elsewhere ``by_batch`` is empty and the reason is
    in ``batch_sweep_skipped``.

    Headline = the greedy row at ``headline_context`` (default: the first context of the sweep).
    Code path: ``cfg["runtime"]`` (module docstring); a runtime attached here is detached afterwards.
    """
    model.eval()
    contexts = [int(c) for c in cfg["contexts"]]
    modes = list(cfg.get("modes", ["greedy"]))
    if any(m not in ("greedy", "sample") for m in modes):
        raise ValueError(f"speed.modes must be greedy and/or sample, got {modes}")
    want = str(cfg.get("runtime") or "auto")
    attached = "_mxq_runtime" in model.__dict__
    rt, code_path, reason = choose_runtime(model, want)
    meter = EnergyMeter(model.device)
    counts = param_counts(model)
    active_b = counts["active_excl_embedding"] / 1e9
    cuda = model.device.type == "cuda"
    if cuda:
        sync(model.device)
        torch.cuda.reset_peak_memory_stats(model.device)

    def sweep(runtime, path: str) -> dict[str, dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {}
        with tqdm(total=len(contexts) * len(modes) * int(cfg["repeats"]), desc=f"speed ({path})",
                  disable=not progress, leave=False) as bar:
            for mode in modes:
                for c in contexts:
                    rows[f"{mode}@{c}"] = _setting(model, c, mode, cfg, meter, active_b, bar, runtime)
        return rows

    def detach() -> None:                          # drop the runtime's KV cache, graphs and runtime_path mark
        if not attached:
            from ..runtime import disable

            disable(model)
            if cuda:
                torch.cuda.empty_cache()

    try:
        try:
            rows = sweep(rt, code_path)
        except Exception as e:  # noqa: BLE001 - auto: a failing fast runtime must not cost the other numbers
            if rt is None or want != "auto":
                raise
            rt = None
            detach()
            code_path = reference_path(model)
            reason = f"the fast runtime failed, the reference path was measured instead: {type(e).__name__}: {e}"
            reason = reason[:500]
            rows = sweep(None, code_path)
        peak = int(torch.cuda.max_memory_allocated(model.device)) if cuda else None
        by_batch: dict[str, dict[str, Any]] = {}
        batch_skip = None
        if rt is None:
            batch_skip = "the batch sweep runs on the fast runtime only (a CUDA GPU): " + (reason or code_path)
        elif cfg.get("batch_sizes", DEFAULT_BATCH_SIZES):
            by_batch = batch_sweep(rt, model, cfg)
    finally:
        if rt is not None:
            rt = None
            detach()
    prec = precision(model)
    prec["path"] = code_path
    head_ctx = int(cfg.get("headline_context") or contexts[0])
    head_ctx = head_ctx if head_ctx in contexts else contexts[0]      # a headline outside the sweep: the first
    head = rows.get(f"greedy@{head_ctx}") or rows[f"{modes[0]}@{head_ctx}"]
    return {
        "decode_tokens_per_s": head["decode_tokens_per_s"],
        "decode_tokens_per_s_spread": head["spread"]["decode_tokens_per_s"],   # over the timed repeats
        "ttft_s": head["ttft_s"],
        "ttft_s_spread": head["spread"]["ttft_s"],
        "prefill_tokens_per_s": head["prefill_tokens_per_s"],
        "e2e_p50_s": head["e2e_p50_s"], "e2e_p95_s": head["e2e_p95_s"],
        "energy_j_per_1k_tokens": head["energy_j_per_1k_tokens"], "tokens_per_j": head["tokens_per_j"],
        "ape_decode_tokens_per_s_per_b_active": head["ape_decode"],
        "headline": f"{head['mode']}@{head['context']}",
        "energy_source": "nvml total energy counter" if meter.handle is not None else meter.reason,
        "active_params": counts["active_excl_embedding"],
        "threads": torch.get_num_threads(),
        "code_path": code_path,
        "runtime_requested": want,
        "fallback_reason": reason,
        "peak_allocated_bytes": peak,
        "precision": prec,
        "protocol": "Yadav & Patel, arXiv 2508.16700: true TTFT incl. prefill; decode over the full "
                    "decode; p50/p95 end-to-end; NVML energy per 1,000 generated tokens; APE",
        "by_setting": rows,
        "by_batch": by_batch,
        "batch_sweep_skipped": batch_skip,
        "batch_decode_tokens_per_s_max": max((r["decode_tokens_per_s"] for r in by_batch.values()
                                              if "decode_tokens_per_s" in r), default=None),
    }
