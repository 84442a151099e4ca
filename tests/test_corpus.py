"""The corpus splits: disjoint, covering, deterministic, and held-out text never inside train."""
from __future__ import annotations

import lzma

import pytest

from mxq.data import corpus
from mxq.data.corpus import DOMAINS, load_text, split_bounds


@pytest.mark.parametrize("domain", DOMAINS)
def test_splits_partition_the_file(domain: str) -> None:
    text = corpus.full_text(domain)
    b = split_bounds(domain)
    assert b["train"] == (0, b["heldout"][0])
    assert b["heldout"][1] == len(text)
    assert load_text(domain, "train") + load_text(domain, "heldout") == text
    # held-out is about the last 5%, starting at a line boundary
    frac = len(load_text(domain, "heldout")) / len(text)
    assert 0.045 < frac <= 0.05
    assert text[b["heldout"][0] - 1] == "\n"


@pytest.mark.parametrize("domain", DOMAINS)
def test_calib_is_a_tail_slice_of_train(domain: str) -> None:
    train, calib = load_text(domain, "train"), load_text(domain, "calib")
    assert train.endswith(calib)
    assert corpus.CALIB_CHARS - 200 < len(calib) <= corpus.CALIB_CHARS


@pytest.mark.parametrize("domain", DOMAINS)
def test_heldout_not_in_train(domain: str) -> None:
    train, held = load_text(domain, "train"), load_text(domain, "heldout")
    # every 400-character window of held-out text at 40 evenly spaced places is absent from train
    step = max(1, (len(held) - 400) // 40)
    for start in range(0, len(held) - 400, step):
        assert held[start:start + 400] not in train


def test_deterministic_from_the_shipped_bytes() -> None:
    for domain in DOMAINS:
        raw = lzma.decompress((corpus.CORPUS_DIR / f"{domain}.txt.xz").read_bytes()).decode("utf-8")
        cut = split_bounds(domain)["heldout"][0]
        assert raw[cut:] == load_text(domain, "heldout")


def test_sizes_and_notice() -> None:
    total = sum((corpus.CORPUS_DIR / f"{d}.txt.xz").stat().st_size for d in DOMAINS)
    assert total < 6_000_000
    notice = (corpus.CORPUS_DIR / "NOTICE").read_text()
    assert "Creative Commons Attribution 2.5" in notice and "Open Shakespeare" in notice


def test_unknown_domain_or_split() -> None:
    with pytest.raises(ValueError, match="unknown corpus domain"):
        load_text("wikipedia", "train")
    with pytest.raises(ValueError, match="unknown corpus split"):
        load_text("austen", "test")
