"""Figures of the router statistics (matplotlib, Agg backend: no display needed on a GPU node).

* ``router_freq.png``: selection frequency per (layer, expert) as a heatmap; x marks uncalibrated
  experts, squares mark super experts.
* ``super_experts.png``: every expert's max |down_proj output| (log scale) with the Su et al. threshold
  and the layers the criterion considers (arXiv 2507.23279).
* ``domain_specialisation.png``: per layer, the Jensen-Shannon divergence between the calibration
  domains' frequency distributions (generalised and mean pairwise), and the pairwise JSD matrix.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .measures import pairwise_jsd_matrix  # noqa: E402
from .router_stats import RouterStats  # noqa: E402
from .super_experts import SuperExpertConfig  # noqa: E402

FILES = ("router_freq.png", "super_experts.png", "domain_specialisation.png")


def _ticks(n: int) -> list[int]:
    """Integer tick positions 0..n-1, at most about 12 of them."""
    return list(range(0, n, max(1, n // 12)))


def plot_frequency(stats: RouterStats, path: Path) -> None:
    L, E = stats.num_layers, stats.num_experts
    fig, ax = plt.subplots(figsize=(min(4 + E * 0.22, 30), min(3 + L * 0.3, 16)))
    im = ax.imshow(stats.freq_fraction.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="fraction of tokens")
    if bool(stats.uncalibrated.any()):
        ys, xs = torch.nonzero(stats.uncalibrated, as_tuple=True)
        ax.scatter(xs.numpy(), ys.numpy(), marker="x", c="red", s=30, label="uncalibrated")
    if stats.super_experts:
        sl, se = zip(*stats.super_experts)
        ax.scatter(se, sl, marker="s", facecolors="none", edgecolors="orange", s=80, linewidths=1.5,
                   label="super expert")
    ax.set_yticks(_ticks(L))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"Expert selection frequency (top-{stats.top_k}, {stats.tokens:,} tokens; uniform = "
                 f"{stats.top_k / E:.3f})")
    if stats.super_experts or bool(stats.uncalibrated.any()):
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_super_experts(stats: RouterStats, path: Path) -> None:
    L, E = stats.num_layers, stats.num_experts
    m = stats.max_act.flatten().numpy()                                                # [L*E] layer-major
    x = torch.arange(L * E).numpy()
    fig, ax = plt.subplots(figsize=(min(6 + L * E * 0.01, 24), 4.5))
    ax.scatter(x, m, s=6, c="tab:blue", label="max |f_e(x)| per expert")
    for layer, e in stats.super_experts:
        ax.scatter([layer * E + e], [stats.max_act[layer, e].item()], s=40, c="red")
        ax.annotate(f"L{layer}E{e}", (layer * E + e, stats.max_act[layer, e].item()), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    if stats.super_threshold == stats.super_threshold:
        ax.axhline(stats.super_threshold, color="red", ls="--", lw=1,
                   label=f"threshold {stats.super_threshold:.4g}")
    cfg = SuperExpertConfig(**stats.super_config) if stats.super_config else SuperExpertConfig()
    n = cfg.num_layers(L)
    if n < L:
        ax.axvspan(n * E - 0.5, L * E - 0.5, color="grey", alpha=0.15, label="layers not considered")
    ax.set_yscale("log")
    step = max(1, L // 12)
    ax.set_xticks([i * E for i in range(0, L, step)], [str(i) for i in range(0, L, step)])
    ax.set_xlabel("layer (experts in order within each layer)")
    ax.set_ylabel("max |down_proj output|")
    ax.set_title(f"Super experts (Su et al. 2507.23279): > p{cfg.percentile:g} and > {cfg.ratio:g} x max, "
                 f"first {n}/{L} layers; found {len(stats.super_experts)}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_domains(stats: RouterStats, path: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1.6, 1]})
    if len(stats.domains) < 2:
        for ax in (a, b):
            ax.axis("off")
        a.text(0.5, 0.5, f"one calibration domain ({', '.join(stats.domains) or 'none'}): no specialisation "
               "to measure", ha="center", va="center")
    else:
        js = stats.domain_jsd()
        layers = torch.arange(stats.num_layers).numpy()
        a.plot(layers, js["jsd"].numpy(), marker="o", label=f"JSD of all {len(stats.domains)} domains")
        a.plot(layers, js["mean_pairwise_jsd"].numpy(), marker="s", label="mean pairwise JSD")
        a.set_xticks(_ticks(stats.num_layers))
        a.set_xlabel("layer")
        a.set_ylabel("Jensen-Shannon divergence (bits)")
        a.set_title("Domain specialisation of expert selection per layer")
        a.legend(fontsize=8)
        f = torch.stack([stats.by_domain[d]["freq"] for d in stats.domains])           # [D, L, E]
        mat = pairwise_jsd_matrix(f).numpy()
        im = b.imshow(mat, cmap="magma")
        b.set_xticks(range(len(stats.domains)), stats.domains, rotation=45, ha="right", fontsize=8)
        b.set_yticks(range(len(stats.domains)), stats.domains, fontsize=8)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                b.text(j, i, f"{mat[i, j]:.3f}", ha="center", va="center", fontsize=7,
                       color="black" if mat[i, j] > 0.6 * mat.max() else "white")
        b.set_title("pairwise JSD, mean over layers")
        fig.colorbar(im, ax=b)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(stats: RouterStats, run_dir: str | Path) -> list[Path]:
    """Write the three PNG files into ``run_dir``; returns their paths."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = [run_dir / f for f in FILES]
    for fn, p in zip((plot_frequency, plot_super_experts, plot_domains), paths):
        fn(stats, p)
    return paths
