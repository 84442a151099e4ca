"""Weight sources for the exporters: a loaded model, or a checkpoint folder read lazily.

One interface (``config``, ``tokenizer_dir``, ``dense(hf_name)``, ``linear(hf_name)``,
``expert(layer, kind, e)``, ``formats(layer)``) lets the same tensor streams write an export from a model
in memory (after ``apply_``) or straight from a checkpoint on disk (``export_checkpoint``,
``mxq.dequantize``), tensor by tensor. A checkpoint source opens each file only for the tensors it is
reading, so host memory holds what is being converted, not the whole checkpoint's mapped pages
(dequantizing a whole gpt-oss to bf16 in memory is where other tools run out of memory:
huggingface/transformers#43696).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from ..formats import Packed
from ..io.mxq_layout import MANIFEST, MxqSource
from ..io.reader import _Source, open_checkpoint, resolve_source
from ..io.safetensors_io import CheckpointError

MXFP4_META = {"axis": 1, "block": 32}


class WeightSource(Protocol):
    config: object
    tokenizer_dir: Path | None

    def dense(self, name: str) -> torch.Tensor: ...              # HF name; packed weights come dequantized
    def linear(self, name: str) -> Packed | None: ...            # packed attention projection / lm_head, if any
    def expert(self, layer: int, kind: str, e: int) -> Packed: ...
    def formats(self, layer: int) -> list[str]: ...


class ModelSource:
    """A loaded mxq model (usually after ``apply_``)."""

    RENAME = {"mlp.experts.gate_up_proj_bias": "mlp.experts.gate_up_bias",
              "mlp.experts.down_proj_bias": "mlp.experts.down_bias"}

    def __init__(self, model, tokenizer_dir: str | Path | None = None):
        self.model, self.config = model, model.config
        tok = tokenizer_dir or model.source
        self.tokenizer_dir = Path(tok) if tok else None

    def _attr(self, name: str) -> str:
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            return f"layers.{i}.{self.RENAME.get(rest, rest)}"
        return name.removeprefix("model.")

    def dense(self, name: str) -> torch.Tensor:
        return self.model.get_parameter(self._attr(name)).detach()

    def linear(self, name: str) -> Packed | None:
        return getattr(self.model.get_submodule(self._attr(name).rpartition(".")[0]), "_mxq_packed", None)

    def expert(self, layer: int, kind: str, e: int) -> Packed:
        return self.model.layers[layer].mlp.experts.packed(kind, e)

    def formats(self, layer: int) -> list[str]:
        return list(self.model.layers[layer].mlp.experts.formats())


class _OneShotSource(_Source):
    """The reader's name mapping (HF and original layouts) without keeping file handles open."""

    def __init__(self, ckpt):   # deliberately not calling _Source.__init__ (it opens every file for good)
        self.ckpt, self.handles = ckpt, {}
        self.q = ckpt.config.num_attention_heads * ckpt.config.head_dim
        self.kv = ckpt.config.num_key_value_heads * ckpt.config.head_dim

    def raw(self, name: str) -> torch.Tensor:
        info = self.ckpt.tensors[name]
        try:
            with safe_open(str(info.file), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r}: {e}") from None


class CheckpointSource:
    """A published-layout checkpoint (HF or original/), MXFP4 or bf16 experts, read lazily."""

    HF = {"gate_up": "gate_up_proj", "down": "down_proj"}

    def __init__(self, folder: str | Path):
        self.ckpt = open_checkpoint(folder)
        self.config = self.ckpt.config
        self.src = _OneShotSource(self.ckpt)
        base = self.ckpt.folder
        self.tokenizer_dir = base.parent if self.ckpt.layout == "original" else base
        self._stack: tuple[tuple[int, str], dict[str, torch.Tensor]] | None = None

    def dense(self, name: str) -> torch.Tensor:
        return self.src.get(name)

    def linear(self, name: str) -> Packed | None:
        return None

    def _stacked(self, layer: int, kind: str) -> dict[str, torch.Tensor]:
        """One layer's stacked expert tensors, kept until another (layer, kind) is asked for."""
        key = (layer, kind)
        if self._stack is None or self._stack[0] != key:
            self._stack = None                                   # release the previous mapping first
            p = f"model.layers.{layer}.mlp.experts.{self.HF[kind]}"
            if self.ckpt.experts == "mxfp4":
                t = {"blocks": self.src.get(p + "_blocks"), "scales": self.src.get(p + "_scales")}
            else:
                t = {"weight": self.src.get(p)}                  # [E, in, out]
            self._stack = (key, t)
        return self._stack[1]

    def expert(self, layer: int, kind: str, e: int) -> Packed:
        t = self._stacked(layer, kind)
        H, I = self.config.hidden_size, self.config.intermediate_size
        shape = (2 * I, H) if kind == "gate_up" else (H, I)
        if self.ckpt.experts == "mxfp4":
            return Packed("mxfp4", {"blocks": t["blocks"][e], "scales": t["scales"][e]}, shape, dict(MXFP4_META))
        return Packed("bf16", {"weight": t["weight"][e].t().contiguous()}, shape, {"axis": 1})

    def formats(self, layer: int) -> list[str]:
        return [self.ckpt.experts] * self.config.num_local_experts


def open_source(source: str | Path) -> WeightSource:
    """The right lazy source for a folder: mxq layout (manifest present) or a published layout."""
    folder = resolve_source(source)
    if (folder / MANIFEST).exists():
        return MxqSource(folder)
    return CheckpointSource(folder)
