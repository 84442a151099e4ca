"""Running calibration text through the model: ``collect`` and the cached entry ``collect_or_load``.

The forward pass stops before ``lm_head`` (``model(..., logits=False)``): router statistics need only the
MoE layers, and the logits of a gpt-oss batch are large (32k tokens x 201,088 vocabulary in bf16 is
13 GB), so computing them would cost memory and time for nothing.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..cache_entry import entry_lock, load_dir_entry, write_dir_entry
from ..calib import CalibSet, build_calibration
from ..model import observe
from ..model.attention import inference_attention_impl
from .cache import model_hash, state_hash, stats_key
from .observer import RouterObserver
from .router_stats import VERSION, RouterStats

log = logging.getLogger("mxq.stats")


def model_digest(model: torch.nn.Module, cache_dir: Path | None = None) -> str:
    """Content hash of the checkpoint folder the model was loaded from (its tensors if it has none)."""
    src = getattr(model, "source", None)
    if src and Path(src).is_dir():
        return model_hash(src, None if cache_dir is None else Path(cache_dir) / "model_hashes.json")
    return "state:" + state_hash(model)


@torch.inference_mode()
def collect(model: torch.nn.Module, calib: CalibSet, batch_size: int = 8, super_cfg: Any = None,
            progress: bool = True) -> RouterStats:
    """Run every calibration batch through ``model`` with a ``RouterObserver`` attached."""
    c = model.config
    dev = model.device
    domains = calib.domain_names
    obs = RouterObserver(c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok, c.hidden_size,
                         len(domains), dev)
    n_batches = -(-calib.input_ids.shape[0] // batch_size)
    t0 = time.perf_counter()
    with observe(model, obs):
        for ids, mask, dom in tqdm(calib.batches(batch_size), total=n_batches, desc="router stats",
                                   unit="batch", disable=not progress):
            obs.begin_batch(dom, ids.shape[1], mask)
            model(ids.to(dev), attention_mask=mask.to(dev), logits=False)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    meta = {"dtype": str(model.dtype).removeprefix("torch."), "device": str(dev),
            "attention": inference_attention_impl(model), "batch_size": batch_size,
            "seconds": round(seconds, 3), "tokens_per_s": round(calib.num_tokens / max(seconds, 1e-9), 1)}
    return RouterStats.from_observer(obs, domains, super_cfg, calib_config=calib.config,
                                     calib_hash=calib.config_hash, meta=meta)


def collect_or_load(model: torch.nn.Module, tokenizer: Any, calib_cfg: Any, run_dir: Path, cache_dir: Path,
                    batch_size: int, super_cfg: Any = None, plots: bool = True,
                    progress: bool = True) -> RouterStats:
    """Router statistics of ``model`` on ``calib_cfg``, computed once per (model bytes, tokens, dtype, device).

    Writes ``router_stats.json``/``.safetensors`` and the PNG figures into ``run_dir``; the cache lives in
    ``cache_dir/router_stats/<key>/``. Super experts are always re-detected with ``super_cfg``.
    """
    run_dir, cache_dir = Path(run_dir), Path(cache_dir).expanduser()
    calib = build_calibration(calib_cfg, tokenizer)
    mdig = model_digest(model, cache_dir)
    key = stats_key(mdig, calib.config_hash, model.dtype, model.device, VERSION, inference_attention_impl(model))
    entry = cache_dir / "router_stats" / key
    with entry_lock(entry):          # concurrent runs on one key: one collects, the others wait and read it
        stats = load_dir_entry(entry, lambda d: RouterStats.load(d, super_cfg=super_cfg if super_cfg is not None
                                                                 else True))
        if stats is not None:
            log.info("router statistics: cache hit %s (%d tokens)", entry, calib.num_tokens)
            stats.meta["cache"] = "hit"
        else:
            log.info("router statistics: cache miss, collecting %d sequences x %d tokens (%s) -> %s",
                     calib.input_ids.shape[0], calib.input_ids.shape[1], ", ".join(calib.domain_names), entry)
            stats = collect(model, calib, batch_size, super_cfg, progress)
            stats.model_hash = mdig
            write_dir_entry(entry, stats.save)
            stats.meta["cache"] = "miss"
            log.info("router statistics: %d tokens in %.1f s (%.0f tokens/s)", stats.tokens,
                     stats.meta["seconds"], stats.meta["tokens_per_s"])
    stats.meta["cache_key"] = key
    stats.save(run_dir)
    if stats.super_experts:
        log.info("super experts (Su et al. 2507.23279): %s", stats.super_experts)
    if stats.uncalibrated.any():
        log.warning("%d experts received no calibration token (uncalibrated): %s", int(stats.uncalibrated.sum()),
                    stats.uncalibrated_list()[:20])
    if plots:
        from .plots import write_plots

        write_plots(stats, run_dir)
    return stats
