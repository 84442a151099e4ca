"""Confidence intervals of evaluation metrics from per-unit values (documents, token blocks, repeats).

Every metric mxq reports is a *ratio* over evaluation units i (a document, a block of scored tokens, a
task item):

    value = f( sum_i num_i / sum_i den_i )

with f one of ``TRANSFORMS``: perplexity = exp(sum NLL / tokens); KL mean = sum KL / tokens; accuracy =
mean of 0/1 (den = 1); lm-eval's ``word_perplexity`` = exp(-sum loglik / sum words); ``bits_per_byte`` =
(-sum loglik / sum bytes) / ln 2. Keeping (num, den) per unit instead of one number lets the interval
resample units -- whole documents or blocks of consecutive tokens, never single tokens, whose losses are
correlated -- and the point estimate is exactly the reported metric.

Intervals of one run: nonparametric bootstrap over units, BCa (Efron & Tibshirani, "An Introduction to the
Bootstrap", 1993, ch. 14) through ``scipy.stats.bootstrap`` with a fixed seed; percentile when BCa is
undefined (e.g. every unit equal), a zero-width interval when every resample gives the same value.
Accuracies (0/1 per item) get the Wilson score interval instead (``interval``).

Paired comparisons of two runs on the *same* units (``paired_difference``): delta = value_a - value_b,
its interval from resampling units jointly (the same units drawn for both runs, so the between-unit
variance cancels; Koehn, "Statistical Significance Tests for Machine Translation Evaluation", EMNLP 2004),
percentile method, and the two-sided p-value that inverts that interval (the achieved significance level of
Efron & Tibshirani 1993, sec. 15.4 and 16.4): p = min(1, 2 min((1 + #{delta* <= 0}), (1 + #{delta* >= 0})) /
(B + 1)). Interval and p-value thus agree: the interval excludes 0 exactly when p < 1 - confidence (up to
the +1 of the finite-sample correction). A difference whose interval contains 0 is reported as inside
the noise.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda x: x,
    "exp": np.exp,                                  # mean NLL -> perplexity
    "bits": lambda x: x / math.log(2),              # nats -> bits (lm-eval's bits_per_byte)
}


@dataclass(frozen=True)
class Settings:
    """How intervals are computed; stored in metrics.json beside them so a reader can redo them."""
    confidence: float = 0.95
    n_resamples: int = 2000
    seed: int = 0
    method: str = "BCa"             # scipy.stats.bootstrap method of a run's own intervals: BCa | percentile | basic

    @classmethod
    def from_cfg(cls, cfg: dict[str, Any] | None) -> Settings:
        cfg = cfg or {}
        out = cls(**{k: cfg[k] for k in ("confidence", "n_resamples", "seed", "method") if k in cfg})
        if not 0 < out.confidence < 1:
            raise ValueError(f"intervals.confidence must lie in (0, 1), got {out.confidence}")
        if out.n_resamples < 100:
            raise ValueError(f"intervals.n_resamples must be >= 100, got {out.n_resamples}")
        return out

    def describe(self) -> dict[str, Any]:
        return {"confidence": self.confidence, "n_resamples": self.n_resamples, "seed": self.seed,
                "method": f"bootstrap over units ({self.method}, scipy.stats.bootstrap); accuracies (0/1 per item): "
                          "Wilson score interval; paired differences: percentile bootstrap over the same units"}


@dataclass(frozen=True)
class Units:
    """Per-unit numerator and denominator of one metric: value = f(sum num / sum den)."""
    num: np.ndarray                  # [n] float64
    den: np.ndarray                  # [n] float64 (ones for a plain mean)
    transform: str = "identity"
    ids: tuple[str, ...] = field(default=())     # unit names, to check that two runs saw the same units

    def __post_init__(self) -> None:
        num, den = np.asarray(self.num, dtype=np.float64), np.asarray(self.den, dtype=np.float64)
        object.__setattr__(self, "num", num.reshape(-1))
        object.__setattr__(self, "den", den.reshape(-1))
        if self.num.shape != self.den.shape:
            raise ValueError(f"num {self.num.shape} and den {self.den.shape} differ in length")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}; known: {sorted(TRANSFORMS)}")
        if self.ids and len(self.ids) != len(self.num):
            raise ValueError(f"{len(self.ids)} unit ids for {len(self.num)} units")

    @classmethod
    def mean(cls, values: Sequence[float], ids: Sequence[str] = ()) -> Units:
        v = np.asarray(values, dtype=np.float64)
        return cls(v, np.ones_like(v), "identity", tuple(ids))

    def __len__(self) -> int:
        return int(self.num.size)

    def value(self) -> float:
        d = self.den.sum()
        return float(TRANSFORMS[self.transform](self.num.sum() / d)) if d else math.nan

    def to_json(self) -> dict[str, Any]:
        den = None if np.all(self.den == 1) else self.den.tolist()
        return {"transform": self.transform, "num": self.num.tolist(), "den": den}

    @classmethod
    def from_json(cls, d: dict[str, Any], ids: Sequence[str] = ()) -> Units:
        num = np.asarray(d["num"], dtype=np.float64)
        den = np.ones_like(num) if d.get("den") is None else np.asarray(d["den"], dtype=np.float64)
        return cls(num, den, d.get("transform", "identity"), tuple(ids))


def _ratio(transform: str) -> Callable[..., np.ndarray]:
    f = TRANSFORMS[transform]

    def stat(num: np.ndarray, den: np.ndarray, axis: int = -1) -> np.ndarray:
        return f(num.sum(axis=axis) / den.sum(axis=axis))

    return stat


def _paired_ratio(ta: str, tb: str) -> Callable[..., np.ndarray]:
    fa, fb = _ratio(ta), _ratio(tb)

    def stat(na: np.ndarray, da: np.ndarray, nb: np.ndarray, db: np.ndarray, axis: int = -1) -> np.ndarray:
        return fa(na, da, axis) - fb(nb, db, axis)

    return stat


def _bootstrap(data: tuple[np.ndarray, ...], stat: Callable[..., np.ndarray], s: Settings):
    """scipy's paired bootstrap; BCa falls back to percentile where BCa is undefined (NaN bounds)."""
    from scipy.stats import bootstrap

    for method in dict.fromkeys((s.method, "percentile")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")         # DegenerateDataWarning / RuntimeWarning: handled below
            res = bootstrap(data, stat, paired=True, vectorized=True, n_resamples=s.n_resamples,
                            confidence_level=s.confidence, method=method, random_state=s.seed)
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (math.isnan(lo) or math.isnan(hi)):
            return lo, hi, res.bootstrap_distribution
    dist = res.bootstrap_distribution
    if np.all(dist == dist.flat[0]):                  # every resample identical: a zero-width interval
        return float(dist.flat[0]), float(dist.flat[0]), dist
    return math.nan, math.nan, dist


def is_binary(u: Units) -> bool:
    """A plain mean of 0/1 values (an accuracy): the binomial interval applies."""
    return u.transform == "identity" and bool(np.all(u.den == 1)) and bool(np.all((u.num == 0) | (u.num == 1)))


def interval(u: Units, s: Settings | None = None) -> tuple[float, float] | None:
    """The ``s.confidence`` interval of ``u.value()``; None with fewer than 2 units.

    Accuracies (0/1 per document) get the Wilson score interval (Wilson, JASA 1927; via
    ``scipy.stats.binomtest``), which stays honest at 0 or n correct, where a bootstrap collapses to a point;
    every other metric the bootstrap over units.
    """
    s = s or Settings()
    if len(u) < 2:
        return None
    if is_binary(u):
        from scipy.stats import binomtest

        ci = binomtest(int(u.num.sum()), len(u)).proportion_ci(confidence_level=s.confidence, method="wilson")
        return float(ci.low), float(ci.high)
    lo, hi, _ = _bootstrap((u.num, u.den), _ratio(u.transform), s)
    return lo, hi


@dataclass(frozen=True)
class Comparison:
    """value_a - value_b on the same units, with its paired interval and p-value."""
    a: float
    b: float
    delta: float
    ci_low: float
    ci_high: float
    p: float
    n: int
    confidence: float

    @property
    def significant(self) -> bool:
        """True when the interval excludes 0 (a difference beyond the noise at this confidence)."""
        return not (math.isnan(self.ci_low) or math.isnan(self.ci_high)) and (self.ci_low > 0 or self.ci_high < 0)

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "delta": self.delta, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "p": self.p, "n": self.n, "confidence": self.confidence, "significant": self.significant}


