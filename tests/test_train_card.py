"""``python -m mxq.train.card``: a missing optional dependency is named with its install command."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mxq.train import card


def test_hflm_without_its_import_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lm_eval")
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", None)    # import now raises ImportError
    with pytest.raises(SystemExit, match=r"pip install -e '\.\[card\]'"):
        card.part_lmeval("tiny", "cpu", 1, 1, ["hflm"], ["tiny_nextsent"], tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()
