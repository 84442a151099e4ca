"""Expert weights of one MoE layer, kept packed in whatever format each expert is stored in.

Two storages share one interface (``expert_forward``):
* ``PackedExperts``: each expert's gate_up [2I, H] and down [H, I] matrices are ``Packed`` objects of any
  registered format (a mixed-precision plan gives each expert its own). A checkpoint's stacked MXFP4
  tensors [E, ...] are held once and each expert's ``Packed`` is a view into them, so loading never copies
  or expands the experts.
* ``DenseExperts``: trainable parameters [E, 2I, H] / [E, H, I] (training the embedded model).
Orientation is the original OpenAI one, [out, in], matching ``*_blocks`` and OpenAI's ``mlp1_weight``
[E, 2I, H] (openai/gpt-oss ``gpt_oss/torch/weights.py``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..formats import Packed, get_format


def clamped_swiglu(a: Tensor, alpha: float, limit: float) -> Tensor:
    """GPT-OSS activation: interleaved gate (even) / up (odd), clamped, ``(up + 1) * glu``.

    As openai/gpt-oss ``gpt_oss/torch/model.py::swiglu`` and transformers ``GptOssExperts._apply_gate``.
    """
    g, u = a[..., 0::2], a[..., 1::2]
    g = g.clamp(max=limit)
    u = u.clamp(min=-limit, max=limit)
    return (u + 1) * (g * torch.sigmoid(alpha * g))


class _ExpertsBase(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int, alpha: float, limit: float):
        super().__init__()
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.alpha, self.limit = alpha, limit
        self.gate_up_bias = nn.Parameter(torch.zeros(num_experts, 2 * intermediate))  # [E, 2I]
        self.down_bias = nn.Parameter(torch.zeros(num_experts, hidden))               # [E, H]

    def gate_up_matmul(self, e: int, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def down_matmul(self, e: int, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        """x [n, H] -> f_e(x) [n, H]: the expert output including the down bias, before routing weight."""
        a = self.gate_up_matmul(e, x) + self.gate_up_bias[e].to(x.dtype)            # [n, 2I]
        y = clamped_swiglu(a, self.alpha, self.limit)                                # [n, I]
        return self.down_matmul(e, y) + self.down_bias[e].to(x.dtype)               # [n, H]


class PackedExperts(_ExpertsBase):
    """Experts held in packed formats; ``gate_up[e]`` / ``down[e]`` give each expert's ``Packed``."""

    KINDS = ("gate_up", "down")

    def __init__(self, num_experts: int, hidden: int, intermediate: int, alpha: float, limit: float):
        super().__init__(num_experts, hidden, intermediate, alpha, limit)
        self.gate_up_bias.requires_grad_(False)
        self.down_bias.requires_grad_(False)
        # per kind, per expert: (format, logical shape, meta, {tensor name: (buffer name, index or None)})
        self._spec: dict[str, list[Any]] = {k: [None] * num_experts for k in self.KINDS}

    def _shape(self, kind: str) -> tuple[int, int]:
        return (2 * self.intermediate, self.hidden) if kind == "gate_up" else (self.hidden, self.intermediate)

    def set_stacked(self, kind: str, fmt: str, tensors: dict[str, Tensor], meta: dict | None = None) -> None:
        """Hold [E, ...] tensors (e.g. a checkpoint's ``*_blocks``/``*_scales``) once; experts are views."""
        refs = {}
        for name, t in tensors.items():
            buf = f"{kind}_{name}"
            self.register_buffer(buf, t)
            refs[name] = (buf, True)
        for e in range(self.num_experts):
            self._spec[kind][e] = (fmt, self._shape(kind), dict(meta or {}), refs)

    def set_expert(self, kind: str, e: int, p: Packed) -> None:
        """Give expert ``e`` its own packed tensors in any format (mixed precision within a layer)."""
        if tuple(p.shape) != self._shape(kind):
            raise ValueError(f"expert {e} {kind}: packed shape {p.shape} != expected {self._shape(kind)}")
        refs = {}
        for name, t in p.tensors.items():
            buf = f"{kind}_{e}_{name}"
            self.register_buffer(buf, t)
            refs[name] = (buf, False)
        self._spec[kind][e] = (p.format, tuple(p.shape), dict(p.meta), refs)

    def packed(self, kind: str, e: int) -> Packed:
        spec = self._spec[kind][e]
        if spec is None:
            raise RuntimeError(f"expert {e} has no {kind} weight")
        fmt, shape, meta, refs = spec
        tensors = {n: (getattr(self, b)[e] if stacked else getattr(self, b)) for n, (b, stacked) in refs.items()}
        return Packed(fmt, tensors, shape, meta)

    @property
    def gate_up(self) -> list[Packed]:
        return [self.packed("gate_up", e) for e in range(self.num_experts)]

    @property
    def down(self) -> list[Packed]:
        return [self.packed("down", e) for e in range(self.num_experts)]

    def formats(self) -> list[str]:
        return [self._spec["gate_up"][e][0] for e in range(self.num_experts)]

    def gate_up_matmul(self, e: int, x: Tensor) -> Tensor:
        p = self.packed("gate_up", e)
        return get_format(p.format).matmul(x, p)

    def down_matmul(self, e: int, y: Tensor) -> Tensor:
        p = self.packed("down", e)
        return get_format(p.format).matmul(y, p)


class DenseExperts(_ExpertsBase):
    """Trainable dense experts: gate_up_weight [E, 2I, H], down_weight [E, H, I]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, alpha: float, limit: float):
        super().__init__(num_experts, hidden, intermediate, alpha, limit)
        self.gate_up_weight = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_weight = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def gate_up_matmul(self, e: int, x: Tensor) -> Tensor:
        return x @ self.gate_up_weight[e].to(x.dtype).t()

    def down_matmul(self, e: int, y: Tensor) -> Tensor:
        return y @ self.down_weight[e].to(y.dtype).t()

    def formats(self) -> list[str]:
        return ["dense"] * self.num_experts
