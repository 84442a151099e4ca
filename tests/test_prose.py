"""Prose rules for the next engineer: every module of ``mxq`` has a docstring, and nothing a user or a reader of
the code can see cites a ticket, a work session or a document that is not in the repository.

Comments, docstrings, shipped configuration and docs must cite the paper or the published spec (with section),
a source file by repository and path, an upstream report as ``owner/repo#N``, a document in ``docs/``, or just
give the reason. Scanned: ``mxq/`` (``.py``, ``.md``), the shipped ``recipes/`` and ``evals/`` configuration,
``docs/``, ``bench/`` and the top-level README and BENCHMARKS.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mxq"

# Each pattern is one kind of reference a reader cannot follow; the message says what to write instead.
FORBIDDEN: dict[str, str] = {
    r"\b(?:issue|ticket)s?\s*#?\s*\d+": "a ticket number (cite the reason or the published source)",
    r"\btickets?\b": "a ticket",
    r"\bdeliverables?\s*\d+": "a ticket's deliverable number",
    r"\bmethods\.md\b|\bstyle\.md\b|gpt-oss-format\.md|house-sketch\.md": "a note outside the repository",
    r"\bformat spec\b": "the format document outside the repository (cite openai/gpt-oss, transformers, OCP MX)",
    r"\bspec(?:ification)?\s+(?:section\s+)?\d+(?:\.\d+)*\b": "a section of a spec not named (name the spec)",
    r"\bpain(?:\s+point)?\s*\d+": "a numbered pain point of a note outside the repository",
    r"\bstyle\s+(?:rule|note)s?\b": "a style note outside the repository",
    r"\b(?:this|that|the|first|second|third|fourth|fifth|sixth|seventh|earlier|previous|next|last)\s+sessions?\b":
        "a work session (say which version or date was measured)",
}
PATTERN = re.compile("|".join(f"(?:{p})" for p in FORBIDDEN), re.IGNORECASE)


def _scanned_files() -> list[Path]:
    files = [p for ext in ("py", "md") for p in PACKAGE.rglob(f"*.{ext}")]
    for folder, exts in (("recipes", ("yaml", "py")), ("evals", ("yaml", "md", "py")), ("docs", ("md",)),
                         ("bench", ("py", "md"))):
        files += [p for ext in exts for p in (ROOT / folder).rglob(f"*.{ext}")]
    files += [ROOT / "README.md", ROOT / "BENCHMARKS.md"]
    return sorted(p for p in files if p.is_file())


def _offences(text: str) -> list[str]:
    return [m.group(0) for m in PATTERN.finditer(text)]


@pytest.mark.parametrize("bad", [
    "see issue 6, item 4", "(issue #12)", "tickets 3 and 4", "issue 8 deliverable 1", "methods.md pain 7",
    "style.md rule 10", "(format spec 6.3)", "spec 4.3", "spec section 7", "pain point 3", "(style rule 8)",
    "measured in the sixth session", "the session's device time",
])
def test_pattern_catches(bad: str) -> None:
    """The patterns find every kind of reference this test exists to keep out."""
    assert _offences(bad), bad


@pytest.mark.parametrize("good", [
    "OCP Microscaling Formats (MX) v1.0, section 5.3.3 (FP4 E2M1)", "reported in vllm-project/vllm#48253",
    "REAP, arXiv 2510.13999", "openai/gpt-oss gpt_oss/torch/model.py", "the MX spec calls it NaN",
    "a sweep or a test session builds it once", "QLoRA, arXiv 2305.14314, section 3", "docs/formats.md",
])
def test_pattern_allows_citations(good: str) -> None:
    """Real citations (a spec named with its section, an upstream report, a paper, a repository path) pass."""
    assert not _offences(good), good


def test_no_references_a_reader_cannot_follow() -> None:
    """No ticket numbers, work sessions or documents outside the repository in code, configs or docs."""
    found = []
    for path in _scanned_files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for hit in _offences(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {hit!r} ({line.strip()[:100]})")
    assert not found, "references a reader cannot follow:\n" + "\n".join(found)


def test_every_module_has_a_docstring() -> None:
    """Every module of the package says what it is for (``ast``: the source is parsed, nothing imported)."""
    missing = [str(p.relative_to(ROOT)) for p in sorted(PACKAGE.rglob("*.py"))
               if not (ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) or "").strip()]
    assert not missing, "modules without a docstring: " + ", ".join(missing)
