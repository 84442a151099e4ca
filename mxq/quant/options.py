"""``recipe.quant.method`` and the ``recipe.quant.gptq.*`` options: defaults, and validation before any work.

Every option is an ablation switch of the calibrated quantizer (``mxq.quant.calibrate``):

* ``block_size`` (128): columns per lazy batch update (GPTQ, arXiv 2210.17323, section 4).
* ``damp`` (0.01): diagonal damping as a fraction of mean(diag H) (GPTQ section 4).
* ``act_order`` (true): columns by decreasing diag(H), every group's scale chosen up front ("static groups").
* ``gate_weighted`` (false): each token's Hessian contribution weighted by its routing weight
  (MoEQuant's affinity-guided quantization, arXiv 2505.03804).
* ``mse_clip`` (false), ``mse_steps`` (10), ``mse_min_shrink`` (0.7): choose each group's scale by a
  diag(H)-weighted error search over ``mse_steps`` shrink factors from 1 down to ``mse_min_shrink``; it
  applies to the GPTQ scales and to the RTN fallback.
* ``min_tokens`` (32): an expert that received fewer routed calibration tokens is not calibrated (a Hessian
  of a handful of tokens over-fits them) but quantized by ``fallback`` and listed in calibration.json.
* ``fallback`` (rtn): ``rtn`` (the format's own quantizer) or ``rtn_mse`` (the format's rounding with the
  MSE scale search, unweighted).
* ``balance_tokens`` (0 = off): expert-balanced calibration; an expert routed fewer tokens gets the
  calibration tokens with its highest router logits added up to this count (MoEQuant's expert-balanced
  self-sampling, arXiv 2505.03804), reported as ``forced_tokens``.
* ``expert_batch`` (8): experts quantized together (memory: see docs in ``mxq.quant.calibrate``).
* ``report_condition`` (true): eigenvalues of every Hessian for calibration.json (rank, condition number).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..plan.plan import PRUNE, PlanError

METHODS = ("rtn", "gptq")
FALLBACKS = ("rtn", "rtn_mse")
GPTQ_DEFAULTS: dict[str, Any] = {
    "block_size": 128, "damp": 0.01, "act_order": True, "gate_weighted": False, "mse_clip": False,
    "mse_steps": 10, "mse_min_shrink": 0.7, "min_tokens": 32, "fallback": "rtn", "expert_batch": 8,
    "report_condition": True, "balance_tokens": 0,
}


@dataclass(frozen=True)
class GPTQOptions:
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    gate_weighted: bool = False
    mse_clip: bool = False
    mse_steps: int = 10
    mse_min_shrink: float = 0.7
    min_tokens: int = 32
    fallback: str = "rtn"
    expert_batch: int = 8
    report_condition: bool = True
    balance_tokens: int = 0

    @property
    def shrink(self) -> tuple[float, ...]:
        """The MSE search's shrink factors below 1 (the plain rule, factor 1, is always tried first)."""
        if not self.mse_clip:
            return ()
        n = self.mse_steps
        return tuple(1.0 - (1.0 - self.mse_min_shrink) * i / (n - 1) for i in range(1, n))


def _fail(option: str, value: Any, why: str) -> None:
    raise PlanError(f"recipe.quant.{option}={value!r}: {why}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def gptq_options(quant: dict[str, Any]) -> GPTQOptions:
    """Validated ``GPTQOptions`` from ``recipe.quant`` (defaults filled in; errors name the option)."""
    given = quant.get("gptq") or {}
    if not isinstance(given, dict):
        _fail("gptq", given, "must be a mapping of options")
    unknown = sorted(set(given) - set(GPTQ_DEFAULTS))
    if unknown:
        _fail(f"gptq.{unknown[0]}", given[unknown[0]], f"unknown option; known: {', '.join(GPTQ_DEFAULTS)}")
    o = {**GPTQ_DEFAULTS, **given}
    for key in ("block_size", "mse_steps", "expert_batch"):
        if not _is_int(o[key]) or o[key] < (2 if key == "mse_steps" else 1):
            _fail(f"gptq.{key}", o[key], f"must be an integer >= {2 if key == 'mse_steps' else 1}")
    if not _is_int(o["balance_tokens"]) or o["balance_tokens"] < 0:
        _fail("gptq.balance_tokens", o["balance_tokens"], "must be an integer >= 0 (0: off)")
    if not _is_int(o["min_tokens"]) or o["min_tokens"] < 1:
        _fail("gptq.min_tokens", o["min_tokens"], "must be an integer >= 1 (tokens an expert needs to be calibrated)")
    if not _is_num(o["damp"]) or not 0.0 < o["damp"] <= 1.0:
        _fail("gptq.damp", o["damp"], "must be a number in (0, 1] (fraction of the mean Hessian diagonal)")
    if not _is_num(o["mse_min_shrink"]) or not 0.0 < o["mse_min_shrink"] < 1.0:
        _fail("gptq.mse_min_shrink", o["mse_min_shrink"], "must be a number in (0, 1)")
    for key in ("act_order", "gate_weighted", "mse_clip", "report_condition"):
        if not isinstance(o[key], bool):
            _fail(f"gptq.{key}", o[key], "must be true or false")
    if o["fallback"] not in FALLBACKS:
        _fail("gptq.fallback", o["fallback"], f"choose from {', '.join(FALLBACKS)}")
    return GPTQOptions(**{k: (float(v) if k in ("damp", "mse_min_shrink") else v) for k, v in o.items()})


def validate_quant(r: dict[str, Any], uses: tuple[str, ...]) -> None:
    """Check ``recipe.quant.method`` and its options against the planner; raises ``PlanError``."""
    from .grid import GRIDS

    q = r["quant"]
    method = q.get("method", "rtn")
    if method not in METHODS:
        _fail("method", method, f"unknown method; choose from {', '.join(METHODS)}")
    if method == "rtn":
        return
    gptq_options(q)
    quantizes = "quant" in uses or "mixed" in uses
    fmt = q.get("format")
    if not quantizes or (fmt in ("keep", None) and "mixed" not in uses):
        _fail("method", method, f"planner={r.get('planner')} with quant.format={fmt} re-packs no expert, so there "
              "is nothing to calibrate; use planner=uniform or prune_then_quant with a format, or planner=mixed")
    formats = list(r["mixed"]["menu"]) if (fmt == "mixed" or ("mixed" in uses and "quant" not in uses)) else [fmt]
    for f in formats:
        if f not in GRIDS and f not in ("bf16", PRUNE):
            _fail("method", method, f"format {f!r} has no calibrated grid; grids exist for {', '.join(sorted(GRIDS))}")
