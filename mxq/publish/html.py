"""One self-contained HTML file per run folder and per sweep (``python -m mxq.report DIR --html``).

The HTML is rendered from the Markdown reports the run and ``mxq.evaluate.ablation`` already write
(``report.md``, ``router_stats.md``, ``ablation.md``, the model card) with markdown-it-py (CommonMark + tables),
so the HTML and the Markdown never disagree. Every PNG is embedded as a base64 data URI and the stylesheet is
inline: the file opens offline, can be mailed as one attachment and prints (``@media print``). A sweep's page
links to each run's page (relative links, so the folder can be moved) and each run's page links back.
"""
from __future__ import annotations

import base64
import html
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

from ..atomic import write_atomic

HTML_NAME = "report.html"
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1b1b1b;line-height:1.45}
h1{border-bottom:2px solid #333;padding-bottom:.2em}h2{border-bottom:1px solid #ccc;margin-top:1.6em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em;display:block;overflow-x:auto;max-width:100%}th,td{border:1px solid #ccc;padding:.25em .6em}
th{background:#f0f0f0}tbody tr:nth-child(even){background:#fafafa}td{font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto}pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.85em}
code{background:#f3f3f3;padding:0 .2em}nav{background:#eef3f8;padding:.5em .8em;border-radius:4px}
nav a{margin-right:1em}blockquote{border-left:4px solid #999;margin-left:0;padding-left:1em;color:#444}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plots figure{margin:0;flex:1 1 45%}
@media print{nav{display:none}body{max-width:none;margin:0}table{font-size:.7em;overflow:visible}details{display:block}details>*{display:block}
h2{page-break-after:avoid}table,img{page-break-inside:avoid}}
"""
_IMG = re.compile(r'<img src="([^"]+)" alt="([^"]*)" ?/?>')


def _markdown(text: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _inline_images(fragment: str, base: Path, used: set[str]) -> str:
    """Replace each ``<img src=NAME>`` with the file's bytes as a data URI; drop images that were not written."""
    def sub(m: re.Match) -> str:
        p = base / html.unescape(m.group(1))
        if not p.is_file():
            return ""
        used.add(p.name)
        return f'<img src="{_data_uri(p)}" alt="{m.group(2)}">'

    return _IMG.sub(sub, fragment)


def _strip_front_matter(text: str) -> str:
    return re.sub(r"\A---\n.*?\n---\n", "", text, count=1, flags=re.DOTALL)


def _page(title: str, nav: list[tuple[str, str]], body: list[str]) -> str:
    links = "".join(f'<a href="{html.escape(h)}">{html.escape(t)}</a>' for t, h in nav)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
            + (f"<nav>{links}</nav>\n" if links else "") + "\n".join(body) + "\n</body></html>\n")


def _pre(title: str, text: str, open_: bool = False) -> str:
    return (f"<details{' open' if open_ else ''}><summary><b>{html.escape(title)}</b></summary>"
            f"<pre>{html.escape(text)}</pre></details>")


def _sweep_of(run_dir: Path) -> Path | None:
    """The sweep folder above a run (Hydra's multirun.yaml or an ablation written there), if any."""
    parent = run_dir.resolve().parent
    if (parent / "multirun.yaml").is_file() or (parent / "ablation.md").is_file() or (parent / HTML_NAME).is_file():
        return parent
    return None


def run_html(run_dir: str | Path, sweep: Path | None = None) -> str:
    """The HTML page of one run folder (report, router statistics, plan, model card, plots, config)."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").is_file():
        raise FileNotFoundError(f"{run_dir / 'metrics.json'}: missing; is {run_dir} a finished mxq run folder?")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    recipe = (metrics.get("recipe") or {}).get("name") or run_dir.name
    sweep = sweep if sweep is not None else _sweep_of(run_dir)
    nav = [("sweep", os.path.relpath(Path(sweep) / HTML_NAME, run_dir))] if sweep is not None else []
    used: set[str] = set()
    body = []
    if (run_dir / "report.md").is_file():
        body.append(_inline_images(_markdown((run_dir / "report.md").read_text()), run_dir, used))
    else:
        body.append(f"<h1>{html.escape(recipe)}</h1><p>No report.md in this run folder.</p>")
    if (run_dir / "plan.json").is_file():
        from .card import bytes_table, plan_tables

        plan = json.loads((run_dir / "plan.json").read_text())
        md = "## Plan\n\n" + plan_tables(plan) + "\n\n" + bytes_table(plan) + "\n"
        if plan.get("notes"):
            md += "\n" + "\n".join(f"- {n}" for n in plan["notes"]) + "\n"
        body.append(_markdown(md))
    if (run_dir / "router_stats.md").is_file():
        body.append(_inline_images(_markdown((run_dir / "router_stats.md").read_text()), run_dir, used))
    card = run_dir / "model" / "README.md"
    if card.is_file():
        nav.append(("model card", "#model-card"))
        body.append('<h2 id="model-card">Model card (<code>model/README.md</code>)</h2>'
                    + _pre("front matter and text", card.read_text()))
    rest = sorted(p for p in run_dir.glob("*.png") if p.name not in used)
    if rest:
        body.append("<h2>Other plots</h2><div class=\"plots\">" + "".join(
            f'<figure><img src="{_data_uri(p)}" alt="{html.escape(p.stem)}"><figcaption>{html.escape(p.name)}'
            "</figcaption></figure>" for p in rest) + "</div>")
    cfg = run_dir / "resolved_config.yaml"
    if cfg.is_file():
        body.append("<h2>Configuration</h2>" + _pre("resolved_config.yaml", cfg.read_text()))
    if (run_dir / "run_meta.json").is_file():
        body.append(_pre("run_meta.json", (run_dir / "run_meta.json").read_text()))
    return _page(f"mxq run: {recipe}", nav, body)


def sweep_html(dirs: Sequence[str | Path], out: str | Path | None = None) -> tuple[str, list[Path]]:
    """The HTML page of a sweep (ablation tables, Pareto plot, links to each run's page) and its run folders."""
    from ..evaluate.ablation import find_metrics, write_ablation

    out = Path(out or dirs[0])
    paths = write_ablation(dirs, out)
    used: set[str] = set()
    body = [_inline_images(_markdown(paths["md"].read_text()), out, used)]
    runs = [p.parent for p in find_metrics(dirs)]
    rows = ["<h2>Runs</h2><table><thead><tr><th>run</th><th>recipe</th><th>page</th></tr></thead><tbody>"]
    for r in runs:
        recipe = (json.loads((r / "metrics.json").read_text()).get("recipe") or {}).get("name")
        rel = Path(r).resolve().relative_to(out.resolve()) if Path(r).resolve().is_relative_to(out.resolve()) else r
        rows.append(f'<tr><td>{html.escape(str(rel))}</td><td>{html.escape(str(recipe))}</td>'
                    f'<td><a href="{html.escape(str(Path(rel) / HTML_NAME))}">{HTML_NAME}</a></td></tr>')
    body.append("".join(rows) + "</tbody></table>")
    mr = out / "multirun.yaml"
    if mr.is_file():
        body.append("<h2>Sweep configuration</h2>" + _pre("multirun.yaml", mr.read_text()))
    return _page(f"mxq ablation ({len(runs)} runs)", [], body), runs


def write_html(dirs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """``report.html`` of a run folder (one DIR holding metrics.json) or of a sweep (with every run's page)."""
    dirs = [Path(d) for d in dirs]
    if len(dirs) == 1 and (dirs[0] / "metrics.json").is_file() and out is None:
        path = dirs[0] / HTML_NAME
        write_atomic(path, run_html(dirs[0]))
        return path
    out = Path(out or dirs[0])
    page, runs = sweep_html(dirs, out)
    for r in runs:
        inside = r.resolve().is_relative_to(out.resolve())
        write_atomic(r / HTML_NAME, run_html(r, sweep=out if inside else None))
    path = out / HTML_NAME
    write_atomic(path, page)
    return path
