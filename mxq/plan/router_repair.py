"""Router repair after pruning or merging: refit only each layer's router so the compressed layer's output
matches the original layer's on calibration tokens.

Pruning or merging changes what the router's top-k picks from, but leaves the router as trained for the
full expert set. Repair fits, per MoE layer and with everything else frozen, the router weight [K, H] and
bias [K] of the compressed layer to minimise the mean squared error between its output and the original
layer's output on the same inputs (the original model's layer inputs on calibration text, captured before
the plan is applied). Gradient descent (Adam) flows through the softmax over the selected k logits; the
top-k choice itself is piecewise constant. The experts' outputs on the captured tokens are computed once
([T, K, H]), so each step costs a router matmul and a weighted sum.

The captured tokens are split three ways: ``holdout`` (never seen, only reported), ``validation`` of the
rest (early stopping) and the fit tokens. The iterate kept, measured after rounding to bf16 (the dtype
checkpoints store routers in), is the one of lowest validation error among those whose fit error is not
above the start's; the start is a candidate, so repair never raises the error on the calibration tokens
it fits, nor on the validation tokens. The held-out error before and after says whether the fit
generalises; every figure goes into the plan's info.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .plan import PlanError

REPAIR_DEFAULTS: dict[str, Any] = {"enabled": False, "steps": 200, "lr": 1e-3, "max_tokens": 4096,
                                   "holdout": 0.1, "validation": 0.1}


@dataclass
class LayerIO:
    x: Tensor       # [T, H] the original layer's inputs (valid calibration tokens)
    y: Tensor       # [T, H] the original layer's outputs on them (fp32)


def validate_repair(r: dict[str, Any]) -> None:
    """``recipe.repair`` options; PlanError naming the option."""
    p = r["repair"]
    unknown = sorted(set(p) - set(REPAIR_DEFAULTS))
    if unknown:
        raise PlanError(f"recipe.repair.{unknown[0]}: unknown option; the options are {', '.join(REPAIR_DEFAULTS)}")

    def bad(opt: str, why: str) -> None:
        raise PlanError(f"recipe.repair.{opt}={p[opt]!r}: {why}")

    if not isinstance(p["enabled"], bool):
        bad("enabled", "must be true or false")
    for opt in ("steps", "max_tokens"):
        if isinstance(p[opt], bool) or not isinstance(p[opt], int) or p[opt] < 1:
            bad(opt, "must be a positive integer")
    if isinstance(p["lr"], bool) or not isinstance(p["lr"], (int, float)) or not p["lr"] > 0:
        bad("lr", "must be a positive number")
    for opt in ("holdout", "validation"):
        if isinstance(p[opt], bool) or not isinstance(p[opt], (int, float)) or not 0 <= p[opt] < 0.5:
            bad(opt, "must be a number in [0, 0.5): a share of the captured calibration tokens")
    if p["enabled"] and not r.get("planner"):
        bad("enabled", "router repair refits a compressed model's routers; set a planner (prune, merge, ...)")


@torch.no_grad()        # not inference_mode: the captured tensors are inputs of an autograd fit later
def capture_layer_io(model, calib, batch_size: int, max_tokens: int) -> list[LayerIO]:
    """Every MoE layer's inputs and outputs on the first ``max_tokens`` valid calibration tokens."""
    xs: list[list[Tensor]] = [[] for _ in model.layers]
    ys: list[list[Tensor]] = [[] for _ in model.layers]
    seen = [0] * len(model.layers)

    def hook(mlp, args, output) -> None:
        i = mlp.layer
        if seen[i] >= max_tokens:
            return
        x, valid = args[0], args[1].reshape(-1).bool()
        h = x.shape[-1]
        take = max_tokens - seen[i]
        xs[i].append(x.reshape(-1, h)[valid][:take].float().cpu())
        ys[i].append(output[0].reshape(-1, h)[valid][:take].float().cpu())
        seen[i] += xs[i][-1].shape[0]

    handles = [layer.mlp.register_forward_hook(hook) for layer in model.layers]
    try:
        for ids, mask, _ in calib.batches(batch_size):
            if min(seen) >= max_tokens:
                break
            model(ids.to(model.device), attention_mask=mask.to(model.device), logits=False)
    finally:
        for h in handles:
            h.remove()
    return [LayerIO(torch.cat(a), torch.cat(b)) for a, b in zip(xs, ys)]


