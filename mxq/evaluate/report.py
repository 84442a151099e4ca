"""One run's human-readable outputs: report.md (tables + PNG plots), metrics.csv (one flat row), and the
summary table printed at the end of the run. Everything here only reads metrics.json-shaped dicts
(reports are built from self-describing outputs, never from live objects, so they can be rebuilt later).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from .metrics import LOGLIKELIHOOD_NOTE, flatten, get_path

MiB = 1024 ** 2


def fmt(v: Any, digits: int = 4) -> str:
    """Numbers with ``digits`` significant digits, ints with thousands separators, None as a dash."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def _ci(ci: Any) -> str:
    """``[lo, hi]`` of an interval stored in metrics.json, or a dash."""
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or ci[0] is None:
        return "-"
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def _range(sp: Any) -> str:
    """``min-max`` of a spread dict (``mxq.evaluate.intervals.spread``), or a dash."""
    if not isinstance(sp, dict) or sp.get("min") is None:
        return "-"
    return f"{fmt(sp['min'])}-{fmt(sp['max'])}"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(run_dir: Path, metrics: dict[str, Any]) -> Path:
    row = flatten({k: v for k, v in metrics.items() if k != "eval"})
    path = Path(run_dir) / "metrics.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        w.writeheader()
        w.writerow(row)
    return path


def precision_line(p: dict[str, Any] | None) -> str:
    if not p:
        return "precision: not recorded"
    return (f"**What ran:** code path `{p.get('path')}`, compute dtype `{p.get('compute_dtype')}`, "
            f"expert formats `{p.get('expert_formats')}`, device `{p.get('device')}`")


def _memory_md(m: dict[str, Any]) -> str:
    total = m.get("weight_bytes") or 0
    out = ["## Memory\n", f"Exact weight bytes as held: **{fmt(total)}** ({total / MiB:.3f} MiB); with every "
           f"non-expert tensor at bf16 (the published checkpoint convention): {fmt(m.get('weight_bytes_bf16_dense'))}. "
           f"Bits per expert weight (scales included): **{fmt(m.get('bits_per_expert_weight'))}**.\n"]
    comp = m.get("by_component") or {}
    out.append(table(["component", "bytes", "MiB", "share"],
                     [[k, v, v / MiB, v / total if total else None] for k, v in comp.items()]))
    fm = m.get("experts_by_format") or {}
    if fm:
        out.append("\n" + table(["expert format", "experts (layer x expert)", "bytes", "bits/weight"],
                                [[k, f["experts"], f["bytes"], f["bits_per_weight"]] for k, f in fm.items()]))
    p = m.get("params") or {}
    out.append(f"\nParameters: total {fmt(p.get('total'))}, active per token {fmt(p.get('active_excl_embedding'))} "
               f"(model-card convention, embedding excluded; {fmt(p.get('active_incl_embedding'))} with it), "
               f"{fmt(p.get('experts'))} experts held.\n")
    pk = m.get("peak")
    if pk:
        if pk.get("device") == "cuda":
            meas = (f"peak allocated {fmt(pk['peak_allocated_bytes'])} B ({pk['peak_allocated_bytes'] / MiB:.1f} MiB), "
                    f"reserved {fmt(pk['peak_reserved_bytes'])} B")
        else:
            meas = (f"host RSS {pk['host_rss_bytes_with_cache'] / MiB:.1f} MiB with the cache alive "
                    f"(process peak {pk['host_peak_rss_bytes_process'] / MiB:.1f} MiB)")
        out.append(f"\nMeasured ({pk['device']}, prefill {pk['context']} + decode {pk['new_tokens']} tokens, batch "
                   f"{pk['batch']}, KV cache {fmt(pk['kv_cache_bytes'])} B alive): {meas}.\n")
    return "\n".join(out)


