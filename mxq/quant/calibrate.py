"""Calibrated quantization of a plan's experts: ``quantize_(model, plan, recipe, ...)`` (GPTQ on routed tokens).

Order ("true sequential", GPTQ arXiv 2210.17323, section 5, and its reference code's ``--true-sequential``):
the calibration windows' hidden states enter layer 0; for each layer L, in order,

1. its attention projections are put in the plan's format, and the attention half of the layer is run,
   giving ``h`` (the residual stream after attention) of every calibration token;
2. every token is routed by L's router (experts the plan prunes are excluded, as after pruning), and
   expert e's gate_up Hessian is built from the post-attention-norm states of the tokens routed to e only;
3. every kept expert's gate_up is quantized (GPTQ, or the fallback, see below) and installed;
4. expert e's down Hessian is built from its SwiGLU output computed with its *quantized* gate_up on its
   routed tokens; down is quantized and installed;
5. ``apply_`` then prunes / re-stacks the layer exactly as for RTN, and the calibration tokens are run
   through the finished layer L: layer L + 1 is calibrated on the outputs of the quantized layers < L + 1.

Experts whose target format is their current one keep their bytes (``convert`` never re-quantizes them);
bf16 targets are converted without calibration. An expert with fewer than ``min_tokens`` routed tokens
(zero included) is quantized by ``fallback`` and listed; nothing is left in a default state silently.

``calibration.json`` (version 1): ``options``, ``calibration_tokens``, ``methods`` (experts per method:
``gptq``, ``fallback``, ``kept``, ``convert``), ``fallbacks`` (layer, expert, tokens, fallback) and per layer
``seconds`` and per expert ``tokens`` (routed), ``gate_mass``, ``forced_tokens`` (expert-balanced
calibration), ``method`` (+ ``fallback_reason``) and per matrix (``gate_up``, ``down``) the damping applied
and its retries, inputs never seen (``dead_inputs``), Hessian ``rank`` and ``condition`` (null: singular),
and the relative calibration-weighted output error tr(D H D^T) / tr(W H W^T) of GPTQ and of RTN.

Memory per layer (d = hidden = intermediate = 2880 for gpt-oss-20b and -120b; E experts; N calibration
tokens; fp32 Hessians; ``a`` bytes per activation in the model's dtype; B = ``expert_batch``):
  hidden states N * d * a (one buffer, updated in place; routing is recomputed per batch, not stored)
  + one kind's Hessians E * d^2 * 4 (gate_up's are freed before down's are built)
  + GPTQ work for B experts of gate_up [2d, d]: about B * (2d * d * 17 + d^2 * 16) bytes (source, working
    copy, permuted copy and result in fp32, codes in u8; Hessian, its permuted copy and factor in fp32).
gpt-oss-20b (E = 32) with N = 131,072 bf16 tokens and B = 8: 0.75 GB + 1.06 GB + 3.3 GB = 5.1 GB on top of
the model; gpt-oss-120b (E = 128): 0.75 GB + 4.25 GB + 3.3 GB = 8.3 GB (calibration windows are held as
token ids only; no layer's activations but the current one's exist).
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..atomic import write_atomic
from ..formats import Packed, get_format
from ..model.attention import AttentionMasks
from ..model.experts import PackedExperts, clamped_swiglu
from ..plan.apply import PROJECTIONS, _apply_linear, apply_
from ..plan.plan import PRUNE, Plan
from ..plan.recipe import recipe_dict
from .gptq import GPTQSettings, gptq
from .grid import GRIDS, make_grid
from .hessian import ExpertHessians, condition
from .options import GPTQOptions, gptq_options

log = logging.getLogger("mxq.quant")
REPORT_VERSION = 1


def output_error(w: Tensor, q: Tensor, h: Tensor) -> Tensor:
    """[B] relative calibration-weighted error tr(D H D^T) / tr(W H W^T), D = W - Q; w, q [B, o, i], h [B, i, i]."""
    d = (w - q).float()
    num = ((d @ h) * d).sum(dim=(1, 2), dtype=torch.float64)
    den = ((w.float() @ h) * w.float()).sum(dim=(1, 2), dtype=torch.float64)
    return num / den.clamp(min=1e-300)


def rtn_fallback(w: Tensor, fmt: str, opts: GPTQOptions) -> list[Packed]:
    """The fallback for uncalibrated experts: the format's quantizer, or its grid with the MSE scale search."""
    if opts.fallback == "rtn":
        f = get_format(fmt)
        return [f.quantize(w[b]) for b in range(w.shape[0])]
    grid = make_grid(fmt, w)
    eye = torch.eye(w.shape[-1], dtype=torch.float32, device=w.device).expand(w.shape[0], -1, -1)
    shrink = GPTQOptions(mse_clip=True, mse_steps=opts.mse_steps, mse_min_shrink=opts.mse_min_shrink).shrink
    res = gptq(w, eye, grid, GPTQSettings(opts.block_size, opts.damp, False, shrink))
    return grid.pack(res.codes, res.states, res.values, "fallback")


