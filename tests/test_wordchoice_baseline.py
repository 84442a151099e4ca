"""The no-model floors of the word-choice task: each scorer reads what it claims, and the cues the distractors
are matched on (frequency, occurring in the context) stay near chance on the shipped items."""
from __future__ import annotations

import pytest

from mxq.data import wordchoice_baseline as wb
from mxq.data.corpus import DOMAINS
from mxq.data.evals import EVALS_DIR
from mxq.data.nextsent_baseline import accuracy, load_items


def _item(context: str, choices: list[str], label: int) -> dict:
    return {"context": context, "choices": choices, "label": label}


def test_context_count_and_bigram_read_what_they_claim(monkeypatch) -> None:
    it = _item("the cat sat on the mat and the cat", [" dog", " cat", " mat", " sat"], 1)
    assert wb.score_context_count(it, "austen") == [0.0, 2.0, 1.0, 1.0]
    pairs = {("cat", "sat"): 5, ("cat", "dog"): 1}
    monkeypatch.setattr(wb, "train_bigrams", lambda d: (wb.Counter(pairs), wb.Counter({"cat": 6}), 10))
    s = wb.score_bigram(it, "austen")                   # previous word "cat": P(sat | cat) is the largest
    assert max(range(4), key=s.__getitem__) == 3 and s[0] == pytest.approx(2 / 16) and s[1] == pytest.approx(1 / 16)


def test_matched_cues_stay_near_chance_on_the_shipped_items() -> None:
    for d in DOMAINS:
        items = load_items(EVALS_DIR / "tiny_wordchoice" / f"{d}.jsonl")
        assert len(items) == 200
        assert accuracy(items, wb.score_context_count, d) < 0.36        # in-context status matched
        if d == "austen":                                               # one domain: train counts take seconds
            assert accuracy(items, wb.score_unigram, d) < 0.33          # frequency-matched distractors
