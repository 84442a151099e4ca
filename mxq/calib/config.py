"""The calibration config: what text, how many windows of what length, from which seed.

Why a dataclass in front of the Hydra group: the same fields reach ``build_calibration`` from Hydra
(``recipes/calib/*.yaml``), from Python and from the benchmark, and every one of them must be checked
before a model is loaded, with an error that names the bad field.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

SOURCES = ("corpus", "files", "hf")


class CalibError(ValueError):
    """A calibration config or data source that cannot produce the requested sequences."""


@dataclass(frozen=True)
class CalibConfig:
    source: str = "corpus"                  # corpus | files | hf
    num_sequences: int = 64                 # N windows in all, shared equally between domains
    seq_len: int = 256                      # T tokens per window
    seed: int = 0
    domains: str | tuple[str, ...] = "all"  # corpus: "all" or a list of corpus domains; files/hf: ignored
    split: str = "calib"                    # corpus split (train/heldout/calib) or HF split
    paths: tuple[str, ...] = ()             # files: .txt / .jsonl files; domain = file stem
    text_field: str = "text"                # files (.jsonl) and hf: the field holding the text
    dataset: str | None = None              # hf: dataset name (or local dataset folder)
    subset: str | None = None               # hf: configuration name (load_dataset(name, subset))
    max_chars: int | None = None            # hf: characters read per domain (None: 16 per needed token)
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys are refused, this stays empty

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise CalibError(f"calib.source={self.source!r}; choose one of {', '.join(SOURCES)}")
        if self.num_sequences < 1 or self.seq_len < 2:
            raise CalibError(f"calib needs num_sequences >= 1 and seq_len >= 2, got "
                             f"{self.num_sequences} x {self.seq_len}")
        if self.source == "files" and not self.paths:
            raise CalibError("calib.source=files needs calib.paths (a list of .txt/.jsonl files)")
        if self.source == "hf" and not self.dataset:
            raise CalibError("calib.source=hf needs calib.dataset (a Hugging Face dataset name)")
        if self.extra:
            raise CalibError(f"unknown calib keys: {', '.join(sorted(self.extra))}")

    @classmethod
    def from_cfg(cls, cfg: "CalibConfig | Mapping[str, Any] | None") -> "CalibConfig":
        """Accept a CalibConfig, a dict or an omegaconf DictConfig (missing ``???`` values are refused)."""
        if isinstance(cfg, CalibConfig):
            return cfg
        if cfg is None:
            return cls()
        if isinstance(cfg, DictConfig):
            missing = [k for k in cfg if OmegaConf.is_missing(cfg, k)]
            if missing:
                raise CalibError(f"calib config leaves required keys unset (???): {', '.join(missing)}")
            cfg = OmegaConf.to_container(cfg, resolve=True)
        d = dict(cfg)
        known = {f.name for f in fields(cls)} - {"extra"}
        extra = {k: d.pop(k) for k in list(d) if k not in known}
        for key in ("paths", "domains"):
            v = d.get(key)
            if isinstance(v, (list, tuple)):
                d[key] = tuple(str(x) for x in v)
            elif key == "paths" and isinstance(v, str):
                d[key] = (v,)
        for key in ("num_sequences", "seq_len", "seed"):
            if key in d:
                d[key] = int(d[key])
        return cls(**d, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready and canonical (lists, no ``extra``): the part of the cache key that is the config."""
        d = asdict(self)
        d.pop("extra")
        d["paths"] = list(self.paths)
        d["domains"] = self.domains if isinstance(self.domains, str) else list(self.domains)
        return d
