"""``apply_(model, plan)``: carry out a plan on a loaded model, in place.

Pruning expert e of a layer removes its router row and bias entry and its slice of every expert tensor;
routing then takes the top-k over the surviving logits and the softmax over those k renormalises by
itself, exactly as if the pruned experts' router logits were -inf (top-k first, then
softmax over the k, as openai/gpt-oss ``MLPBlock``). Kept experts
are re-packed into their target format through ``convert`` (an expert already in its target format keeps
its bytes; a layer whose kept experts all stay in one stacked format stays stacked, copied once with
``index_select``; a layer whose kept experts all end in one format after re-packing is stacked again, so
that every expert of the layer is a view of one buffer per tensor, as the fast runtime requires;
stacking moves no value, the exported bytes are the same). Attention projections and the lm_head in fp8
are quantized and their dequantized values put back into the ``nn.Linear`` (the model computes with exactly
the stored values); the packed weight is kept on the module as ``_mxq_packed`` for the exporters.
A merge plan (``Plan.merge``) first gives each group's anchor the merge of its members
(``mxq.plan.merge``), then prunes the other members like any pruned expert.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..formats import Packed, get_format
from ..formats.convert import convert
from ..model.experts import PackedExperts
from .merge import merge_experts_
from .plan import PRUNE, Plan, PlanError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def source_formats(model) -> list[list[str]]:
    """[L][E] current format of every expert of a loaded model."""
    return [list(layer.mlp.experts.formats()) for layer in model.layers]


def linear_format(lin: nn.Linear) -> str:
    p = getattr(lin, "_mxq_packed", None)
    return "bf16" if p is None else p.format


def current_plan(model) -> Plan:
    """The identity plan of the model as it is now (formats of its experts, attention and lm_head)."""
    att = {linear_format(getattr(layer.self_attn, n)) for layer in model.layers for n in PROJECTIONS}
    if len(att) != 1:
        raise PlanError(f"the model's attention projections are in several formats {sorted(att)}")
    return Plan(source_formats(model), att.pop(), linear_format(model.lm_head))


def _stacked_source(ex: PackedExperts, kind: str, kept: list[int], target: list[str]) -> tuple | None:
    """(format, meta, {name: stacked buffer}) when every kept expert is a view of one stacked tensor set
    in the same format as its target, so the layer can stay stacked; else None."""
    specs = [ex._spec[kind][e] for e in kept]          # (format, shape, meta, {name: (buffer, stacked)})
    fmt, _, meta, refs = specs[0]
    if not all(stacked for _, stacked in refs.values()):
        return None
    if any(s[0] != fmt or s[3] != refs for s in specs) or any(t != fmt for t in target):
        return None
    return fmt, meta, {name: getattr(ex, buf) for name, (buf, _) in refs.items()}


def _stackable(qs: list[Packed]) -> bool:
    """Whether packed experts can share one [K, ...] buffer per tensor: one format, meta, names, shapes, dtypes."""
    q0 = qs[0]
    sig = {n: (t.shape, t.dtype, t.device) for n, t in q0.tensors.items()}
    return all(q.format == q0.format and q.meta == q0.meta and tuple(q.shape) == tuple(q0.shape)
               and {n: (t.shape, t.dtype, t.device) for n, t in q.tensors.items()} == sig for q in qs)


def _own(p: Packed) -> Packed:
    """A copy whose tensors own their storage, so the old layer's buffers can be freed."""
    return Packed(p.format, {k: v.clone() for k, v in p.tensors.items()}, p.shape, dict(p.meta))


