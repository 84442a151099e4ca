"""``write_report(stats, run_dir)``: ``router_stats.md``, the statistics a person reads before pruning.

Built only from a ``RouterStats`` (itself loadable from the run folder), so it can be regenerated from
the saved files at any later time.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .plots import FILES
from .router_stats import RouterStats

TOP_N = 3


def _g(x: float | torch.Tensor, fmt: str = ".4g") -> str:
    v = float(x)
    return "n/a" if math.isnan(v) else format(v, fmt)


def _experts_cell(stats: RouterStats, layer: int, order: list[int]) -> str:
    return ", ".join(f"e{e} ({_g(stats.reap[layer, e], '.3g')}; {_g(stats.freq_fraction[layer, e], '.1%')})"
                     for e in order)


def top_bottom(stats: RouterStats, layer: int, n: int = TOP_N) -> tuple[list[int], list[int]]:
    """Calibrated experts of ``layer`` with the highest / lowest REAP score (uncalibrated ones excluded)."""
    r = stats.reap[layer]
    ok = torch.nonzero(~stats.uncalibrated[layer]).flatten()
    order = ok[torch.argsort(r[ok], descending=True, stable=True)].tolist()
    n = min(n, len(order))
    return order[:n], order[::-1][:n]


def render(stats: RouterStats) -> str:
    s, bal, js = stats.summary(), stats.balance(), stats.domain_jsd()
    meta = stats.meta
    lines = [
        "# Router statistics",
        "",
        f"- model hash `{stats.model_hash}`, calibration hash `{stats.calib_hash}`",
        f"- calibration: `{stats.calib_config}`",
        f"- {stats.tokens:,} valid tokens; domains: "
        + ", ".join(f"{d} ({stats.domain_tokens.get(d, 0):,})" for d in stats.domains),
        f"- {stats.num_layers} layers x {stats.num_experts} experts, top-{stats.top_k}; run in "
        f"{meta.get('dtype', '?')} on {meta.get('device', '?')}"
        + (f", {meta['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in meta else "")
        + (f" (cache {meta['cache']})" if "cache" in meta else ""),
        "",
        "Scores: REAP = mean over routed tokens of g_e(x)·‖f_e(x)‖₂ (Lasby et al., arXiv 2510.13999); "
        "frequency = share of tokens whose top-k holds the expert. Figures: "
        + ", ".join(f"`{f}`" for f in FILES) + ".",
        "",
        "## Super experts",
        "",
        f"Criterion (Su et al., arXiv 2507.23279): max |down_proj output| > p{s['super_config'].get('percentile')} "
        f"of all experts' maxima and > {s['super_config'].get('ratio')} x the largest, in the first "
        f"{s['super_config'].get('layers_fraction')} of layers. Threshold: {_g(stats.super_threshold)}.",
        "",
    ]
    if stats.super_experts:
        lines += ["| layer | expert | max activation | x threshold | frequency | REAP |", "|---|---|---|---|---|---|"]
        for layer, e in stats.super_experts:
            m = stats.max_act[layer, e]
            lines.append(f"| {layer} | {e} | {_g(m)} | {_g(m / stats.super_threshold, '.2f')} | "
                         f"{_g(stats.freq_fraction[layer, e], '.2%')} | {_g(stats.reap[layer, e])} |")
    else:
        lines.append("None found.")
    unc = stats.uncalibrated_list()
    lines += ["", "## Uncalibrated experts", ""]
    if unc:
        lines += [f"{len(unc)} experts received no calibration token; their REAP and maxima are undefined (NaN), "
                  "not zero. Use more or more varied calibration text before pruning them:", "",
                  ", ".join(f"L{a}E{b}" for a, b in unc)]
    else:
        lines.append("None: every expert received calibration tokens.")
    lines += ["", "## Balance per layer", "",
              f"Route entropy: of the average routing distribution (max ln E = {math.log(stats.num_experts):.3f}); "
              f"top-k entropy: mean per-token entropy of the top-k weights (max ln k = {math.log(stats.top_k):.3f}); "
              "JSD in bits between domains' frequency distributions.", "",
              "| layer | cv | max/mean | route entropy | top-k entropy | domain JSD | mean pairwise JSD "
              "| uncalibrated |",
              "|---|---|---|---|---|---|---|---|"]
    rent = stats.route_entropy
    for i in range(stats.num_layers):
        lines.append(f"| {i} | {_g(bal['cv'][i], '.3f')} | {_g(bal['max_over_mean'][i], '.2f')} | "
                     f"{_g(rent[i], '.3f')} | {_g(stats.topk_entropy[i], '.3f')} | {_g(js['jsd'][i], '.4f')} | "
                     f"{_g(js['mean_pairwise_jsd'][i], '.4f')} | {int(stats.uncalibrated[i].sum())} |")
    lines += ["", f"## Top and bottom {TOP_N} experts per layer by REAP", "",
              "Cells: expert (REAP; frequency).", "", "| layer | top | bottom |", "|---|---|---|"]
    for i in range(stats.num_layers):
        top, bottom = top_bottom(stats, i)
        lines.append(f"| {i} | {_experts_cell(stats, i, top)} | {_experts_cell(stats, i, bottom)} |")
    return "\n".join(lines) + "\n"


def write_report(stats: RouterStats, run_dir: str | Path) -> Path:
    """Write ``router_stats.md`` into ``run_dir``."""
    path = Path(run_dir) / "router_stats.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(stats))
    return path