def _speed_md(s: dict[str, Any]) -> str:
    if s.get("skipped") or not s.get("by_setting"):
        return "## Speed\n\nNot measured (speed disabled in this eval preset).\n"
    rows = [[k, r["ttft_s"] * 1e3, r["prefill_tokens_per_s"], r["decode_tokens_per_s"],
             _range((r.get("spread") or {}).get("decode_tokens_per_s")), r["e2e_p50_s"],
             r["e2e_p95_s"], r["energy_j_per_1k_tokens"], r.get("tokens_per_j"), r.get("ape_decode")]
            for k, r in s["by_setting"].items()]
    head = ["setting (mode@context)", "TTFT ms", "prefill tok/s", "decode tok/s", "decode min-max", "e2e p50 s",
            "e2e p95 s", "J / 1k gen tokens", "tokens / J", "APE (tok/s per B active)"]
    first = next(iter(s["by_setting"].values()))
    path = f"Code path: `{s.get('code_path') or (s.get('precision') or {}).get('path')}`"
    if s.get("fallback_reason"):
        path += f" (fast runtime not used: {s['fallback_reason']})"
    if s.get("peak_allocated_bytes"):
        path += f"; peak GPU memory during the sweep {s['peak_allocated_bytes'] / MiB:.1f} MiB allocated"
    return ("## Speed\n\n" + path + ".\n\n" + f"Protocol: {s.get('protocol')}. {first['repeats']} timed repeats per "
            f"setting after warm-up (medians; decode min-max over the repeats), {first['new_tokens']} generated "
            f"tokens, batch {first['batch']}, "
            f"{s.get('threads')} CPU threads; energy: {s.get('energy_source')}. Headline setting: "
            f"`{s.get('headline')}`.\n\n"
            + table(head, rows) + "\n![speed](speed.png)\n")


