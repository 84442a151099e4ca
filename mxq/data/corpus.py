"""The embedded four-domain English corpus and its fixed train / held-out / calib splits.

Why fixed splits: the embedded reference model is trained on ``train`` only, and every evaluation number
mxq reports for it comes from ``heldout``, so the split must be a pure function of the shipped bytes.

* ``heldout``: the contiguous tail of each file, starting at the first line boundary at or after 95% of
  the characters (the last ~5%). Never trained on; evaluation tasks (``mxq.data.build_evals``) are built
  from it alone.
* ``train``: everything before that boundary.
* ``calib``: the last ``CALIB_CHARS`` characters of ``train``, started at a line boundary. It is the
  validation slice of the embedded model's training (``python -m mxq.train.select``): the shipped tiny
  model was trained with it held out, so it is in-distribution text the model has *not* memorised, which
  is what calibration wants (router statistics and quantizer scales that generalise), while held-out text
  stays untouched for measuring the result.

Texts are ``str`` (decoded UTF-8); offsets are character offsets into the decompressed file.
"""
from __future__ import annotations

import lzma
from functools import lru_cache
from pathlib import Path

DOMAINS: tuple[str, ...] = ("austen", "web_bible", "kjv_bible", "shakespeare")
SPLITS: tuple[str, ...] = ("train", "heldout", "calib")
HELDOUT_FRACTION = 0.05
CALIB_CHARS = 262_144

CORPUS_DIR = Path(__file__).resolve().parents[1] / "assets" / "corpus"


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown corpus domain {domain!r}; known domains: {', '.join(DOMAINS)}")


@lru_cache(maxsize=None)
def full_text(domain: str) -> str:
    """The whole decompressed file of one domain (cached: decompression takes ~0.1 s per file)."""
    _check_domain(domain)
    path = CORPUS_DIR / f"{domain}.txt.xz"
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} is missing (mxq installed without its assets?)")
    return lzma.decompress(path.read_bytes()).decode("utf-8")


def _line_start_at_or_after(text: str, pos: int) -> int:
    """Index of the first character of the first line that starts at or after ``pos``."""
    if pos <= 0:
        return 0
    if text[pos - 1] == "\n":
        return pos
    nl = text.find("\n", pos)
    return len(text) if nl < 0 else nl + 1


@lru_cache(maxsize=None)
def split_bounds(domain: str) -> dict[str, tuple[int, int]]:
    """Character ranges ``[start, end)`` of every split of one domain."""
    text = full_text(domain)
    cut = _line_start_at_or_after(text, int(len(text) * (1.0 - HELDOUT_FRACTION)))
    calib_start = _line_start_at_or_after(text, max(0, cut - CALIB_CHARS))
    return {"train": (0, cut), "heldout": (cut, len(text)), "calib": (calib_start, cut)}


@lru_cache(maxsize=None)
def load_text(domain: str, split: str) -> str:
    """The text of one split of one domain, e.g. ``load_text("austen", "heldout")``."""
    _check_domain(domain)
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; known splits: {', '.join(SPLITS)}")
    start, end = split_bounds(domain)[split]
    return full_text(domain)[start:end]
