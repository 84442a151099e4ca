"""Every expert's mean output and the router logits' Gram matrix on calibration tokens (expert merging).

HC-SMoE (Chen et al., arXiv 2410.08589) represents each expert by its output averaged over the
calibration tokens, *all* of them, not only those routed to it, so that the representation does not
depend on routing; its router-logit baseline represents expert e by the column of router logits [T] over
the same tokens. Both are collected here in one pass: each MoE layer's input is captured by a forward hook
(the layer's code is untouched) and, on the valid tokens, every expert runs on every token (E/k times the
expert work of a forward pass) and the router logits' sums and Gram matrix are accumulated, which give
the exact Euclidean distances and cosines between the logit columns without storing them
(||l_a - l_b||^2 = G_aa + G_bb - 2 G_ab). Sums are float64 on the model's device.

``collect_or_load_outputs`` caches the result beside the router statistics, under the same key scheme
(model bytes, calibration tokens, dtype, device, attention), so a sweep of merge recipes pays once.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..atomic import write_atomic

log = logging.getLogger("mxq.stats")
VERSION = "expert_outputs-1"
TENSORS = ("mean_out", "logit_gram", "logit_sum")


@dataclass
class ExpertOutputs:
    tokens: int                   # valid calibration tokens seen by each layer
    mean_out: Tensor              # [L, E, H] float64: mean over all tokens of f_e(x) (down bias included)
    logit_gram: Tensor            # [L, E, E] float64: sum over tokens of l_a(x) l_b(x)
    logit_sum: Tensor             # [L, E] float64: sum over tokens of l_e(x)
    meta: dict[str, Any] = field(default_factory=dict)

    def logit_distances(self, layer: int) -> Tensor:
        """[E, E] Euclidean distances between the experts' logit columns over the calibration tokens."""
        g = self.logit_gram[layer]
        d = g.diagonal()
        return (d[:, None] + d[None, :] - 2 * g).clamp(min=0).sqrt()

    def logit_cosine(self, layer: int) -> Tensor:
        """[E, E] cosine similarity of the experts' logit columns (MC-SMoE's router-logit similarity)."""
        g = self.logit_gram[layer]
        n = g.diagonal().clamp(min=1e-300).sqrt()
        return g / (n[:, None] * n[None, :])


class _Accumulator:
    def __init__(self, num_layers: int, num_experts: int, hidden: int, device: torch.device):
        f64 = {"dtype": torch.float64, "device": device}
        self.out_sum = torch.zeros(num_layers, num_experts, hidden, **f64)       # [L, E, H]
        self.gram = torch.zeros(num_layers, num_experts, num_experts, **f64)     # [L, E, E]
        self.logit_sum = torch.zeros(num_layers, num_experts, **f64)             # [L, E]
        self.tokens = torch.zeros(num_layers, **f64)

    @torch.no_grad()
    def hook(self, mlp, args, output) -> None:
        x, valid = args[0], args[1]
        h = x.shape[-1]
        flat = x.reshape(-1, h)[valid.reshape(-1).bool()]                       # [n, H] valid tokens only
        i = mlp.layer
        logits = mlp.router(flat).double()                                       # [n, E]
        self.gram[i] += logits.t() @ logits
        self.logit_sum[i] += logits.sum(0)
        self.tokens[i] += flat.shape[0]
        for e in range(mlp.experts.num_experts):
            self.out_sum[i, e] += mlp.experts.expert_forward(e, flat).double().sum(0)


@torch.inference_mode()
def collect_expert_outputs(model: torch.nn.Module, calib, batch_size: int = 8) -> ExpertOutputs:
    """Run the calibration set (``mxq.calib.CalibSet``) through ``model``; see the module docstring."""
    c = model.config
    dev = model.device
    acc = _Accumulator(c.num_hidden_layers, c.num_local_experts, c.hidden_size, dev)
    handles = [layer.mlp.register_forward_hook(acc.hook) for layer in model.layers]
    t0 = time.perf_counter()
    try:
        for ids, mask, _ in calib.batches(batch_size):
            model(ids.to(dev), attention_mask=mask.to(dev), logits=False)
    finally:
        for h in handles:
            h.remove()
    tok = acc.tokens.cpu()
    n = tok.clamp(min=1)
    return ExpertOutputs(tokens=int(tok[0]) if tok.numel() else 0, mean_out=(acc.out_sum.cpu() / n[:, None, None]),
                         logit_gram=acc.gram.cpu(), logit_sum=acc.logit_sum.cpu(),
                         meta={"seconds": round(time.perf_counter() - t0, 3), "calib_hash": calib.config_hash,
                               "batch_size": batch_size})


def save_outputs(out: ExpertOutputs, folder: Path) -> None:
    """``expert_outputs.safetensors`` + ``expert_outputs.json``; the JSON is written last, so a folder whose
    JSON exists holds a complete entry."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".expert_outputs.{time.time_ns()}.tmp"
    save_file({k: getattr(out, k).contiguous() for k in TENSORS}, str(tmp))
    tmp.replace(folder / "expert_outputs.safetensors")
    write_atomic(folder / "expert_outputs.json", json.dumps({"version": VERSION, "tokens": out.tokens,
                                                             "meta": out.meta}, indent=2) + "\n")


def load_outputs(folder: Path) -> ExpertOutputs:
    d = json.loads((folder / "expert_outputs.json").read_text())
    if d.get("version") != VERSION:
        raise ValueError(f"{folder}/expert_outputs.json: version {d.get('version')!r}, this mxq reads {VERSION}")
    t = load_file(str(folder / "expert_outputs.safetensors"))
    return ExpertOutputs(tokens=d["tokens"], meta=d["meta"], **{k: t[k] for k in TENSORS})


def collect_or_load_outputs(model: torch.nn.Module, tokenizer: Any, calib_cfg: Any, cache_dir: Path,
                            batch_size: int) -> ExpertOutputs:
    """``collect_expert_outputs`` on ``calib_cfg``, computed once per (model bytes, tokens, dtype, device)."""
    from ..calib import build_calibration
    from ..model.attention import inference_attention_impl
    from .cache import stats_key
    from .collect import model_digest

    cache_dir = Path(cache_dir).expanduser()
    calib = build_calibration(calib_cfg, tokenizer)
    key = stats_key(model_digest(model, cache_dir), calib.config_hash, model.dtype, model.device, VERSION,
                    inference_attention_impl(model))
    entry = cache_dir / "expert_outputs" / key
    if (entry / "expert_outputs.json").is_file():
        log.info("expert mean outputs: cache hit %s", entry)
        return load_outputs(entry)
    out = collect_expert_outputs(model, calib, batch_size)
    save_outputs(out, entry)
    log.info("expert mean outputs (all experts on all %d calibration tokens) in %.1f s -> %s", out.tokens,
             out.meta["seconds"], entry)
    return out
