"""The self-contained HTML report: one file per run and per sweep, every plot embedded, no external
reference, sweep and run pages linked both ways."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mxq.report import main as report_main
from mxq.run import run
from tests.test_recipes import compose_cfg

FAST = ("eval=quick", "eval.speed.enabled=false", "eval.lm_eval.enabled=false", "eval.memory.measure_peak=false",
        "eval.perplexity.max_tokens=64", "eval.perplexity.max_length=64", "eval.perplexity.stride=64",
        "calib.num_sequences=8", "calib.seq_len=64", "generate.max_new_tokens=0")


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.src: list[str] = []
        self.href: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "src" in a:
            self.src.append(a["src"])
        if tag in ("a", "link") and "href" in a:
            self.href.append(a["href"])


def _refs(path: Path) -> _Refs:
    p = _Refs()
    p.feed(path.read_text())
    return p


@pytest.fixture(scope="module")
def sweep(make_ckpt, tmp_path_factory) -> Path:
    ckpt = make_ckpt("mxfp4", layers=2)
    root = tmp_path_factory.mktemp("sweep")
    cache = root.parent / "cache"
    for i, recipe in enumerate(("baseline", "prune_25pct")):
        run(compose_cfg(f"recipe={recipe}", *FAST, f"model.path={ckpt}", f"cache_dir={cache}"),
            root / f"{i}_{recipe}")
    return root


def test_sweep_and_run_pages_are_self_contained_and_linked(sweep):
    paths = report_main([str(sweep), "--html"])
    page = paths["html"]
    assert page == sweep / "report.html"
    refs = _refs(page)
    assert refs.src and all(s.startswith("data:image/png;base64,") for s in refs.src)     # pareto plot inlined
    assert sorted(refs.href) == ["0_baseline/report.html", "1_prune_25pct/report.html"]
    text = page.read_text()
    assert "<table>" in text and "prune_25pct" in text and "baseline" in text
    for name in ("0_baseline", "1_prune_25pct"):
        run_page = sweep / name / "report.html"
        r = _refs(run_page)
        assert r.href[0] == "../report.html" and (run_page.parent / r.href[0]).resolve() == page.resolve()
        assert r.src and all(s.startswith("data:image/png;base64,") for s in r.src)
        assert not [h for h in r.href if not (h.startswith("#") or h.endswith("report.html"))]   # nothing external
        t = run_page.read_text()
        assert "resolved_config.yaml" in t and "Perplexity" in t
    pruned = (sweep / "1_prune_25pct" / "report.html").read_text()
    assert 'id="model-card"' in pruned and "base_model" in pruned and "<h2>Plan</h2>" in pruned
    assert (sweep / "1_prune_25pct" / "report.html").stat().st_mode & 0o777 == 0o644


def test_single_run_page(sweep):
    run_dir = sweep / "0_baseline"
    from mxq.publish.html import write_html

    path = write_html([run_dir])
    assert path == run_dir / "report.html"
    assert len(re.findall(r'<img src="data:image/png;base64,', path.read_text())) >= 2


def test_not_a_run_folder(tmp_path):
    from mxq.publish.html import run_html

    with pytest.raises(FileNotFoundError, match="metrics.json"):
        run_html(tmp_path)
