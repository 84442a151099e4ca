"""Write ``training_log.json`` and ``loss.png`` (train / calib / held-out loss and the balancing loss)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import jsonout
from ..atomic import write_atomic


def write_log(log: dict[str, Any], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "training_log.json"
    write_atomic(path, jsonout.dumps(log, indent=1, default=str) + "\n")   # a diverged loss is NaN: null
    written = [path]
    written.append(plot_losses(log, out / "loss.png"))
    return written


def plot_losses(log: dict[str, Any], path: Path) -> Path:
    """Loss curves (train, calibration, held-out, balancing loss) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax_aux) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in log["train"]]
    ax.plot(steps, [r["loss"] for r in log["train"]], label="train (batch mean)", lw=1)
    ev_steps = [r["step"] for r in log["eval"]]
    for split, style in (("calib", "--"), ("heldout", "-")):
        for i, d in enumerate(log["eval"][0][split]):
            ax.plot(ev_steps, [r[split][d] for r in log["eval"]], style, color=f"C{i + 1}", lw=1,
                    label=f"{split} {d}")
    if "qat_started_step" in log:
        ax.axvline(log["qat_started_step"], color="grey", lw=0.8, ls=":", label="MXFP4 QAT starts")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_ylim(bottom=max(0.0, min(r["loss"] for r in log["train"]) - 0.5), top=log["train"][0]["loss"] + 0.2)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax_aux.plot(steps, [r["aux"] for r in log["train"]], lw=1)
    ax_aux.set_xlabel("step")
    ax_aux.set_ylabel("load-balancing loss (1 = uniform)")
    ax_aux.grid(alpha=0.3)
    fig.suptitle("mxq tiny GPT-OSS training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
