"""``python -m mxq.data.nextsent_baseline``: what the next-unit task gives away without a language model.

Why: a multiple-choice accuracy only means something beside its floor and its easy ceiling. Chance is 25%;
this module measures two baselines that read no model at all, on the committed ``evals/tiny_nextsent``
items, so a model's score can be placed between them:

* ``tfidf``: pick the choice whose TF-IDF vector is closest (cosine) to the context's, the classic
  lexical-overlap baseline of sentence-ordering and story-cloze work (e.g. Mostafazadeh et al. 2016,
  "A Corpus and Cloze Evaluation for Deeper Understanding of Commonsense Stories", section 5). It shows how
  far the context alone (shared names, rare words) decides an item.
* ``longest``: pick the longest choice, which shows whether answer length gives the label away (the
  distractors are drawn at 0.5x-2x the answer's length, ``mxq.data.eval_items``).

Document frequencies come from the *train* split (``mxq.data.corpus``), never from the held-out text the
items were cut from, and nothing here is tuned on the items: the scores are fixed before they are seen.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from mxq.data.corpus import DOMAINS, load_text
from mxq.data.evals import EVALS_DIR
from mxq.data.floor_cli import floor_main

WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-case word tokens; punctuation, digits and verse numbers are dropped."""
    return WORD.findall(text.lower())


@lru_cache(maxsize=None)
def train_idf(domain: str, chunk_chars: int = 2000) -> dict[str, float]:
    """Smoothed inverse document frequency over ``chunk_chars`` pieces of the domain's train split.

    ``idf(w) = log((1 + D) / (1 + df(w))) + 1`` (the smoothed form of scikit-learn's TfidfTransformer), so a
    word never seen in training gets the largest weight rather than a division by zero.
    """
    text = load_text(domain, "train")
    docs = [set(words(text[i:i + chunk_chars])) for i in range(0, len(text), chunk_chars)]
    df: Counter[str] = Counter()
    for d in docs:
        df.update(d)
    n = len(docs)
    return {w: math.log((1 + n) / (1 + c)) + 1.0 for w, c in df.items()} | {"": math.log(1 + n) + 1.0}


def _tfidf(text: str, idf: dict[str, float]) -> dict[str, float]:
    tf = Counter(words(text))
    unseen = idf[""]
    return {w: c * idf.get(w, unseen) for w, c in tf.items()}


def cosine(a: dict[str, float], b: dict[str, float]) -> float:
    """Cosine similarity of two sparse vectors; 0 when either is empty."""
    dot = sum(v * b[w] for w, v in a.items() if w in b)
    na, nb = math.sqrt(sum(v * v for v in a.values())), math.sqrt(sum(v * v for v in b.values()))
    return dot / (na * nb) if na and nb else 0.0


def score_tfidf(item: dict[str, Any], idf: dict[str, float]) -> list[float]:
    ctx = _tfidf(item["context"], idf)
    return [cosine(ctx, _tfidf(c, idf)) for c in item["choices"]]


def score_longest(item: dict[str, Any], idf: dict[str, float]) -> list[float]:
    return [float(len(c)) for c in item["choices"]]


# name -> scorer(item, idf) -> one score per choice (higher = picked)
BASELINES: dict[str, Callable[[dict[str, Any], dict[str, float]], list[float]]] = {
    "tfidf": score_tfidf,
    "longest": score_longest,
}


def accuracy(items: Iterable[dict[str, Any]], scorer: Callable[..., list[float]], idf: dict[str, float]) -> float:
    """Share of items whose highest-scoring choice is the label; ties go to the first choice (like argmax)."""
    hits = n = 0
    for it in items:
        s = scorer(it, idf)
        hits += int(max(range(len(s)), key=s.__getitem__) == it["label"])
        n += 1
    if not n:
        raise ValueError("no items to score")
    return hits / n


def load_items(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read next-unit items from {path}: {e}") from e


def measure(evals_dir: Path = EVALS_DIR) -> dict[str, Any]:
    """Accuracy of every baseline per domain and its unweighted mean over domains (like the lm-eval group)."""
    per: dict[str, dict[str, float]] = {name: {} for name in BASELINES}
    for d in DOMAINS:
        items, idf = load_items(evals_dir / "tiny_nextsent" / f"{d}.jsonl"), train_idf(d)
        for name, scorer in BASELINES.items():
            per[name][d] = accuracy(items, scorer, idf)
    return {name: {"per_domain": acc, "mean": sum(acc.values()) / len(acc)} for name, acc in per.items()}


def main(argv: list[str] | None = None) -> int:
    return floor_main("python -m mxq.data.nextsent_baseline", __doc__.splitlines()[0], measure, EVALS_DIR, argv)


if __name__ == "__main__":
    raise SystemExit(main())