def _apply_layer(mlp: nn.Module, row: list[str]) -> None:
    ex = mlp.experts
    if not isinstance(ex, PackedExperts):
        raise PlanError(f"layer {mlp.layer}: plans apply to packed experts, not {type(ex).__name__}")
    kept = [e for e, f in enumerate(row) if f != PRUNE]
    target = [row[e] for e in kept]
    dev = ex.gate_up_bias.device
    idx = torch.tensor(kept, dtype=torch.long, device=dev)
    with torch.device("meta"):
        new = PackedExperts(len(kept), ex.hidden, ex.intermediate, ex.alpha, ex.limit)
    new.gate_up_bias = nn.Parameter(ex.gate_up_bias.detach().index_select(0, idx), requires_grad=False)  # [K, 2I]
    new.down_bias = nn.Parameter(ex.down_bias.detach().index_select(0, idx), requires_grad=False)        # [K, H]
    for kind in PackedExperts.KINDS:
        st = _stacked_source(ex, kind, kept, target)
        if st is not None:
            fmt, meta, bufs = st
            new.set_stacked(kind, fmt, {n: b.index_select(0, idx.to(b.device)) for n, b in bufs.items()}, meta)
            continue
        pairs = []
        for e, f in zip(kept, target):          # errors name the expert: model.layers.{i}.mlp.experts.{e}.{kind}
            p = ex.packed(kind, e)
            pairs.append((p, convert(p, f, f"model.layers.{mlp.layer}.mlp.experts.{e}.{kind}")))
        qs = [q for _, q in pairs]
        if _stackable(qs):            # one format in the layer: stacked again (a copy of the same values)
            new.set_stacked(kind, qs[0].format, {n: torch.stack([q.tensors[n] for q in qs])
                                                 for n in qs[0].tensors}, qs[0].meta)
            continue
        for j, (p, q) in enumerate(pairs):
            new.set_expert(kind, j, _own(q) if q is p else q)
    old = mlp.router
    router = nn.Linear(old.in_features, len(kept), bias=True, device="meta")
    router.weight = nn.Parameter(old.weight.detach().index_select(0, idx), requires_grad=False)          # [K, H]
    router.bias = nn.Parameter(old.bias.detach().index_select(0, idx), requires_grad=False)              # [K]
    mlp.router, mlp.experts = router, new


def _apply_linear(lin: nn.Linear, fmt: str, name: str | None = None) -> None:
    cur = getattr(lin, "_mxq_packed", None)
    if fmt == "bf16":
        if cur is not None:
            del lin._mxq_packed        # the weight already holds the dequantized values
        return
    if cur is not None and cur.format == fmt:
        return
    w = lin.weight.detach()
    p = (convert(cur, fmt, name) if cur is not None
         else get_format(fmt).quantize(w if w.dtype != torch.float16 else w.float(), name=name))
    lin.weight = nn.Parameter(get_format(fmt).dequantize(p, w.dtype), requires_grad=False)
    lin._mxq_packed = p


@torch.no_grad()
def apply_(model, plan: Plan, layer_hook: Callable[[int, nn.Module], None] | None = None) -> None:
    """Apply ``plan`` to ``model`` in place; the plan is fully checked before anything changes.

    ``layer_hook(i, layer)`` runs before layer i is re-packed, after layers < i are done: calibrated
    quantizers (``mxq.quant``) install each kept expert's packed weights in its target format there.
    """
    plan.check(model.config)
    for i, layer in enumerate(model.layers):
        if not isinstance(layer.mlp.experts, PackedExperts):
            raise PlanError(f"layer {i}: plans apply to packed experts, not {type(layer.mlp.experts).__name__}")
    k = plan.num_kept
    if plan.merge is not None:        # anchors take their group's merge before the other members go
        merge_experts_(model, plan)
    for i, layer in enumerate(model.layers):
        if layer_hook is not None:
            layer_hook(i, layer)
        _apply_layer(layer.mlp, plan.experts[i])
        for n in PROJECTIONS:
            _apply_linear(getattr(layer.self_attn, n), plan.attention, f"model.layers.{i}.self_attn.{n}.weight")
    _apply_linear(model.lm_head, plan.lm_head, "lm_head.weight")
    model.config.num_local_experts = k
    model.mxq_plan = plan