def _accuracy_md(a: dict[str, Any]) -> str:
    out = ["## Accuracy\n", f"> {LOGLIKELIHOOD_NOTE}\n"]
    ppl, det = a.get("perplexity"), a.get("perplexity_detail") or {}
    kl = a.get("kl_vs_baseline")
    if ppl:
        out.append(f"Perplexity on the held-out split of each domain (first {fmt(sum(det.get('tokens', {}).values()))} "
                   f"scored tokens in all), sliding window max_length {det.get('max_length')}, stride "
                   f"{det.get('stride')}, no BOS; token-weighted; `mean` = exp(mean NLL over all domains' tokens).\n")
        pdk = (kl or {}).get("per_domain", {})
        pci = a.get("perplexity_ci") or {}
        rows = [[d, v, _ci(pci.get(d)), det.get("tokens", {}).get(d), pdk.get(d, {}).get("mean"),
                 _ci(pdk.get(d, {}).get("mean_ci")), pdk.get(d, {}).get("p99"), pdk.get(d, {}).get("top1_agreement")]
                for d, v in ppl.items() if d != "mean"]
        rows.append(["**all**", ppl.get("mean"), _ci(pci.get("mean")), sum(det.get("tokens", {}).values()),
                     (kl or {}).get("mean"), _ci((kl or {}).get("mean_ci")), (kl or {}).get("p99"),
                     (kl or {}).get("top1_agreement")])
        iv = a.get("intervals") or {}
        ci_head = f"{int(100 * iv.get('confidence', 0.95))}% CI"
        out.append(table(["domain", "perplexity", ci_head, "tokens", "KL mean", ci_head, "KL p99", "top-1 agreement"],
                         rows))
        if iv:
            out.append(f"\nIntervals: {iv.get('method')}; {iv.get('n_resamples')} resamples, seed {iv.get('seed')}; "
                       f"units: {(iv.get('heldout_units') or {}).get('kind')} "
                       f"({(iv.get('heldout_units') or {}).get('count')} in all; per-unit values in per_doc.json).\n")
        out.append("\n![perplexity](perplexity.png)\n")
    if kl:
        r = kl.get("reference", {})
        out.append(f"KL = {kl.get('direction')}; reference `{r.get('source')}` (content hash "
                   f"{str(r.get('model_hash'))[:12]}), {r.get('mode')} mode, log-probs rounded to "
                   f"{r.get('cache_dtype')} on both sides, "
                   f"{'from the disk cache' if r.get('cached') else 'computed in this run'}.\n")
        out.append("\n![kl](kl_hist.png)\n")
    elif ppl:
        out.append("KL vs baseline: not computed (no baseline).\n")
    le = a.get("lm_eval")
    if le and le.get("tasks"):
        cis, ses = le.get("ci") or {}, le.get("stderr") or {}
        rows = [[t, m, v, _ci((cis.get(t) or {}).get(m)), (ses.get(t) or {}).get(m), (le.get("n_samples") or {}).get(t)]
                for t, ms in sorted(le["tasks"].items())
                for m, v in ms.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out.append(f"\n### lm-eval, per task (limit {le['config'].get('limit')}, chat format "
                   f"{le['config'].get('chat_format')})\n\n"
                   "95% CI: Wilson score interval for accuracies, bootstrap over documents otherwise; stderr: "
                   "lm-eval's own (when its bootstrap_iters > 0).\n\n"
                   + table(["task", "metric", "value", "95% CI", "stderr", "samples"], rows))
        if le.get("groups"):
            rows = [[g, m, v] for g, ms in le["groups"].items() for m, v in ms.items() if isinstance(v, float)]
            out.append("\nGroup averages (read the per-task rows first: an average can hide a collapsed task):\n\n"
                       + table(["group", "metric", "value"], rows))
    return "\n".join(out)


def write_report(run_dir: Path, metrics: dict[str, Any], plots: bool = True) -> Path:
    run_dir = Path(run_dir)
    if plots:
        from . import plots as P

        if get_path(metrics, "memory.weight_bytes") is not None:
            P.plot_memory(metrics, run_dir / "memory.png")
        if get_path(metrics, "speed.by_setting"):
            P.plot_speed(metrics, run_dir / "speed.png")
        if get_path(metrics, "accuracy.perplexity"):
            P.plot_perplexity(metrics, run_dir / "perplexity.png")
        kl_file = run_dir / "kl_per_token.safetensors"
        if kl_file.is_file() and get_path(metrics, "accuracy.kl_vs_baseline"):
            from safetensors.torch import load_file

            P.plot_kl_hist(load_file(str(kl_file)), run_dir / "kl_hist.png")
    recipe = get_path(metrics, "recipe.name") or "(no recipe name)"
    prec = metrics.get("precision") or get_path(metrics, "speed.precision")
    env = metrics.get("env") or {}
    parts = [f"# Evaluation report: {recipe}\n",
             f"Run folder `{run_dir}`; model `{get_path(metrics, 'model.source')}`; eval preset "
             f"`{get_path(metrics, 'eval.preset')}`; {env.get('date')}.\n", precision_line(prec) + "\n",
             _memory_md(metrics.get("memory") or {}), "\n![memory](memory.png)\n",
             _speed_md(metrics.get("speed") or {}), _accuracy_md(metrics.get("accuracy") or {}),
             "## Environment\n", table(["key", "value"], [[k, v] for k, v in env.items()])]
    path = run_dir / "report.md"
    path.write_text("\n".join(parts))
    return path


def summary_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    wb = get_path(metrics, "memory.weight_bytes")
    return [
        ("recipe", fmt(get_path(metrics, "recipe.name"))),
        ("weight bytes", f"{fmt(wb)} ({wb / MiB:.2f} MiB)" if wb else "-"),
        ("bits / expert weight", fmt(get_path(metrics, "memory.bits_per_expert_weight"))),
        ("decode tokens/s", fmt(get_path(metrics, "speed.decode_tokens_per_s"))),
        ("TTFT s", fmt(get_path(metrics, "speed.ttft_s"))),
        ("speed code path", fmt(get_path(metrics, "speed.code_path"))),
        ("perplexity (mean)", fmt(get_path(metrics, "accuracy.perplexity.mean"))),
        ("KL mean / p99", f"{fmt(get_path(metrics, 'accuracy.kl_vs_baseline.mean'))} / "
                          f"{fmt(get_path(metrics, 'accuracy.kl_vs_baseline.p99'))}"),
        ("top-1 agreement", fmt(get_path(metrics, "accuracy.kl_vs_baseline.top1_agreement"))),
        ("path / dtype", f"{fmt(get_path(metrics, 'precision.path'))} / "
                         f"{fmt(get_path(metrics, 'precision.compute_dtype'))}"),
    ]


def print_summary(metrics: dict[str, Any], run_dir: Path | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"mxq: {get_path(metrics, 'recipe.name') or 'evaluation'}", show_header=False)
    t.add_column("metric", style="bold", no_wrap=True)
    t.add_column("value", overflow="fold")
    rows = [(k, v) for k, v in summary_rows(metrics) if k != "recipe" and v.strip("-/ ") not in ("", "None")]
    for k, v in rows:
        t.add_row(k, v)
    console = Console()
    console.print(t if rows else f"mxq: {get_path(metrics, 'recipe.name') or 'run'} (nothing was evaluated)")
    if run_dir is not None:
        console.print(f"run folder: {run_dir}", soft_wrap=True)
