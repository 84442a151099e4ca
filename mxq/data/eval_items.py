"""Evaluation items cut from the held-out split, deterministically (fixed string seeds, sorted output).

Three item kinds per domain, each a list of JSON-ready dicts:

* perplexity documents: ``PPL_DOCS`` contiguous pieces of held-out text, evenly spaced, each starting at a
  line start and ending at the first line end after ``PPL_MIN_CHARS`` characters (at a word boundary where
  a line is very long: the glossary at the end of the World English Bible is one 17 KB line). 1.6 KB instead of a
  round 2 KB keeps every document under ~512 tokens of the embedded tokenizer, the model's training length.
* cloze items (LAMBADA-like): a word of 3+ letters that ends a clause (followed by . ! ? or ;), preceded by
  a space; the context is the original text from the line start 400-800 characters before it (from a
  word start ~400 characters before it inside very long lines). The model must produce `` word`` greedily.
* next-unit multiple choice: the context is 2-4 consecutive units of one group (``mxq.data.units``), the
  answer the next unit, the 3 distractors are units of the same domain's held-out text at least 8 units
  away, of similar length (0.5x-2x), so that length alone does not give the answer away.
* word choice (cloze among candidates): the cloze items' contexts and target words, with 3 distractor
  words that also end a clause somewhere in the domain's held-out text, chosen so that no reading without
  a model gives the answer away: the same capitalisation, the same "occurs in the context" status as the
  target, and the nearest train-split frequency (``WORDCHOICE_NEAREST`` closest in log frequency, 3 drawn).
  The model's choice is the candidate it scores highest, so a 4-way comparison of log-likelihoods measures
  the damage compression does to next-word prediction with far less noise than greedy exact match.

Every item whose text (whitespace-normalised) also occurs in the domain's train split is skipped, so
nothing here was trained on (``tests/test_evals_tasks.py`` re-checks the written files).
"""
from __future__ import annotations

import math
import random
import re
from functools import lru_cache
from typing import Any

from mxq.data.corpus import load_text
from mxq.data.units import UNITS, Unit, choice_text, render

PPL_DOCS = 20
PPL_MIN_CHARS = 1600
CLOZE_ITEMS = 200
CLOZE_CONTEXT = 400
MC_ITEMS = 200
MC_CONTEXT_UNITS = (2, 4)        # at least / at most this many context units
MC_MIN_GAP = 8                   # distractors lie at least this many units away from the answer
UNIT_CHARS = (15, 300)           # units usable as answers or distractors
WORDCHOICE_NEAREST = 8           # distractors are drawn from this many candidates nearest in train frequency

Item = dict[str, Any]


def normalize(text: str) -> str:
    """Collapse all whitespace runs to one space: line wrapping must not hide a copy in train."""
    return " ".join(text.split())


@lru_cache(maxsize=None)
def _train_normalized(domain: str) -> str:
    return normalize(load_text(domain, "train"))


def seen_in_train(domain: str, text: str) -> bool:
    """True if ``text`` (whitespace-normalised) occurs anywhere in the domain's train split."""
    return normalize(text) in _train_normalized(domain)


def _boundary(text: str, pos: int) -> int:
    """The first line start after ``pos``, or the first word start if no line starts within 400 chars."""
    nl = text.find("\n", pos, pos + 400)
    if nl >= 0:
        while nl < len(text) and text[nl] == "\n":
            nl += 1
        return nl
    sp = text.find(" ", pos)
    return len(text) if sp < 0 else sp + 1


