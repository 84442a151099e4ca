"""KL divergence and top-1 agreement against the uncompressed model, on the perplexity tokens.

KL(P_base || Q_compressed) per scored token, then the mean and the 99th percentile over tokens: the mean
tracks average damage, the p99 the rare tokens a compressed MoE gets badly wrong (a mis-routed token, a
broken expert) that a mean hides. Top-1 agreement = share of tokens whose argmax is unchanged.

Where the reference distribution comes from (a choice every KL number depends on, so it is stated here):
* KL needs the *full* reference distribution: top-k log-probs + logsumexp leave the tail mass unknown,
  so KL from them is not exact. mxq therefore stores the full reference log-probs, rounded to fp16
  (``cache_dtype``), of exactly the scored tokens, when they fit in ``max_cache_bytes``
  (tokens x vocab x 2 bytes; 2,044 tokens of the tiny model = 25 MB, but 2,048 tokens of gpt-oss
  = 824 MB). They are computed once by loading the baseline checkpoint and cached on disk under
  ``<cache_dir>/kl_ref/`` keyed by the baseline's content hash + the eval-token hash + window settings +
  attention implementation (the candidate's, which the baseline then runs too) +
  dtype/device, so every later run of a sweep reuses them.
* Larger than that ("paired" mode): the baseline is loaded next to the compressed model and both are run
  on the same batches in the same process, chunk by chunk; nothing is cached.
In both modes the candidate's log-probs are rounded through the same ``cache_dtype`` before comparison,
so a model compared with itself gives KL exactly 0 and top-1 agreement exactly 1, and the two modes
give the same numbers. fp16 rounding of log-probs changes KL by O(1e-5) nats, far below compression
effects (typically 1e-2 .. 1e-1 nats for 4-bit experts).
"""
from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from ..atomic import write_atomic
from ..cache_entry import entry_lock, load_tensor_entry, save_tensor_entry
from ..model.attention import SinkAttention, inference_attention_impl
from ..stats.cache import model_hash as stats_model_hash
from .perplexity import Item, window_logprobs

CACHE_VERSION = 1


def model_hash(folder: str | Path, cache_dir: Path | None = None) -> str:
    """Content hash of a checkpoint folder: the router-statistics cache's hash (``mxq.stats.cache.model_hash``),
    so both caches key a checkpoint the same way; memoised in ``<cache_dir>/model_hashes.json``."""
    return str(stats_model_hash(folder, (cache_dir / "model_hashes.json") if cache_dir else None))


