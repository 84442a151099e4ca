"""``RouterStats``: what the router and experts did on calibration text, per (layer, expert) and per domain.

This is the one input of every pruning and mixed-precision planner. Scores:
* ``freq``: tokens whose top-k contains e (``freq_fraction`` = freq / tokens, sums to k per layer);
* ``gate_mass``: sum over tokens of g_e(x) (0 for tokens not routed to e);
* ``reap``: mean over routed tokens of g_e(x) * ||f_e(x)||_2 (Lasby et al., REAP, arXiv 2510.13999);
* ``ean``: sum over routed tokens of ||f_e(x)||_2 (expert activation norm, baseline in REAP);
* ``max_act`` / ``max_act_channel``: max over routed tokens (and channels) of |f_e(x)| (Su et al.,
  arXiv 2507.23279), the super-expert criterion;
* ``coselect[l, a, b]``: tokens whose top-k holds both a and b (the diagonal equals ``freq``).
An expert that received no calibration token is ``uncalibrated``: its mean and maxima are NaN (there is
nothing to average), its sums are the true empty sums (0), and it is listed in the JSON summary, so that
"never seen" cannot be mistaken for "unimportant" (a score of 0 would read as the least important expert).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from .. import jsonout
from ..atomic import save_safetensors_atomic, write_atomic
from .measures import entropy, jsd, load_balance, mean_pairwise_jsd
from .super_experts import SuperExpertConfig, find_super_experts

VERSION = 1
EXPERT_KEYS = ("freq", "gate_mass", "reap", "ean", "max_act", "max_act_channel", "coselect", "route_prob",
               "topk_entropy", "uncalibrated")
SCORES = {"reap": "reap", "frequency": "freq", "gate_mass": "gate_mass", "ean": "ean", "max_act": "max_act"}


def finalize(tokens: Tensor, sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """Observer sums of one domain (or all) -> the per-expert tensors of ``EXPERT_KEYS``.

    tokens [L]; sums: freq/gate_mass/reap_sum/ean/prob_sum [L, E], coselect [L, E, E],
    max_act_channel [L, E, H], topk_entropy_sum [L].
    """
    freq = sums["freq"]
    unc = freq == 0                                                                   # [L, E]
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    mac = torch.where(unc[..., None], nan.float(), sums["max_act_channel"])           # [L, E, H]
    return {
        "freq": freq, "gate_mass": sums["gate_mass"], "ean": sums["ean"], "coselect": sums["coselect"],
        "reap": torch.where(unc, nan, sums["reap_sum"] / freq.clamp(min=1)),
        "max_act_channel": mac,
        "max_act": torch.where(unc, nan, mac.amax(dim=-1).to(torch.float64)),
        "route_prob": sums["prob_sum"] / tokens[:, None].clamp(min=1),
        "topk_entropy": sums["topk_entropy_sum"] / tokens.clamp(min=1),
        "uncalibrated": unc,
    }


@dataclass
class RouterStats:
    num_layers: int
    num_experts: int
    top_k: int
    tokens: int                       # valid (non-padding) calibration tokens
    freq: Tensor                      # [L, E] float64 counts
    gate_mass: Tensor                 # [L, E] float64
    reap: Tensor                      # [L, E] float64, NaN when uncalibrated
    ean: Tensor                       # [L, E] float64
    max_act: Tensor                   # [L, E] float64, NaN when uncalibrated
    max_act_channel: Tensor           # [L, E, H] float32, NaN when uncalibrated
    coselect: Tensor                  # [L, E, E] float64
    route_prob: Tensor                # [L, E] mean full-softmax routing probability
    topk_entropy: Tensor              # [L] mean per-token entropy (nats) of the top-k weights
    uncalibrated: Tensor              # [L, E] bool
    super_experts: list[tuple[int, int]] = field(default_factory=list)
    super_threshold: float = float("nan")
    super_config: dict[str, float] = field(default_factory=dict)
    domains: list[str] = field(default_factory=list)
    domain_tokens: dict[str, int] = field(default_factory=dict)
    by_domain: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # name -> EXPERT_KEYS tensors
    calib_config: dict[str, Any] = field(default_factory=dict)
    calib_hash: str = ""
    model_hash: str = ""
    meta: dict[str, Any] = field(default_factory=dict)    # dtype, device, seconds, ...

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_observer(cls, obs: Any, domains: list[str], super_cfg: Any = None, **info: Any) -> "RouterStats":
        """Turn a ``RouterObserver``'s device accumulators ([L, E, D, ...]) into CPU statistics."""
        cpu = {k: getattr(obs, k).cpu() for k in ("tokens", "freq", "gate_mass", "reap_sum", "ean", "prob_sum",
                                                   "topk_entropy_sum", "coselect", "max_act_channel")}

        def part(d: int | None) -> tuple[Tensor, dict[str, Tensor]]:
            def pick(t: Tensor, axis: int, reduce: str = "sum") -> Tensor:
                t = t.movedim(axis, 0)                                                 # domain axis first
                if d is not None:
                    return t[d]
                return t.amax(0) if reduce == "max" else t.sum(0)

            sums = {k: pick(cpu[k], 2) for k in ("freq", "gate_mass", "reap_sum", "ean", "prob_sum")}
            sums["coselect"] = pick(cpu["coselect"], 3)
            sums["max_act_channel"] = pick(cpu["max_act_channel"], 2, "max")
            sums["topk_entropy_sum"] = pick(cpu["topk_entropy_sum"], 1)
            return pick(cpu["tokens"], 1), sums

        tok_all, sums_all = part(None)
        t = finalize(tok_all, sums_all)
        by_domain, dom_tokens = {}, {}
        for i, name in enumerate(domains):
            tok_d, sums_d = part(i)
            by_domain[name] = finalize(tok_d, sums_d)
            dom_tokens[name] = int(tok_d[0].item()) if tok_d.numel() else 0
        L, E = t["freq"].shape
        stats = cls(num_layers=L, num_experts=E, top_k=obs.top_k, tokens=int(tok_all[0].item()) if L else 0,
                    domains=list(domains), domain_tokens=dom_tokens, by_domain=by_domain, **t, **info)
        stats.detect_super_experts(super_cfg)
        return stats

    def detect_super_experts(self, super_cfg: Any = None) -> None:
        """(Re)apply the Su et al. criterion with ``super_cfg`` (cheap: uses the stored maxima)."""
        cfg = SuperExpertConfig.from_cfg(super_cfg)
        self.super_experts, self.super_threshold = find_super_experts(self.max_act, self.uncalibrated, cfg)
        self.super_config = cfg.to_dict()

    # ---- derived ------------------------------------------------------------------------------------
    @property
    def freq_fraction(self) -> Tensor:
        """[L, E] fraction of tokens whose top-k contains e."""
        return self.freq / max(self.tokens, 1)

    @property
    def route_entropy(self) -> Tensor:
        """[L] entropy (nats) of the average routing distribution (see ``measures``)."""
        return entropy(self.route_prob)

    def balance(self) -> dict[str, Tensor]:
        """Per layer: cv and max/mean of the selection counts."""
        cv, mx = load_balance(self.freq)
        return {"cv": cv, "max_over_mean": mx}

    def domain_jsd(self) -> dict[str, Tensor]:
        """Per layer: generalised JSD between domains' frequency distributions, and mean pairwise JSD."""
        if len(self.domains) < 2:
            nan = torch.full((self.num_layers,), float("nan"), dtype=torch.float64)
            return {"jsd": nan, "mean_pairwise_jsd": nan}
        f = torch.stack([self.by_domain[d]["freq"] for d in self.domains])             # [D, L, E]
        return {"jsd": jsd(f), "mean_pairwise_jsd": mean_pairwise_jsd(f)}

    def score(self, name: str) -> Tensor:
        """[L, E] importance score: reap, frequency, gate_mass, ean (or max_act); NaN where uncalibrated
        for the means/maxima; check ``uncalibrated`` before trusting a 0."""
        if name not in SCORES:
            raise KeyError(f"unknown score {name!r}; choose one of {', '.join(SCORES)}")
        return getattr(self, SCORES[name])

    def uncalibrated_list(self) -> list[list[int]]:
        return [[int(a), int(b)] for a, b in torch.nonzero(self.uncalibrated).tolist()]

    def for_domain(self, name: str) -> "RouterStats":
        """The statistics of one calibration domain as a RouterStats (same scores, balance, report)."""
        if name not in self.by_domain:
            raise KeyError(f"no calibration domain {name!r}; domains: {', '.join(self.domains)}")
        d = RouterStats(num_layers=self.num_layers, num_experts=self.num_experts, top_k=self.top_k,
                        tokens=self.domain_tokens[name], **self.by_domain[name], domains=[name],
                        domain_tokens={name: self.domain_tokens[name]}, calib_config=self.calib_config,
                        calib_hash=self.calib_hash, model_hash=self.model_hash, meta=dict(self.meta))
        d.by_domain = {name: self.by_domain[name]}
        d.detect_super_experts(self.super_config or None)
        return d

    def _layer_figures(self) -> dict[str, list[float | None]]:
        bal = self.balance()
        return {"cv": [_f(x) for x in bal["cv"]], "max_over_mean": [_f(x) for x in bal["max_over_mean"]],
                "route_entropy": [_f(x) for x in self.route_entropy],
                "topk_entropy": [_f(x) for x in self.topk_entropy]}

    # ---- files --------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The JSON side: everything except the tensors, plus per-layer balance figures."""
        bal, js = self.balance(), self.domain_jsd()
        rent, unc = self.route_entropy, self.uncalibrated.sum(dim=-1)
        layers = [{"layer": i, "cv": _f(bal["cv"][i]), "max_over_mean": _f(bal["max_over_mean"][i]),
                   "route_entropy": _f(rent[i]), "topk_entropy": _f(self.topk_entropy[i]),
                   "domain_jsd": _f(js["jsd"][i]), "mean_pairwise_jsd": _f(js["mean_pairwise_jsd"][i]),
                   "uncalibrated": int(unc[i])} for i in range(self.num_layers)]
        return {"format": "mxq.router_stats", "version": VERSION, "model_hash": self.model_hash,
                "calib_hash": self.calib_hash, "calib_config": self.calib_config,
                "num_layers": self.num_layers, "num_experts": self.num_experts, "top_k": self.top_k,
                "hidden_size": int(self.max_act_channel.shape[-1]), "tokens": self.tokens,
                "domains": self.domains, "domain_tokens": self.domain_tokens,
                "super_experts": [list(x) for x in self.super_experts], "super_threshold": _f(self.super_threshold),
                "super_config": self.super_config, "uncalibrated": self.uncalibrated_list(),
                "max_entropy": {"route": _f(torch.log(torch.tensor(float(self.num_experts)))),
                                "topk": _f(torch.log(torch.tensor(float(self.top_k))))},
                "layers": layers,
                "by_domain": {d: _domain_summary(self.for_domain(d)) for d in self.domains},
                "meta": self.meta}

    def tensors(self) -> dict[str, Tensor]:
        out = {k: getattr(self, k).contiguous() for k in EXPERT_KEYS}
        for i, d in enumerate(self.domains):
            out.update({f"domain{i}.{k}": v.contiguous() for k, v in self.by_domain[d].items()})
        return out

    def save(self, folder: str | Path) -> Path:
        """Write ``router_stats.safetensors`` (tensors) and ``router_stats.json`` (summary) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(folder / "router_stats.safetensors", self.tensors(),
                                {"format": "mxq.router_stats", "version": str(VERSION)})
        write_atomic(folder / "router_stats.json", jsonout.dumps(self.summary(), indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, super_cfg: Any = None) -> "RouterStats":
        """Read what ``save`` wrote; super experts are re-detected only when ``super_cfg`` is given."""
        folder = Path(folder)
        s = json.loads((folder / "router_stats.json").read_text())
        if s.get("format") != "mxq.router_stats" or s.get("version") != VERSION:
            raise ValueError(f"{folder}: not mxq router statistics version {VERSION}")
        t = load_file(str(folder / "router_stats.safetensors"))
        by_domain = {d: {k: t[f"domain{i}.{k}"] for k in EXPERT_KEYS} for i, d in enumerate(s["domains"])}
        stats = cls(num_layers=s["num_layers"], num_experts=s["num_experts"], top_k=s["top_k"], tokens=s["tokens"],
                    **{k: t[k] for k in EXPERT_KEYS},
                    super_experts=[tuple(x) for x in s["super_experts"]],
                    super_threshold=_nan(s["super_threshold"]), super_config=s["super_config"],
                    domains=s["domains"], domain_tokens=s["domain_tokens"], by_domain=by_domain,
                    calib_config=s["calib_config"], calib_hash=s["calib_hash"], model_hash=s["model_hash"],
                    meta=s.get("meta", {}))
        if super_cfg is not None:
            stats.detect_super_experts(super_cfg)
        return stats


def _domain_summary(d: RouterStats) -> dict[str, Any]:
    return {"tokens": d.tokens, **d._layer_figures(), "uncalibrated": d.uncalibrated_list()}


def _f(x: Any) -> float | None:
    """A JSON number; NaN/inf become null (JSON has no NaN)."""
    v = float(x)
    return v if v == v and abs(v) != float("inf") else None


def _nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)
