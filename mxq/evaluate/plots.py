"""PNG plots of one run (memory, speed, perplexity, per-token KL) and of a sweep (Pareto, router heatmap).

Built on ``matplotlib.figure.Figure`` rather than pyplot, so plotting never depends on a display backend
or global state (runs inside Hydra sweeps, tests, notebooks alike). Every function returns the Figure.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure

MiB = 1024 ** 2


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        fig.savefig(str(path), dpi=110, bbox_inches="tight")
    return fig


def plot_memory(metrics: dict[str, Any], path: str | Path | None = None) -> Figure:
    """Weight bytes by component (MiB), experts split by format."""
    mem = metrics["memory"]
    comp = dict(mem.get("by_component", {}))
    comp.pop("experts", None)
    for fmt, f in (mem.get("experts_by_format") or {}).items():
        comp[f"experts [{fmt}]"] = f["bytes"]
    names = sorted(comp, key=comp.get)
    fig = Figure(figsize=(6.5, 0.35 * len(names) + 1.2))
    ax = fig.subplots()
    ax.barh(names, [comp[n] / MiB for n in names], color="tab:blue")
    ax.set_xlabel("MiB")
    ax.set_title(f"weight bytes: {mem['weight_bytes'] / MiB:.2f} MiB, "
                 f"{mem.get('bits_per_expert_weight', float('nan')):.3f} bits/expert weight")
    return _save(fig, path)


def plot_speed(metrics: dict[str, Any], path: str | Path | None = None) -> Figure:
    """TTFT and decode tokens/s against context length, one line per mode."""
    rows = list((metrics["speed"].get("by_setting") or {}).values())
    fig = Figure(figsize=(9, 3.4))
    a1, a2 = fig.subplots(1, 2)
    for mode in sorted({r["mode"] for r in rows}):
        rs = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["context"])
        a1.plot([r["context"] for r in rs], [r["ttft_s"] * 1e3 for r in rs], "o-", label=mode)
        a2.plot([r["context"] for r in rs], [r["decode_tokens_per_s"] or math.nan for r in rs], "o-", label=mode)
    a1.set(xlabel="context tokens", ylabel="TTFT (ms, median)", xscale="log", title="time to first token")
    a2.set(xlabel="context tokens", ylabel="decode tokens/s (median)", xscale="log", title="decode throughput")
    a1.legend()
    p = metrics["speed"].get("precision", {})
    fig.suptitle(f"{p.get('path', '?')}, {p.get('compute_dtype', '?')}, experts {p.get('expert_formats', '?')}",
                 fontsize=9)
    return _save(fig, path)


def plot_perplexity(metrics: dict[str, Any], path: str | Path | None = None) -> Figure:
    ppl = metrics["accuracy"]["perplexity"]
    names = list(ppl)
    fig = Figure(figsize=(6.5, 3.2))
    ax = fig.subplots()
    ax.bar(names, [ppl[n] for n in names], color=["tab:gray" if n == "mean" else "tab:green" for n in names])
    for i, n in enumerate(names):
        ax.annotate(f"{ppl[n]:.2f}", (i, ppl[n]), ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="perplexity (held-out)", title="perplexity per domain")
    return _save(fig, path)


def plot_kl_hist(per_token: dict[str, Any], path: str | Path | None = None) -> Figure:
    """Histogram of log10 per-token KL per domain (values <= 1e-9 are drawn at -9)."""
    import torch

    fig = Figure(figsize=(6.5, 3.2))
    ax = fig.subplots()
    for d, v in per_token.items():
        x = torch.log10(torch.as_tensor(v).double().clamp_min(1e-9)).numpy()
        ax.hist(x, bins=40, histtype="step", label=d)
    ax.set(xlabel="log10 KL(baseline || model) per token", ylabel="tokens", title="per-token KL")
    ax.legend(fontsize=8)
    return _save(fig, path)


def pareto_front(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of points not dominated (lower x and lower y are better), sorted by x."""
    idx = sorted(range(len(xs)), key=lambda i: (xs[i], ys[i]))
    front, best = [], math.inf
    for i in idx:
        if ys[i] < best:
            front.append(i)
            best = ys[i]
    return front


def plot_pareto(labels: Sequence[str], weight_bytes: Sequence[float], ppl: Sequence[float],
                kl: Sequence[float], path: str | Path | None = None) -> Figure:
    """Mean perplexity and mean KL against weight bytes, each run labelled, the Pareto front drawn."""
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, ys, name in ((axes[0], ppl, "mean perplexity (held-out)"), (axes[1], kl, "mean KL vs baseline (nats)")):
        pts = [(x / MiB, y, lab) for x, y, lab in zip(weight_bytes, ys, labels)
               if x is not None and y is not None and not (isinstance(y, float) and math.isnan(y))]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", zorder=3)
            for x, y, lab in pts:
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            front = pareto_front([p[0] for p in pts], [p[1] for p in pts])
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="tab:orange",
                    label="Pareto front", zorder=2)
            ax.legend(fontsize=8)
        ax.set(xlabel="weight bytes (MiB)", ylabel=name)
        ax.grid(alpha=0.3)
    fig.suptitle("accuracy against weight bytes (lower-left is better)")
    return _save(fig, path)


def plot_router_heatmap(freq: Any, path: str | Path | None = None, title: str = "router frequency") -> Figure:
    """``freq`` [L, E] (share of tokens routed to each expert per layer) as a heatmap."""
    import torch

    f = torch.as_tensor(freq).float()
    fig = Figure(figsize=(min(14, 2 + 0.18 * f.shape[1]), 1.2 + 0.3 * f.shape[0]))
    ax = fig.subplots()
    im = ax.imshow(f.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set(xlabel="expert", ylabel="layer", title=title)
    fig.colorbar(im, ax=ax, fraction=0.03)
    return _save(fig, path)
