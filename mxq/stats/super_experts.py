"""Super experts (Su et al., "Unveiling Super Experts in Mixture-of-Experts LLMs", arXiv 2507.23279).

A few experts emit rare, extreme outliers in their down_proj output; those outliers make the massive
residual activations that attention sinks rely on, and pruning as few as three of them breaks a model.
Criterion of the paper's public profiling code: expert (l, e) is super when its
maximum |f_e(x)| over calibration tokens and channels is above the 99.5th percentile of all experts'
maxima AND above 1/10 of the largest maximum, considering only the first 75% of layers. All three
numbers are configurable (``recipe.super_experts``); uncalibrated experts have no maximum and are skipped.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

log = logging.getLogger("mxq.stats")


@dataclass(frozen=True)
class SuperExpertConfig:
    percentile: float = 99.5        # of all considered experts' max activations
    ratio: float = 0.1              # ... and above ratio * the largest max activation
    layers_fraction: float = 0.75   # layers l < layers_fraction * L are considered

    def __post_init__(self) -> None:
        if not 0.0 <= self.percentile <= 100.0:
            raise ValueError(f"super_experts.percentile must be in [0, 100], got {self.percentile}")
        if not 0.0 < self.layers_fraction <= 1.0:
            raise ValueError(f"super_experts.layers_fraction must be in (0, 1], got {self.layers_fraction}")
        if self.ratio < 0.0:
            raise ValueError(f"super_experts.ratio must be >= 0, got {self.ratio}")

    @classmethod
    def from_cfg(cls, cfg: Any) -> "SuperExpertConfig":
        """None/True: defaults; a mapping: its known keys (other keys belong to planners and are left)."""
        if isinstance(cfg, SuperExpertConfig):
            return cfg
        if cfg is None or cfg is True:
            return cls()
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        if not isinstance(cfg, Mapping):
            log.info("super_experts=%r is not a mapping of detection settings; using the defaults", cfg)
            return cls()
        return cls(**{k: float(cfg[k]) for k in ("percentile", "ratio", "layers_fraction") if k in cfg})

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def num_layers(self, total: int) -> int:
        """How many leading layers are considered: layers with index < fraction * total."""
        return max(1, min(total, math.ceil(self.layers_fraction * total - 1e-9)))


def find_super_experts(max_act: Tensor, uncalibrated: Tensor,
                       cfg: SuperExpertConfig) -> tuple[list[tuple[int, int]], float]:
    """max_act [L, E], uncalibrated [L, E] -> ([(layer, expert)] sorted by layer/expert, threshold)."""
    n = cfg.num_layers(max_act.shape[0])
    m = max_act[:n].to(torch.float64)
    ok = ~uncalibrated[:n] & torch.isfinite(m)
    vals = m[ok]
    if vals.numel() == 0:
        return [], float("nan")
    q = torch.quantile(vals, cfg.percentile / 100.0).item()  # linear interpolation, as numpy.percentile
    thr = max(q, cfg.ratio * vals.max().item())
    hits = torch.nonzero(ok & (m > thr)).tolist()
    return [(int(layer), int(e)) for layer, e in hits], float(thr)
