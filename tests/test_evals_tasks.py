"""The local lm-eval tasks: they load and build instances, are reproducible, and use held-out text only."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mxq.data import build_evals, eval_items
from mxq.data.corpus import DOMAINS, load_text
from mxq.data.evals import EVALS_DIR, task_manager

FAMILIES = tuple(build_evals.FAMILIES)
SIZES = {"tiny_ppl": eval_items.PPL_DOCS, "tiny_cloze": eval_items.CLOZE_ITEMS,
         "tiny_wordchoice": eval_items.CLOZE_ITEMS, "tiny_nextsent": eval_items.MC_ITEMS}
# instances per document: one rolling request, one loglikelihood request, one per choice (word choice), two
# per choice (next unit: acc_mutual_info needs the unconditional log-likelihood too)
PER_DOC = {"tiny_ppl": 1, "tiny_cloze": 1, "tiny_wordchoice": 4, "tiny_nextsent": 8}


def _items(family: str, domain: str) -> list[dict]:
    path = EVALS_DIR / family / f"{domain}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict:
    # load from another working directory: data paths must not depend on the cwd
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("elsewhere"))
    try:
        return task_manager().load(["tiny_all", "tiny_wordchoice", "tiny_nextsent"])   # the last two: not in tiny_all
    finally:
        os.chdir(cwd)


def test_every_task_and_group_is_indexed() -> None:
    tm = task_manager()
    for family in FAMILIES:
        assert family in tm.all_groups
        for domain in DOMAINS:
            assert f"{family}_{domain}" in tm.all_subtasks
    assert "tiny_all" in tm.all_groups


@pytest.mark.parametrize("family", FAMILIES)
def test_tasks_build_instances(loaded: dict, family: str) -> None:
    for domain in DOMAINS:
        task = loaded["tasks"][f"{family}_{domain}"]
        assert task.config.metadata["version"] == 1.0
        docs = list(task.test_docs())
        assert len(docs) == SIZES[family]
        task.build_all_requests(limit=None, rank=0, world_size=1)
        assert len(task.instances) == SIZES[family] * PER_DOC[family]
        req = task.instances[0].args
        if family == "tiny_cloze":
            context, target = req
            assert target.startswith(" ") and target[1:].isalpha()
        elif family in ("tiny_nextsent", "tiny_wordchoice"):
            assert req[1] in docs[0]["choices"]


@pytest.mark.parametrize("family", FAMILIES)
def test_items_are_heldout_text_only(family: str) -> None:
    for domain in DOMAINS:
        held = eval_items.normalize(load_text(domain, "heldout"))
        for it in _items(family, domain):
            if family == "tiny_ppl":
                texts = [it["text"]]
            elif family == "tiny_cloze":
                texts = [it["context"] + it["target"]]
            else:
                texts = [it["context"] + it["choices"][it["label"]]] + it["choices"]
            for text in texts:
                norm = eval_items.normalize(text)
                assert norm in held, (it["id"], text[:80])
            assert not eval_items.seen_in_train(domain, texts[0]), it["id"]


@pytest.mark.parametrize("family", ["tiny_nextsent", "tiny_wordchoice"])
def test_mc_labels_are_balanced_and_distractors_distinct(family: str) -> None:
    for domain in DOMAINS:
        items = _items(family, domain)
        counts = [sum(it["label"] == k for it in items) for k in range(4)]
        assert min(counts) >= 30, counts
        for it in items:
            assert len(set(it["choices"])) == 4


def test_wordchoice_distractors_match_the_target_cues() -> None:
    """Capitalisation and in-context status match the answer's (where the pool allows), so neither gives it away."""
    for domain in DOMAINS:
        items = _items("tiny_wordchoice", domain)
        cloze = {it["offset"]: it for it in _items("tiny_cloze", domain)}
        matched = 0
        for it in items:
            answer = it["choices"][it["label"]]
            assert cloze[it["offset"]]["target"] == answer and cloze[it["offset"]]["context"] == it["context"]
            seen = eval_items.context_words(it["context"])
            others = [c for k, c in enumerate(it["choices"]) if k != it["label"]]
            assert all(c[1].isupper() == answer[1].isupper() for c in others), it["id"]
            matched += all((c.strip() in seen) == (answer.strip() in seen) for c in others)
        assert matched >= 0.95 * len(items), (domain, matched)


def test_builder_is_deterministic(tmp_path: Path) -> None:
    for path in build_evals.build(tmp_path):
        rel = path.relative_to(tmp_path)
        assert path.read_bytes() == (EVALS_DIR / rel).read_bytes(), rel