def layer_output(w: Tensor, b: Tensor, x: Tensor, f: Tensor, k: int) -> Tensor:
    """The MoE output for router (w [K, H], b [K]) on x [T, H] given every expert's output f [T, K, H]."""
    vals, idx = torch.topk(x @ w.t() + b, k, dim=-1)                              # [T, k]
    g = torch.softmax(vals, dim=-1)                                               # [T, k]
    return (g[..., None] * f.gather(1, idx[..., None].expand(-1, -1, f.shape[-1]))).sum(1)   # [T, H]


def _mse(w: Tensor, b: Tensor, x: Tensor, f: Tensor, y: Tensor, k: int) -> float:
    with torch.no_grad():
        return float((layer_output(w, b, x, f, k) - y).pow(2).mean()) if len(x) else float("nan")


def _bf16(t: Tensor) -> Tensor:
    return t.to(torch.bfloat16).float()


def repair_layer_(mlp, io: LayerIO, steps: int, lr: float, holdout: float, validation: float
                  ) -> dict[str, float]:
    """Refit ``mlp.router`` in place (see the module docstring); returns the errors before and after."""
    dev = mlp.router.weight.device
    x, y = io.x.to(dev), io.y.to(dev)
    n_hold = round(holdout * len(x))
    n_val = round(validation * (len(x) - n_hold))
    ex, k = mlp.experts, mlp.top_k
    with torch.no_grad():
        f = torch.stack([ex.expert_forward(e, x.to(ex.gate_up_bias.dtype)).float()
                         for e in range(ex.num_experts)], 1)                     # [T, K, H]
    parts = {"heldout": slice(0, n_hold), "val": slice(n_hold, n_hold + n_val), "fit": slice(n_hold + n_val, None)}
    xs, ys, fs = ({p: t[s] for p, s in parts.items()} for t in (x, y, f))
    w0, b0 = mlp.router.weight.detach().float(), mlp.router.bias.detach().float()

    def err(part: str, w: Tensor, b: Tensor) -> float:
        return _mse(w, b, xs[part], fs[part], ys[part], k)

    w = w0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr)
    fit0 = err("fit", w0, b0)
    best = (err("val", w0, b0) if n_val else fit0, fit0, w0, b0)
    for _ in range(steps):
        with torch.enable_grad():
            opt.zero_grad()
            loss = (layer_output(w, b, xs["fit"], fs["fit"], k) - ys["fit"]).pow(2).mean()
            loss.backward()
            opt.step()
        wq, bq = _bf16(w.detach()), _bf16(b.detach())
        e_fit = err("fit", wq, bq)
        e_val = err("val", wq, bq) if n_val else e_fit
        if e_fit <= fit0 and e_val < best[0]:
            best = (e_val, e_fit, wq, bq)
    _, _, wb, bb = best
    out = {"calib_mse_before": fit0, "calib_mse_after": err("fit", wb, bb),
           "validation_mse_before": err("val", w0, b0), "validation_mse_after": err("val", wb, bb),
           "heldout_mse_before": err("heldout", w0, b0), "heldout_mse_after": err("heldout", wb, bb),
           "tokens": len(xs["fit"]), "validation_tokens": n_val, "heldout_tokens": n_hold}
    dt = mlp.router.weight.dtype
    mlp.router.weight = nn.Parameter(wb.to(dt), requires_grad=False)
    mlp.router.bias = nn.Parameter(bb.to(dt), requires_grad=False)
    return out


def repair_routers_(model, ios: list[LayerIO], steps: int, lr: float, holdout: float, validation: float = 0.1
                    ) -> list[dict[str, float]]:
    """``repair_layer_`` on every MoE layer of a compressed model, with the original model's ``ios``."""
    if len(ios) != len(model.layers):
        raise PlanError(f"router repair: {len(ios)} captured layers for a model of {len(model.layers)}")
    return [repair_layer_(layer.mlp, io, steps, lr, holdout, validation) for layer, io in zip(model.layers, ios)]
