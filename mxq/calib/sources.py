"""Where calibration text comes from: the embedded corpus, local files, or a Hugging Face dataset.

Every source returns ``{domain: text}``; a domain is the unit the statistics are split by (a corpus
domain, a file stem, a dataset), so per-domain specialisation can be measured whatever the source.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import CalibConfig, CalibError


def _selected(names: list[str], domains: str | tuple[str, ...], what: str) -> list[str]:
    if domains == "all":
        return names
    wanted = [domains] if isinstance(domains, str) else list(domains)
    unknown = [d for d in wanted if d not in names]
    if unknown:
        raise CalibError(f"unknown {what} domain(s) {unknown}; available: {', '.join(names)}")
    return wanted


def corpus_texts(cfg: CalibConfig) -> dict[str, str]:
    """The embedded four-domain corpus (``mxq.data.corpus``); ``calib`` is the default split."""
    from ..data.corpus import DOMAINS, SPLITS, load_text

    if cfg.split not in SPLITS:
        raise CalibError(f"calib.split={cfg.split!r} is not a corpus split; choose one of {', '.join(SPLITS)}")
    return {d: load_text(d, cfg.split) for d in _selected(list(DOMAINS), cfg.domains, "corpus")}


def _read_file(path: Path, text_field: str) -> str:
    if not path.is_file():
        raise CalibError(f"calibration file {path} does not exist")
    if path.suffix not in (".txt", ".jsonl"):
        raise CalibError(f"calibration file {path}: only .txt and .jsonl are read, got {path.suffix!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibError(f"calibration file {path}: not UTF-8 text (byte {e.start}: {e.reason}); "
                         "a binary file given as calibration text?") from None
    if "\x00" in text:
        raise CalibError(f"calibration file {path}: contains NUL bytes at offset {text.index(chr(0))}; "
                         "a binary file given as calibration text?")
    if path.suffix == ".txt":
        return text
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise CalibError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}")
        if text_field not in row:
            raise CalibError(f"{path}:{n} has no field {text_field!r} (calib.text_field); keys: {sorted(row)}")
        docs.append(str(row[text_field]))
    return "\n\n".join(docs)


def file_texts(cfg: CalibConfig) -> dict[str, str]:
    """Local files, one domain per file stem; ``.jsonl`` documents are joined by blank lines."""
    paths = [Path(p).expanduser() for p in cfg.paths]
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise CalibError(f"calibration files must have distinct stems (they name the domains): {stems}")
    keep = set(_selected(stems, cfg.domains, "file"))
    return {p.stem: _read_file(p, cfg.text_field) for p in paths if p.stem in keep}


def source_texts(cfg: CalibConfig) -> dict[str, str]:
    """``{domain: text}`` for the configured source, in a fixed order."""
    if cfg.source == "corpus":
        texts = corpus_texts(cfg)
    elif cfg.source == "files":
        texts = file_texts(cfg)
    else:
        from .hf import hf_texts

        texts = hf_texts(cfg)
    empty = [d for d, t in texts.items() if not t.strip()]
    if empty:
        raise CalibError(f"calibration domain(s) {empty} contain no text")
    return texts
