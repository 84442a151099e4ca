"""The no-model baselines of the next-unit task: they score what they claim to, and run on the shipped items."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mxq.data import nextsent_baseline as nb
from mxq.data.corpus import DOMAINS

IDF = {"the": 1.0, "and": 1.0, "elinor": 5.0, "marianne": 5.0, "rain": 4.0, "": 6.0}


def _item(context: str, choices: list[str], label: int) -> dict:
    return {"context": context, "choices": choices, "label": label}


def test_tfidf_prefers_the_choice_sharing_rare_words() -> None:
    it = _item("Elinor and the rain.", ["And the door.", "Marianne and the cat.", "Elinor in the rain.",
                                         "The and the."], 2)
    s = nb.score_tfidf(it, IDF)
    assert max(range(4), key=s.__getitem__) == 2
    assert s[1] < s[2] and s[0] < s[2]
    assert nb.accuracy([it], nb.score_tfidf, IDF) == 1.0
    assert nb.accuracy([{**it, "label": 1}], nb.score_tfidf, IDF) == 0.0


def test_unseen_words_weigh_most_and_empty_vectors_score_zero() -> None:
    ctx = nb._tfidf("zyzzyva and the", IDF)
    assert ctx["zyzzyva"] == IDF[""] > ctx["and"]
    assert nb.cosine({}, ctx) == 0.0 == nb.cosine(ctx, {})
    assert nb.cosine(ctx, ctx) == pytest.approx(1.0)


def test_ties_go_to_the_first_choice_and_longest_reads_length() -> None:
    it = _item("nothing shared", ["a b", "c d", "e f g h", "i"], 0)
    assert nb.accuracy([it], nb.score_tfidf, IDF) == 1.0          # all cosines 0: argmax takes choice 0
    assert nb.accuracy([{**it, "label": 2}], nb.score_longest, IDF) == 1.0


def test_no_items_and_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no items"):
        nb.accuracy([], nb.score_tfidf, IDF)
    bad = tmp_path / "x.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="x.jsonl"):
        nb.load_items(bad)


def test_measure_on_the_shipped_items_writes_json_atomically(tmp_path: Path) -> None:
    out = tmp_path / "baseline.json"
    assert nb.main(["--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res) == set(nb.BASELINES)
    for r in res.values():
        assert set(r["per_domain"]) == set(DOMAINS)
        assert all(0.0 <= v <= 1.0 for v in r["per_domain"].values())
        assert r["mean"] == pytest.approx(sum(r["per_domain"].values()) / len(DOMAINS))
    # the idf never comes from held-out text: it is built from the train split alone
    assert "elinor" in nb.train_idf("austen") and not list(tmp_path.glob("*.tmp"))
