"""Observing the MoE layers without touching their code: router statistics and evaluation use this."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Protocol

from torch import Tensor, nn


class MoEObserver(Protocol):
    def on_route(self, layer: int, logits: Tensor, topk_idx: Tensor, topk_w: Tensor, valid: Tensor) -> None: ...

    def on_expert(self, layer: int, expert: int, token_idx: Tensor, gate_w: Tensor, out: Tensor) -> None: ...


def moe_layers(model: nn.Module) -> list[nn.Module]:
    return [layer.mlp for layer in model.layers]


@contextmanager
def observe(model: nn.Module, observer: MoEObserver) -> Iterator[MoEObserver]:
    """Attach ``observer`` to every MoE layer for the duration of the block (see docs/architecture.md)."""
    layers = moe_layers(model)
    for m in layers:
        if m.observer is not None:
            raise RuntimeError(f"MoE layer {m.layer} already has an observer attached")
        m.observer = observer
    try:
        yield observer
    finally:
        for m in layers:
            m.observer = None