class LayerCalibrator:
    """The ``layer_hook`` of ``apply_``: quantizes layer i's experts on the calibration tokens (module docstring)."""

    def __init__(self, model, plan: Plan, calib, opts: GPTQOptions, batch_size: int = 8, progress: bool = True):
        self.model, self.plan, self.opts, self.bs, self.progress = model, plan, opts, batch_size, progress
        dev = model.device
        self.mask = calib.attention_mask.to(dev).bool()                                  # [N, T]
        n, t = self.mask.shape
        self.x = torch.empty(n, t, model.config.hidden_size, dtype=model.dtype, device=dev)   # [N, T, H]
        with torch.no_grad():
            for s in range(0, n, batch_size):
                self.x[s:s + batch_size] = model.embed_tokens(calib.input_ids[s:s + batch_size].to(dev))
        self.settings = GPTQSettings(opts.block_size, opts.damp, opts.act_order, opts.shrink)
        self.layers: list[dict[str, Any]] = []
        self.tokens = int(self.mask.sum())
        self._forced: dict[int, tuple[Tensor, Tensor]] = {}     # expert -> (token rows, weights), this layer

    # ------------------------------------------------------------------ forward pieces
    def _batches(self):
        dev = self.x.device
        t = self.mask.shape[1]
        for s in range(0, self.mask.shape[0], self.bs):
            valid = self.mask[s:s + self.bs]                                             # [b, T]
            pos = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
            yield slice(s, s + self.bs), valid, pos, AttentionMasks(torch.arange(t, device=dev), valid)

    @torch.no_grad()
    def _finish_layer(self, layer: nn.Module) -> None:
        """x <- h + MoE(norm(h)) through the already re-packed layer (its outputs feed the next layer)."""
        for sl, valid, _, _ in self._batches():
            h = self.x[sl]
            out, _ = layer.mlp(layer.post_attention_layernorm(h), valid)
            self.x[sl] = h + out

    @torch.no_grad()
    def _attention(self, layer: nn.Module) -> None:
        for sl, valid, pos, masks in self._batches():
            x = self.x[sl]
            cos, sin = self.model.rope(pos, x.dtype)
            self.x[sl] = x + layer.self_attn(layer.input_layernorm(x), cos, sin, masks, None)

    def _routed(self, layer: nn.Module, pruned: list[int], forced_only: bool = False):
        """Per batch: (post-norm states of valid tokens u [n, H], {expert: (token rows [n_e], weights [n_e])},
        router logits [n, E]) for the routed tokens plus the tokens forced into thin experts (``_forced``);
        ``forced_only``: the forced ones alone."""
        mlp = layer.mlp
        off = 0
        for sl, valid, _, _ in self._batches():
            u = layer.post_attention_layernorm(self.x[sl])[valid]                      # [n, H]
            logits = mlp.router(u).float()                                               # [n, E]
            if pruned:
                logits[:, pruned] = float("-inf")
            groups: dict[int, tuple[Tensor, Tensor]] = {}
            if not forced_only:
                vals, idx = torch.topk(logits, mlp.top_k, dim=-1)                        # [n, k]
                w = torch.softmax(vals, dim=-1)
                for e in torch.unique(idx).tolist():
                    sel = idx == e                                                       # [n, k]
                    tok = sel.any(dim=1)
                    groups[e] = (tok.nonzero().squeeze(1), (w * sel).sum(dim=1)[tok])
            n = u.shape[0]
            for e, (rows, gw) in self._forced.items():
                m = (rows >= off) & (rows < off + n)
                if bool(m.any()):
                    r0, g0 = groups.get(e, (rows[:0], gw[:0]))
                    groups[e] = (torch.cat((r0, rows[m] - off)), torch.cat((g0, gw[m])))
            yield u, groups, logits
            off += n

    def _balance(self, logits: Tensor, top_k: int, tokens: Tensor, kept: list[int]) -> None:
        """Expert-balanced calibration: an expert with fewer than ``balance_tokens`` routed tokens gets the
        tokens with its highest router logits among those not routed to it, each weighted by the routing
        weight it would get in place of the token's k-th choice (MoEQuant's expert-balanced self-sampling,
        arXiv 2505.03804 section 4.1; llm-compressor's ``moe_calibrate_all_experts`` runs every token)."""
        want = self.opts.balance_tokens
        vals, idx = torch.topk(logits, top_k, dim=-1)                                    # [N, k]
        for e in kept:
            need = want - int(tokens[e])
            if need <= 0:
                continue
            score = logits[:, e].masked_fill((idx == e).any(dim=1), float("-inf"))      # [N]
            need = min(need, int(torch.isfinite(score).sum()))
            if need <= 0:
                continue
            top = torch.topk(score, need).indices.sort().values                         # [need] token rows
            cand = torch.cat((vals[top, :-1], score[top, None]), dim=1)                  # [need, k]
            self._forced[e] = (top, torch.softmax(cand, dim=-1)[:, -1])

    def gate_up_hessians(self, layer: nn.Module, pruned: list[int]) -> tuple[ExpertHessians, Tensor]:
        """gate_up Hessians of every expert from its routed tokens' post-norm states (plus forced tokens with
        ``balance_tokens``), and each expert's gate mass [E] over its routed tokens."""
        ex = layer.mlp.experts
        hs = ExpertHessians(ex.num_experts, ex.hidden, self.x.device, self.opts.gate_weighted)
        mass = torch.zeros(ex.num_experts, dtype=torch.float64)
        self._forced = {}
        all_logits = []
        for u, groups, logits in self._routed(layer, pruned):
            for e, (rows, gate) in groups.items():
                hs.add(e, u[rows], gate)
                mass[e] += float(gate.double().sum())
            if self.opts.balance_tokens:
                all_logits.append(logits)
        if self.opts.balance_tokens:
            kept = [e for e in range(ex.num_experts) if e not in pruned]
            self._balance(torch.cat(all_logits), layer.mlp.top_k, hs.tokens.clone(), kept)
            del all_logits
            routed = hs.tokens.clone()
            for u, groups, _ in self._routed(layer, pruned, forced_only=True):
                for e, (rows, gate) in groups.items():
                    hs.add(e, u[rows], gate)
            hs.forced = hs.tokens - routed
        return hs, mass

    # ------------------------------------------------------------------ the hook
    @torch.no_grad()
    def __call__(self, i: int, layer: nn.Module) -> None:
        t0 = time.perf_counter()
        if i > 0:
            self._finish_layer(self.model.layers[i - 1])
        for n in PROJECTIONS:
            _apply_linear(getattr(layer.self_attn, n), self.plan.attention)
        self._attention(layer)
        ex: PackedExperts = layer.mlp.experts
        row = self.plan.experts[i]
        pruned = [e for e, f in enumerate(row) if f == PRUNE]
        entries = {e: {"expert": e, "format": f, "source_format": ex.packed("gate_up", e).format}
                   for e, f in enumerate(row) if f != PRUNE}
        hs, mass = self.gate_up_hessians(layer, pruned)
        forced = hs.forced
        for e, ent in entries.items():
            ent["tokens"] = int(hs.tokens[e]) - (int(forced[e]) if forced is not None else 0)
            if forced is not None:
                ent["forced_tokens"] = int(forced[e])
            ent["gate_mass"] = round(float(mass[e]), 6)
        self._quantize_kind(i, ex, "gate_up", hs, entries)
        del hs
        # down: Hessians from each expert's SwiGLU output with its quantized gate_up
        hs = ExpertHessians(ex.num_experts, ex.intermediate, self.x.device, self.opts.gate_weighted)
        for u, groups, _ in self._routed(layer, pruned):
            for e, (rows, gate) in groups.items():
                xe = u[rows]
                a = ex.gate_up_matmul(e, xe) + ex.gate_up_bias[e].to(xe.dtype)           # [n, 2I]
                hs.add(e, clamped_swiglu(a, ex.alpha, ex.limit), gate)
        self._quantize_kind(i, ex, "down", hs, entries)
        del hs
        self.layers.append({"layer": i, "seconds": round(time.perf_counter() - t0, 3),
                            "experts": [entries[e] for e in sorted(entries)]})
        n_fb = sum(1 for v in entries.values() if v["method"] == "fallback")
        log.info("layer %d: %d experts calibrated, %d fallbacks, %.1f s", i,
                 sum(1 for v in entries.values() if v["method"] == "gptq"), n_fb, time.perf_counter() - t0)

    def _quantize_kind(self, i: int, ex: PackedExperts, kind: str, hs: ExpertHessians,
                       entries: dict[int, dict]) -> None:
        o = self.opts
        todo: dict[str, list[int]] = {}
        for e, ent in entries.items():
            f, src = ent["format"], ent["source_format"]
            if f == src:
                ent["method"] = "kept"                      # convert keeps these bytes: nothing to calibrate
            elif f not in GRIDS:
                ent["method"] = "convert"                   # bf16: exact, nothing to calibrate
            elif ent["tokens"] + ent.get("forced_tokens", 0) < o.min_tokens:
                ent["method"] = "fallback"
                ent["fallback"] = o.fallback
                ent["fallback_reason"] = (f"{ent['tokens']} routed (+{ent.get('forced_tokens', 0)} forced) tokens "
                                          f"< min_tokens={o.min_tokens}")
                w = get_format(src).dequantize(ex.packed(kind, e), torch.float32).unsqueeze(0)
                ex.set_expert(kind, e, rtn_fallback(w, f, o)[0])
            else:
                ent["method"] = "gptq"
                todo.setdefault(f, []).append(e)
        for f, experts in todo.items():
            for c in range(0, len(experts), o.expert_batch):
                chunk = experts[c:c + o.expert_batch]
                w = torch.stack([get_format(entries[e]["source_format"]).dequantize(ex.packed(kind, e), torch.float32)
                                 for e in chunk])                                        # [B, out, in]
                h = hs.hessian(chunk)                                                    # [B, in, in]
                grid = make_grid(f, w)
                res = gptq(w, h, grid, self.settings)
                packs = grid.pack(res.codes, res.states, res.values, f"layer {i} {kind} experts {chunk}")
                fmt = get_format(f)
                rtn = torch.stack([fmt.dequantize(fmt.quantize(w[b]), torch.float32) for b in range(len(chunk))])
                err_g, err_r = output_error(w, res.values, h).tolist(), output_error(w, rtn, h).tolist()
                cond = condition(h) if o.report_condition else [(None, None)] * len(chunk)
                for b, e in enumerate(chunk):
                    ex.set_expert(kind, e, packs[b])
                    rank, cnd = cond[b]
                    cnd = cnd if cnd is not None and math.isfinite(cnd) else None      # JSON has no inf
                    entries[e][kind] = {**res.info[b], "rank": rank, "condition": cnd,
                                        "rel_err_gptq": err_g[b], "rel_err_rtn": err_r[b]}

    def report(self) -> dict[str, Any]:
        ents = [(L["layer"], e) for L in self.layers for e in L["experts"]]
        fb = [{"layer": li, "expert": e["expert"], "tokens": e["tokens"], "fallback": e["fallback"]}
              for li, e in ents if e["method"] == "fallback"]
        counts: dict[str, int] = {}
        for _, e in ents:
            counts[e["method"]] = counts.get(e["method"], 0) + 1
        return {"version": REPORT_VERSION, "method": "gptq", "options": self.opts.__dict__,
                "calibration_tokens": self.tokens, "methods": counts, "fallbacks": fb, "layers": self.layers}


