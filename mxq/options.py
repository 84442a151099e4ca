"""Checks of numeric and device options, each error naming the option (command-line flag or config key).

Why one place: an option that is zero, negative or impossible must fail before any work with its own
name in the message, not later as a ZeroDivisionError, a "KV cache full" or an AttributeError from deep
inside torch. ``positive_int``/``positive_float`` are argparse types; ``check_run_options`` runs the
``RUN_CHECKS`` registry over a ``python -m mxq.run`` config.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch


class OptionError(ValueError):
    """A run option with an impossible value; the message starts with the option's name."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the flag in its error)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def _int_at_least(lo: int) -> Callable[[str, Any], None]:
    def check(key: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise OptionError(f"{key}={v!r}: must be an integer >= {lo}")
    return check


def check_device(key: str, v: Any) -> None:
    """``auto``, ``cpu``, or a device torch can use here (``cuda`` needs a visible GPU, ``cuda:N`` N < count)."""
    if v == "auto":
        return
    try:
        dev = torch.device(v)
    except (RuntimeError, TypeError):
        raise OptionError(f"{key}={v!r}: not a torch device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"{key}={v!r}: no CUDA GPU is visible to torch (torch.cuda.is_available() is "
                              "False); use device=cpu or device=auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(f"{key}={v!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise OptionError(f"{key}={v!r}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise OptionError(f"{key}={v!r}: unsupported device type {dev.type!r} (use auto, cpu or cuda)")


def check_skip_beta(key: str, v: Any) -> None:
    """Dynamic expert skipping (``mxq.model.skipping``): ``calibrated`` or a threshold in [0, 1]."""
    if v == "calibrated":
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
        raise OptionError(f"{key}={v!r}: use null (off), a number in [0, 1], or calibrated")


# config key -> check(key, value); keys absent from a config are skipped.
RUN_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "device": check_device,
    "batch_size": _int_at_least(1),
    "seed": _int_at_least(0),
    "generate.max_new_tokens": _int_at_least(0),
    "eval.perplexity.batch_size": _int_at_least(1),
    "eval.lm_eval.batch_size": _int_at_least(1),
    "eval.speed.repeats": _int_at_least(1),
    "skip.beta": check_skip_beta,
}


def check_run_options(cfg: Any) -> None:
    """Run every ``RUN_CHECKS`` entry on ``cfg`` (an OmegaConf config); the first bad option raises."""
    from omegaconf import OmegaConf

    for key, check in RUN_CHECKS.items():
        v = OmegaConf.select(cfg, key, default=None)
        if v is not None:
            check(key, v)
