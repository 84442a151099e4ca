"""One pass over every weight of a loaded model: finite values and plausible magnitudes, before any work.

Why: a NaN in one router row or an MXFP4 scale byte of 0xFF (NaN in E8M0, OCP Microscaling spec v1.0,
section 5.4.1) does not crash anything. Routing statistics turn NaN, the planner picks from them, the export
carries the damage and perplexity comes out NaN. Every tensor is checked here once, and each problem is
reported with its layer, expert and tensor.

Checks, by tensor kind (``PACKED_CHECKS`` is a registry keyed by (format, packed tensor name)):

* every floating tensor (dense parameters, biases, norms, float scales of any format, fp8 codes): no NaN,
  no Inf, and ``|x| <= max_abs`` (default 65504, the largest fp16 value: a trained weight beyond it is
  damage, and it overflows every fp16 runtime);
* MXFP4 ``scales`` (E8M0 bytes): no 0xFF (NaN), and no byte above ``127 + log2(max_abs)``: with such a
  scale every non-zero element of the block exceeds ``max_abs``.

``check_model`` returns the problems; ``require_valid`` raises ``WeightError`` listing them unless the
caller allows damaged weights (research on damaged models), in which case they are only logged.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("mxq.validate")

FP16_MAX = 65504.0
MAX_LISTED = 10            # problems spelled out in an error message (the count covers the rest)


class WeightError(ValueError):
    """A weight with NaN/Inf or an implausible value; the message names layer, expert and tensor."""


@dataclass(frozen=True)
class Problem:
    tensor: str                   # the model's name for it (packed: ``...experts.{e}.{kind} {tensor}``)
    layer: int | None
    expert: int | None
    issue: str                    # e.g. "3 NaN, 0 Inf", "1 scale byte 0xFF (NaN in E8M0)"
    first_index: list[int]

    def __str__(self) -> str:
        where = [f"layer {self.layer}"] if self.layer is not None else []
        where += [f"expert {self.expert}"] if self.expert is not None else []
        return f"{', '.join(where + [self.tensor])}: {self.issue} (first at index {self.first_index})"


def _first(mask: Tensor) -> list[int]:
    return mask.nonzero()[0].tolist()


def float_issues(t: Tensor, max_abs: float) -> tuple[str, Tensor] | None:
    """(description, mask of the bad elements) for a floating tensor, or None when it is clean."""
    if t.numel() == 0:
        return None
    x = t if t.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16) else t.float()
    lo, hi = torch.aminmax(x)                         # NaN propagates: one pass decides the common case
    if bool(torch.isfinite(lo) & torch.isfinite(hi)) and max(-float(lo), float(hi)) <= max_abs:
        return None
    nan, inf = torch.isnan(x), torch.isinf(x)
    big = torch.isfinite(x) & (x.abs() > max_abs)
    parts = [f"{int(nan.sum())} NaN", f"{int(inf.sum())} Inf"]
    if bool(big.any()):
        parts.append(f"{int(big.sum())} beyond |x| <= {max_abs:g} (max {float(x[big].abs().max()):.4g})")
    return ", ".join(parts), nan | inf | big


def e8m0_issues(t: Tensor, max_abs: float) -> tuple[str, Tensor] | None:
    """MXFP4 scale bytes: 0xFF is NaN in E8M0; bytes whose power of two alone exceeds ``max_abs``."""
    if t.numel() == 0:
        return None
    top = 127 + math.ceil(math.log2(max_abs)) if max_abs > 0 else 127
    nan, big = t == 255, (t > top) & (t != 255)
    n_nan, n_big = int(nan.sum()), int(big.sum())
    if not (n_nan or n_big):
        return None
    parts = [f"{n_nan} scale byte(s) 0xFF (NaN in E8M0)"] if n_nan else []
    if n_big:
        parts.append(f"{n_big} scale byte(s) above {top} (2^{top - 127} > {max_abs:g}: implausible for a weight)")
    return ", ".join(parts), nan | big


Check = Callable[[Tensor, float], "tuple[str, Tensor] | None"]
PACKED_CHECKS: dict[tuple[str, str], Check] = {("mxfp4", "scales"): e8m0_issues}


def packed_check(fmt: str, tensor: str, t: Tensor) -> Check | None:
    """The check for one packed tensor: registered, else the float check for floating tensors, else none
    (integer codes such as nibbles cannot be non-finite)."""
    if (fmt, tensor) in PACKED_CHECKS:
        return PACKED_CHECKS[(fmt, tensor)]
    return float_issues if t.is_floating_point() else None


_LAYER = re.compile(r"(?:^|\.)(?:layers|block)\.(\d+)\.")
_PER_EXPERT = re.compile(r"\.mlp\.(?:router\.|experts\.(?:gate_up_bias|down_bias|gate_up_weight|down_weight)$)")


def _buffer_owner(model: torch.nn.Module) -> dict[str, tuple[int, str, str, int | None, str]]:
    """Packed expert buffers: full buffer name -> (layer, kind, format, expert or None if stacked, tensor)."""
    out = {}
    for i, layer in enumerate(getattr(model, "layers", [])):
        ex = layer.mlp.experts
        spec = getattr(ex, "_spec", None)
        if spec is None:
            continue
        for kind, per_e in spec.items():
            for e, s in enumerate(per_e):
                if s is None:
                    continue
                fmt, _, _, refs = s
                for tname, (buf, stacked) in refs.items():
                    out[f"layers.{i}.mlp.experts.{buf}"] = (i, kind, fmt, None if stacked else e, tname)
    return out


def check_model(model: torch.nn.Module, max_abs: float = FP16_MAX) -> tuple[list[Problem], int]:
    """Every parameter and buffer of ``model`` checked once; returns (problems, number of tensors checked)."""
    owners = _buffer_owner(model)
    problems: list[Problem] = []
    n = 0
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta or id(t) in seen:
            continue
        seen.add(id(t))
        m = _LAYER.search(name)
        layer = int(m.group(1)) if m else None
        if name in owners:
            layer, kind, fmt, e, tname = owners[name]
            check = packed_check(fmt, tname, t)
            label = (f"layers.{layer}.mlp.experts.{e}.{kind} ({fmt}) {tname}" if e is not None
                     else f"layers.{layer}.mlp.experts.{kind} ({fmt}, stacked) {tname}")
            stacked = e is None
        elif t.is_floating_point():
            check, label, e, stacked = float_issues, name, None, bool(_PER_EXPERT.search(name))
        else:
            continue
        if check is None:
            continue
        n += 1
        found = check(t.detach(), max_abs)
        if found is None:
            continue
        issue, mask = found
        idx = _first(mask)
        expert = idx[0] if stacked and idx else e
        problems.append(Problem(label, layer, expert, issue, idx))
    return problems, n


_STACKED_FILE = re.compile(r"\.mlp\.(?:router\.|experts\.(?:gate_up_proj|down_proj)|mlp[12]_)|\.gate\.")
_EXPERT_IN_NAME = re.compile(r"\.experts\.(\d+)\.")


def check_checkpoint(folder: str | Path, max_abs: float = FP16_MAX) -> tuple[list[Problem], int]:
    """The same checks on a checkpoint folder's tensors, read one at a time from disk (any layout mxq reads:
    HF, original/, mxq). Used where no model is loaded (``mxq.dequantize``)."""
    from safetensors import safe_open

    from .io.safetensors_io import scan_folder

    folder = Path(folder)
    if not any(folder.glob("*.safetensors")) and (folder / "original").is_dir():
        folder = folder / "original"
    problems: list[Problem] = []
    n = 0
    for name, info in sorted(scan_folder(folder).items()):
        floating = not info.dtype.startswith(("U", "I", "BOOL"))
        e8m0 = info.dtype == "U8" and name.endswith("scales")           # only MXFP4 stores u8 scales
        if not (floating or e8m0):
            continue
        with safe_open(str(info.file), framework="pt") as f:
            t = f.get_tensor(name)
        n += 1
        found = (e8m0_issues if e8m0 else float_issues)(t, max_abs)
        if found is None:
            continue
        issue, mask = found
        idx = _first(mask)
        m, me = _LAYER.search(name), _EXPERT_IN_NAME.search(name)
        expert = int(me.group(1)) if me else (idx[0] if _STACKED_FILE.search(name) and idx else None)
        problems.append(Problem(f"{name} ({info.file.name})", int(m.group(1)) if m else None, expert, issue, idx))
        del t
    return problems, n


def require_valid(model: torch.nn.Module | str | Path, allow: bool = False, max_abs: float = FP16_MAX,
                  option: str | None = "validate.allow_nonfinite=true") -> dict:
    """``check_model`` (or ``check_checkpoint`` for a folder), then raise ``WeightError`` on any problem
    unless ``allow`` (then a warning). ``option`` is what the message tells the user to pass to proceed
    (None: no way to proceed is offered).

    Returns a JSON-ready record for run_meta.json: tensors checked, max_abs, allow flag, problems.
    """
    if isinstance(model, (str, Path)):
        problems, n = check_checkpoint(model, max_abs)
        src = str(model)
    else:
        problems, n = check_model(model, max_abs)
        src = getattr(model, "source", None) or "the model"
    record = {"tensors_checked": n, "max_abs": max_abs, "allow_nonfinite": bool(allow),
              "problems": [asdict(p) | {"message": str(p)} for p in problems]}
    if not problems:
        return record
    listed = "\n  ".join(str(p) for p in problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    head = f"{src}: {len(problems)} damaged weight tensor(s):\n  {listed}{more}"
    if not allow:
        hint = f" For research on damaged models pass {option}." if option else ""
        raise WeightError(head + "\nRefusing to work on them." + hint)
    log.warning("%s\nproceeding because of %s", head, option)
    return record