def _apply_rtn(model, plan: Plan, recipe: dict, **_: Any) -> dict | None:
    apply_(model, plan)
    return None


def _apply_gptq(model, plan: Plan, recipe: dict, tokenizer=None, calib_cfg=None, calib=None, run_dir=None,
                batch_size: int = 8, progress: bool = True) -> dict:
    opts = gptq_options(recipe["quant"])
    if calib is None:
        from ..calib import build_calibration

        calib = build_calibration(calib_cfg, tokenizer)
    cal = LayerCalibrator(model, plan, calib, opts, batch_size, progress)
    t0 = time.perf_counter()
    apply_(model, plan, layer_hook=cal)
    rep = cal.report()
    rep["seconds"] = round(time.perf_counter() - t0, 3)
    rep["calibration"] = {"config": getattr(calib, "config", {}), "hash": getattr(calib, "config_hash", None)}
    if rep["fallbacks"]:
        log.warning("%d experts fell back to %s (too few routed tokens): %s", len(rep["fallbacks"]), opts.fallback,
                    [(f["layer"], f["expert"]) for f in rep["fallbacks"][:20]])
    if run_dir is not None:
        write_atomic(Path(run_dir) / "calibration.json", json.dumps(rep, indent=1, default=_json) + "\n")
    return rep


def _json(x: Any) -> Any:
    return x.tolist() if hasattr(x, "tolist") else str(x)


METHODS: dict[str, Callable[..., dict | None]] = {"rtn": _apply_rtn, "gptq": _apply_gptq}


def quantize_(model, plan: Plan, recipe: Any, **kw: Any) -> dict | None:
    """Apply ``plan`` to ``model`` with ``recipe.quant.method`` (rtn: ``apply_``; gptq: calibrated, see module
    docstring). ``kw``: tokenizer, calib_cfg or calib (a ``CalibSet``), run_dir, batch_size, progress.
    Returns the calibration report (also written to ``run_dir/calibration.json``), or None for rtn."""
    r = recipe_dict(recipe)
    return METHODS[r["quant"].get("method", "rtn")](model, plan, r, **kw)