def same_units(a: Units, b: Units) -> str | None:
    """Why ``a`` and ``b`` cannot be paired (None when they can): unit count, ids and denominators must match."""
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} units"
    if a.ids and b.ids and a.ids != b.ids:
        k = next(i for i, (x, y) in enumerate(zip(a.ids, b.ids)) if x != y)
        return f"unit {k} differs ({a.ids[k]!r} vs {b.ids[k]!r})"
    if not np.allclose(a.den, b.den, rtol=1e-9, atol=0):
        return "the units' denominators (tokens, words or bytes) differ: not the same text"
    return None


def paired_difference(a: Units, b: Units, s: Settings | None = None) -> Comparison:
    """``a.value() - b.value()`` with a paired bootstrap interval and p-value (module docstring)."""
    s = s or Settings()
    why = same_units(a, b)
    if why:
        raise ValueError(f"cannot pair the two runs: {why}")
    va, vb = a.value(), b.value()
    delta = va - vb
    if len(a) < 2:
        return Comparison(va, vb, delta, math.nan, math.nan, math.nan, len(a), s.confidence)
    pct = Settings(s.confidence, s.n_resamples, s.seed, "percentile")      # p-value inverts this interval
    lo, hi, dist = _bootstrap((a.num, a.den, b.num, b.den), _paired_ratio(a.transform, b.transform), pct)
    dist = np.asarray(dist, dtype=np.float64).reshape(-1)
    tail = min(np.count_nonzero(dist <= 0), np.count_nonzero(dist >= 0))
    p = float(min(1.0, 2.0 * (1 + tail) / (dist.size + 1)))
    return Comparison(va, vb, delta, lo, hi, p, len(a), s.confidence)


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Spread of repeated measurements (timing repeats, calibration seeds): n, mean, std (ddof 1), min,
    median, max. Repeats are too few and too dependent for a bootstrap; the range is the honest summary."""
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))],
                   dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "median": None, "max": None}
    return {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None,
            "min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}
