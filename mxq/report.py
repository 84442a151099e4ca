"""``python -m mxq.report DIR... [--out OUT] [--baseline LABEL] [--pair A:B]``: ablation report over run
folders or a Hydra multirun folder.

    python -m mxq.run -m recipe=baseline,mxfp4,nf4,prune_25pct
    python -m mxq.report outputs/multirun/<stamp>

Writes ablation.md, ablation.csv (+ ablation_tasks.csv, ablation_paired.csv, ablation_seeds.csv) and
pareto.png into ``--out`` (default: the first DIR) and prints a summary and the paired differences
against the baseline in 80 columns; logic in ``mxq.evaluate.ablation``.
``--html`` also writes one self-contained report.html (plots embedded; ``mxq.publish.html``).
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WIDTH = 80


def _pair(text: str) -> tuple[str, str]:
    a, sep, b = text.rpartition(":")
    if not sep or not a or not b:
        raise argparse.ArgumentTypeError(f"--pair wants VARIANT:REFERENCE (run labels), got {text!r}")
    return a, b


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]], width: int = WIDTH) -> str:
    """Plain columns separated by two spaces; the first column is cut (ending in ``~``) to fit ``width``."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    over = sum(w) + 2 * (len(w) - 1) - width
    if over > 0:
        w[0] = max(8, w[0] - over)
    lines = []
    for r in cells:
        first = r[0] if len(r[0]) <= w[0] else r[0][:w[0] - 1] + "~"
        parts = [first.ljust(w[0])] + [c.rjust(w[i]) for i, c in enumerate(r[1:], 1)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _short(metric: str) -> str:
    """A metric name for the 80-column printout (full names are in the CSVs)."""
    return metric.removeprefix("tiny_").replace(".word_perplexity", ".word_ppl").replace(".perplexity", ".ppl")


def _num(v: Any, digits: int = 4) -> str:
    from .evaluate.report import fmt

    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt(v.item() if hasattr(v, "item") else v, digits)


def main(argv: list[str] | None = None) -> dict[str, Path]:
    ap = argparse.ArgumentParser(prog="python -m mxq.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="run folders or sweep folders (searched recursively)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: the first DIR)")
    ap.add_argument("--baseline", default=None, help="label of the reference run (default: recipe `baseline`)")
    ap.add_argument("--pair", action="append", type=_pair, default=[], metavar="A:B",
                    help="also compare run A with run B (labels; repeatable)")
    ap.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    ap.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    ap.add_argument("--html", action="store_true",
                    help="also write one self-contained report.html (mxq.publish.html): a run's, or a sweep's "
                         "with every run's page")
    a = ap.parse_args(argv)
    import pandas as pd

    from .evaluate.ablation import HEADLINE, write_ablation
    from .evaluate.intervals import Settings
    from .evaluate.paired import interval_text, p_text

    s = Settings.from_cfg({"confidence": a.confidence, "n_resamples": a.resamples, "seed": a.seed})
    paths = write_ablation(a.dirs, a.out, a.baseline, a.pair, s)
    df = pd.read_csv(paths["csv"])
    rows = [[r["label"], _num(r.get("weight_bytes", float("nan")) / 2 ** 20, 4), _num(r.get("ppl_mean")),
             interval_text(r.get("ppl_mean_lo"), r.get("ppl_mean_hi")), _num(r.get("kl_mean"), 3),
             _num(r.get("decode_tok_s"), 3)] for _, r in df.iterrows()]
    print(f"mxq ablation: {len(df)} runs\n")
    print(text_table(["run", "MiB", "ppl", f"{int(s.confidence * 100)}% CI", "KL", "tok/s"], rows))
    if "paired_csv" in paths:
        long = pd.read_csv(paths["paired_csv"])
        long = long[long["skipped"].isna()]
        shown = long[long["metric"].isin(HEADLINE)
                     | long["metric"].str.endswith((".acc", ".word_perplexity", ".perplexity"))]
        for (var, ref), sub in shown.groupby(["variant", "reference"], sort=False):
            print(f"\n{var} vs {ref} (paired; ~ = inside the noise)")
            print(text_table(["metric", "value", "delta", f"{int(s.confidence * 100)}% CI", "p", ""],
                             [[_short(r["metric"]), _num(r["a"]), _num(r["delta"], 3),
                               interval_text(r["ci_low"], r["ci_high"]), p_text(r["p"]), r["verdict"]]
                              for _, r in sub.iterrows()]))
    if a.html:
        from .publish.html import write_html

        paths["html"] = write_html(a.dirs, a.out)
    print()
    for k, p in paths.items():
        print(f"{k}: {p}")
    return paths


if __name__ == "__main__":
    main()
