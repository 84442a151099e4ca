"""``python -m mxq.data.wordchoice_baseline``: what the word-choice task gives away without a neural model.

A 4-way accuracy means something only beside its floors. Chance is 25%; the distractors of
``mxq.data.eval_items.wordchoice_items`` are matched to the target in capitalisation, in whether they occur
in the context, and in train-split frequency, and this module measures readings that use exactly those
cues, plus one that uses word order, on the committed ``evals/tiny_wordchoice`` items:

* ``unigram``: the candidate most frequent in the domain's train split (frequency matching should hold it
  near chance).
* ``context_count``: the candidate that occurs most often in the context (the copy cue; ties, e.g. none
  occurring, go to the first choice like an argmax).
* ``bigram``: the candidate with the highest add-one-smoothed bigram probability P(word | previous word)
  counted on the train split: a count-based language model of one word of context (Jurafsky & Martin,
  "Speech and Language Processing", 3rd ed., ch. 3). A neural model that does not beat it reads no more
  than the previous word.

Counts come from the *train* split only; nothing is tuned on the items.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from mxq.data.corpus import DOMAINS, load_text
from mxq.data.eval_items import train_word_counts
from mxq.data.evals import EVALS_DIR
from mxq.data.floor_cli import floor_main
from mxq.data.nextsent_baseline import accuracy, load_items

WORD = re.compile(r"[A-Za-z]+")


@lru_cache(maxsize=None)
def train_bigrams(domain: str) -> tuple[Counter[tuple[str, str]], Counter[str], int]:
    """Case-sensitive (previous word, word) counts, previous-word counts and vocabulary size of the train split."""
    w = WORD.findall(load_text(domain, "train"))
    return Counter(zip(w, w[1:])), Counter(w[:-1]), len(set(w))


def score_unigram(item: dict[str, Any], domain: str) -> list[float]:
    counts = train_word_counts(domain)
    return [float(counts.get(c.strip(), 0)) for c in item["choices"]]


def score_context_count(item: dict[str, Any], domain: str) -> list[float]:
    ctx = Counter(WORD.findall(item["context"]))
    return [float(ctx[c.strip()]) for c in item["choices"]]


def score_bigram(item: dict[str, Any], domain: str) -> list[float]:
    pairs, prev_counts, vocab = train_bigrams(domain)
    prev = WORD.findall(item["context"])
    p = prev[-1] if prev else ""
    return [(pairs[(p, c.strip())] + 1) / (prev_counts[p] + vocab) for c in item["choices"]]


# name -> scorer(item, domain) -> one score per choice (higher = picked)
BASELINES: dict[str, Callable[[dict[str, Any], str], list[float]]] = {
    "unigram": score_unigram,
    "context_count": score_context_count,
    "bigram": score_bigram,
}


def measure(evals_dir: Path = EVALS_DIR) -> dict[str, Any]:
    """Accuracy of every floor per domain and its unweighted mean over domains (like the lm-eval group)."""
    per: dict[str, dict[str, float]] = {name: {} for name in BASELINES}
    for d in DOMAINS:
        items = load_items(evals_dir / "tiny_wordchoice" / f"{d}.jsonl")
        for name, scorer in BASELINES.items():
            per[name][d] = accuracy(items, scorer, d)
    return {name: {"per_domain": acc, "mean": sum(acc.values()) / len(acc)} for name, acc in per.items()}


def main(argv: list[str] | None = None) -> int:
    return floor_main("python -m mxq.data.wordchoice_baseline", __doc__.splitlines()[0], measure, EVALS_DIR, argv)


if __name__ == "__main__":
    raise SystemExit(main())
