"""Putting a loaded tensor into a model built on the meta device (used by every checkpoint reader)."""
from __future__ import annotations

import torch


def set_param(module: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    """Replace the parameter at dotted path ``name`` under ``module`` by ``t`` (frozen, no copy)."""
    mod_path, _, attr = name.rpartition(".")
    mod = module.get_submodule(mod_path) if mod_path else module
    mod._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
