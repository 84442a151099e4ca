"""TrainConfig: every knob of ``python -m mxq.train``, saved verbatim into ``training_log.json``.

The defaults are the shipped model's run (``mxq/assets/tiny``, chosen by ``python -m mxq.train.select``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    out_dir: str = "runs/tiny"
    preset: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"num_hidden_layers": 1} in tests
    seed: int = 0
    seq_len: int = 512
    batch_size: int = 64                 # sequences per step, a multiple of the 4 domains
    steps: int = 1600                    # total optimizer steps, QAT steps included
    warmup_steps: int = 200
    lr: float = 3e-3                     # peak AdamW learning rate
    min_lr_ratio: float = 0.1            # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1            # on matrices and embeddings; not on biases, norms, sinks
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    aux_coef: float = 0.01               # load-balancing loss weight (Switch Transformer's 1e-2)
    dropout: float = 0.2                 # training-only dropout on embeddings and residual branches
    qat_steps: int = 160                 # final steps with MXFP4 fake-quantised experts (0 = none)
    log_every: int = 25
    eval_every: int = 250
    eval_windows: int = 32               # fixed evaluation windows per domain
    exclude_calib: bool = True           # keep the calib slice out of training (it is the validation set)
    max_chars: int | None = None         # truncate each domain's text (smoke tests)
    device: str = "auto"                 # "auto": cuda if available
    time_limit_s: float | None = None    # safety stop: end training (then evaluate, save) after this long
    save: bool = True                    # write the MXFP4 checkpoint + tokenizer + log to out_dir

    def __post_init__(self) -> None:
        if self.qat_steps > self.steps:
            raise ValueError(f"qat_steps {self.qat_steps} exceeds steps {self.steps}")
        if self.batch_size % 4:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of 4 (equal domain mixing)")
