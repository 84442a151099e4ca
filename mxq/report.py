"""``python -m mxq.report DIR... [--out OUT]``: ablation report over run folders or a Hydra multirun folder.

    python -m mxq.run -m recipe=baseline,mxfp4,nf4,prune_25pct
    python -m mxq.report outputs/multirun/<stamp>

``--html`` also writes one self-contained report.html (plots embedded; ``mxq.publish.html``).
Writes ablation.md, ablation.csv (+ ablation_tasks.csv) and pareto.png into ``--out`` (default: the
first DIR) and prints the summary; logic in ``mxq.evaluate.ablation``.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> dict[str, Path]:
    ap = argparse.ArgumentParser(prog="python -m mxq.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="run folders or sweep folders (searched recursively)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: the first DIR)")
    ap.add_argument("--html", action="store_true",
                    help="also write one self-contained report.html (mxq.publish.html): a run's, or a sweep's "
                         "with every run's page")
    a = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from .evaluate.ablation import load_runs, runs_frame, write_ablation
    from .evaluate.report import fmt

    paths = write_ablation(a.dirs, a.out)
    df = runs_frame(load_runs(a.dirs))
    cols = [c for c in ("label", "weight_bytes", "bits_per_expert_weight", "ppl_mean", "kl_mean", "top1_agreement",
                        "decode_tok_s", "d_ppl_mean_pct", "d_weight_bytes_pct") if c in df]
    t = Table(title=f"mxq ablation ({len(df)} runs)")
    for c in cols:
        t.add_column(c)
    for _, row in df[cols].iterrows():
        t.add_row(*[fmt(v.item() if hasattr(v, "item") else v) for v in row])
    Console().print(t)
    if a.html:
        from .publish.html import write_html

        paths["html"] = write_html(a.dirs, a.out)
    for k, p in paths.items():
        print(f"{k}: {p}")
    return paths


if __name__ == "__main__":
    main()