def ppl_docs(domain: str) -> list[Item]:
    """Evenly spaced ~1.6 KB documents for rolling-loglikelihood perplexity."""
    text = load_text(domain, "heldout")
    docs: list[Item] = []
    for k in range(PPL_DOCS):
        start = 0 if k == 0 else _boundary(text, k * len(text) // PPL_DOCS)
        doc = text[start:_boundary(text, start + PPL_MIN_CHARS)].rstrip()
        if seen_in_train(domain, doc):
            raise RuntimeError(f"{domain} perplexity document at {start} occurs in the train split")
        docs.append({"id": f"{domain}-ppl-{k:02d}", "offset": start, "text": doc})
    return docs


_CLOZE_WORD = re.compile(r"(?<=[A-Za-z,;]) ([A-Za-z]{3,})(?=[.!?;])")


def _context_start(text: str, pos: int) -> int:
    """A line start 400-800 characters before ``pos``; a word start ~400 before if no line starts there."""
    lo = pos - CLOZE_CONTEXT
    nl = text.rfind("\n", max(0, lo - 400), lo)
    return nl + 1 if nl >= 0 else text.rfind(" ", 0, lo) + 1


def cloze_items(domain: str) -> list[Item]:
    """Last-word cloze items: ``context`` + ``target`` (= " word") is the original held-out text."""
    return [dict(it) for it in _cloze_items(domain)]


@lru_cache(maxsize=None)
def _cloze_items(domain: str) -> tuple[Item, ...]:
    text = load_text(domain, "heldout")
    cands = [m for m in _CLOZE_WORD.finditer(text) if m.start() >= CLOZE_CONTEXT]
    rng = random.Random(f"mxq-cloze-{domain}")
    items: list[Item] = []
    for m in rng.sample(cands, len(cands)):
        start = _context_start(text, m.start())
        context, target = text[start:m.start()], " " + m.group(1)
        if seen_in_train(domain, context + target):
            continue
        items.append({"offset": m.start(), "context": context, "target": target})
        if len(items) == CLOZE_ITEMS:
            break
    items.sort(key=lambda it: it["offset"])
    return tuple({"id": f"{domain}-cloze-{i:03d}", **it} for i, it in enumerate(items))


def _usable(u: Unit) -> bool:
    return UNIT_CHARS[0] <= len(u.text) <= UNIT_CHARS[1]


def _context(units: list[Unit], i: int) -> list[Unit]:
    """Up to MC_CONTEXT_UNITS[1] units right before ``i`` in the same group."""
    ctx: list[Unit] = []
    j = i - 1
    while j >= 0 and len(ctx) < MC_CONTEXT_UNITS[1] and units[j].group == units[i].group:
        ctx.insert(0, units[j])
        j -= 1
    return ctx


def _distractors(units: list[Unit], pool: list[int], i: int, rng: random.Random) -> list[Unit]:
    n = len(units[i].text)
    far = [j for j in pool if abs(j - i) >= MC_MIN_GAP and units[j].text != units[i].text]
    similar = [j for j in far if n / 2 <= len(units[j].text) <= 2 * n]
    chosen = rng.sample(similar if len(similar) >= 3 else far, 3)
    return [units[j] for j in chosen]


def nextsent_items(domain: str) -> list[Item]:
    """4-way next-unit items: ``choices[label]`` is the true continuation of ``context``."""
    units = UNITS[domain](load_text(domain, "heldout"))
    pool = [j for j, u in enumerate(units) if _usable(u)]
    eligible = [i for i in pool if len(_context(units, i)) >= MC_CONTEXT_UNITS[0]]
    rng = random.Random(f"mxq-nextsent-{domain}")
    items: list[Item] = []
    for i in rng.sample(eligible, len(eligible)):
        ctx = _context(units, i)
        first = i - len(ctx)
        context, answer = render(domain, ctx, units[i], first == 0 or units[first - 1].group != units[i].group)
        if seen_in_train(domain, context + answer):
            continue
        choices = [choice_text(domain, u) for u in _distractors(units, pool, i, rng)]
        label = rng.randrange(4)
        choices.insert(label, answer)
        items.append({"unit": i, "offset": units[i].offset, "context": context, "choices": choices,
                      "label": label})
        if len(items) == MC_ITEMS:
            break
    items.sort(key=lambda it: it.pop("unit"))
    return [{"id": f"{domain}-nextsent-{k:03d}", **it} for k, it in enumerate(items)]


_WORD = re.compile(r"[A-Za-z]+")


@lru_cache(maxsize=None)
def train_word_counts(domain: str) -> dict[str, int]:
    """Case-sensitive counts of alphabetic words in the domain's train split."""
    counts: dict[str, int] = {}
    for w in _WORD.findall(load_text(domain, "train")):
        counts[w] = counts.get(w, 0) + 1
    return counts


def context_words(context: str) -> set[str]:
    """The alphabetic words of ``context`` (case-sensitive): a word "occurs in the context" iff it is here."""
    return set(_WORD.findall(context))


def _wordchoice_distractors(target: str, context: str, pool: list[str], counts: dict[str, int],
                            rng: random.Random) -> list[str]:
    """3 pool words matching the target's capitalisation and in-context status, nearest in train frequency."""
    seen = context_words(context)
    cap, inside = target[0].isupper(), target in seen
    others = [w for w in pool if w.lower() != target.lower() and w[0].isupper() == cap]
    same = [w for w in others if (w in seen) == inside]
    cands = same if len(same) >= 3 else others
    f = math.log1p(counts.get(target, 0))
    near = sorted(cands, key=lambda w: (abs(math.log1p(counts.get(w, 0)) - f), w))[:WORDCHOICE_NEAREST]
    return rng.sample(near, 3)


def wordchoice_items(domain: str) -> list[Item]:
    """4-way word-choice items: ``choices[label]`` (`` word``) is the word that follows ``context``."""
    text = load_text(domain, "heldout")
    pool = sorted({m.group(1) for m in _CLOZE_WORD.finditer(text)})
    counts = train_word_counts(domain)
    rng = random.Random(f"mxq-wordchoice-{domain}")
    items: list[Item] = []
    for it in cloze_items(domain):
        target = it["target"].strip()
        choices = [" " + w for w in _wordchoice_distractors(target, it["context"], pool, counts, rng)]
        label = rng.randrange(4)
        choices.insert(label, it["target"])
        items.append({"id": it["id"].replace("-cloze-", "-wordchoice-"), "offset": it["offset"],
                      "context": it["context"], "choices": choices, "label": label})
    return items