def tokens_hash(tokens: dict[str, Tensor], settings: dict[str, Any]) -> str:
    """Hash of the eval token ids of every domain plus the settings that change the reference."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"v": CACHE_VERSION, **settings}, sort_keys=True).encode())
    for d in sorted(tokens):
        h.update(d.encode())
        h.update(tokens[d].to(torch.int64).numpy().tobytes())
    return h.hexdigest()


def kl_rows(lp_ref: Tensor, lq: Tensor, dtype: torch.dtype, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """Per-token KL(P || Q) [m] and top-1 agreement [m] from log-probs [m, V], both rounded via ``dtype``."""
    kls, agree = [], []
    for i in range(0, lp_ref.shape[0], chunk):
        p = lp_ref[i:i + chunk].to(dtype).float()
        q = lq[i:i + chunk].to(dtype).float()
        p = p - p.logsumexp(-1, keepdim=True)                      # renormalise after rounding
        q = q - q.logsumexp(-1, keepdim=True)
        term = torch.where(torch.isfinite(p), p.exp() * (p - q), torch.zeros_like(p))
        kls.append(term.sum(-1).cpu())
        agree.append((p.argmax(-1) == q.argmax(-1)).cpu())
    return torch.cat(kls), torch.cat(agree)


class Reference:
    """Reference log-probs of the baseline for the same windows, in the same batches, as the candidate."""

    def __init__(self, source: str, items: list[Item], batch_size: int, pad_id: int, like, cfg: dict[str, Any],
                 cache_dir: Path, progress: bool = True):
        from ..io.reader import resolve_source

        self.source, self.items, self.batch_size = str(source), items, batch_size
        self.pad_id, self.progress = pad_id, progress
        self.device, self.dtype = like.device, like.dtype
        self.cache_dtype = getattr(torch, cfg.get("cache_dtype", "float16"))
        folder = resolve_source(source)
        n_scored = sum(w.end - w.first for _, w in items)
        self.cache_bytes = n_scored * like.config.vocab_size * torch.finfo(self.cache_dtype).bits // 8
        self.mode = "disk-cache" if self.cache_bytes <= int(cfg.get("max_cache_bytes", 256 << 20)) else "paired"
        self.model_hash = model_hash(folder, cache_dir)
        self._impls = [m.impl for m in like.modules() if isinstance(m, SinkAttention)]
        self.attention = inference_attention_impl(like)
        settings = {"windows": [(w.begin, w.end, w.first) for _, w in items], "batch_size": batch_size,
                    "dtype": str(self.dtype), "device": self.device.type, "cache_dtype": str(self.cache_dtype)}
        if self.attention != "eager":      # eager and SDPA round differently (~1e-5 in fp32); eager keys unchanged
            settings["attention"] = self.attention
        seqs = {}
        for toks, _ in items:
            seqs.setdefault(id(toks), toks)
        self.tokens_hash = tokens_hash({str(i): t for i, t in enumerate(seqs.values())}, settings)
        self.path = cache_dir / "kl_ref" / f"{self.model_hash[:20]}-{self.tokens_hash[:20]}.safetensors"
        self.cached = False
        self._store: Tensor | None = None
        self._base = None
        if self.mode == "disk-cache":
            with entry_lock(self.path):     # concurrent runs: one computes the reference, the others read it
                got = load_tensor_entry(self.path)
                lp = (got or {}).get("logprobs")
                if lp is not None and tuple(lp.shape) == (n_scored, like.config.vocab_size):
                    self._store, self.cached = lp, True
                else:
                    self._base = self._load_baseline(folder)
                    self._fill_cache()
        else:
            self._base = self._load_baseline(folder)

    def _load_baseline(self, folder: Path):
        from ..io.reader import load_model

        base = load_model(folder, device=self.device, dtype=self.dtype)
        base.eval()
        mods = [m for m in base.modules() if isinstance(m, SinkAttention)]
        if len(mods) == len(self._impls):  # the candidate's attention implementation, layer by layer: a model
            for m, impl in zip(mods, self._impls):     # compared with itself then gives KL exactly 0
                m.impl = impl
        return base

    def _fill_cache(self) -> None:
        parts = [lp.to(self.cache_dtype).cpu() for lp, _, _ in window_logprobs(
            self._base, self.items, self.batch_size, self.pad_id, self.progress, "KL reference")]
        self._store = torch.cat(parts).contiguous()                                            # [N, V]
        self.free()
        save_tensor_entry(self.path, {"logprobs": self._store}, {
            "source": self.source, "model_hash": self.model_hash, "tokens_hash": self.tokens_hash,
            "version": str(CACHE_VERSION)})

    def batches(self) -> Iterator[Tensor]:
        """Reference log-probs [m, V] per batch of windows, aligned with ``window_logprobs(items)``."""
        if self._base is not None:
            for lp, _, _ in window_logprobs(self._base, self.items, self.batch_size, self.pad_id):
                yield lp
            return
        off = 0
        for i in range(0, len(self.items), self.batch_size):
            m = sum(w.end - w.first for _, w in self.items[i:i + self.batch_size])
            yield self._store[off:off + m].to(self.device)
            off += m

    def free(self) -> None:
        self._base = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "mode": self.mode, "cached": self.cached, "attention": self.attention,
                "model_hash": self.model_hash,
                "tokens_hash": self.tokens_hash, "path": str(self.path) if self.mode == "disk-cache" else None,
                "bytes": self.cache_bytes, "cache_dtype": str(self.cache_dtype).removeprefix("torch.")}
