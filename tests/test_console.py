"""Quiet by default: inside ``quiet_libraries`` other libraries' INFO logs and progress bars are off, lm-eval
skips its ``git describe``, and everything is restored afterwards; ``verbose`` leaves them alone."""
from __future__ import annotations

import logging

import pytest

from mxq.console import StageDisplay, lm_eval_quiet, quiet, quiet_libraries


def test_quiet_restores_levels_and_patches():
    import lm_eval.api.model
    import lm_eval.evaluator

    lg = logging.getLogger("lm_eval")
    lg.setLevel(logging.INFO)
    orig_tqdm, orig_git = lm_eval.api.model.tqdm, lm_eval.evaluator.get_git_commit_hash
    assert not quiet()
    with quiet_libraries():
        assert quiet() and lg.level == logging.WARNING
        with lm_eval_quiet():
            assert lm_eval.evaluator.get_git_commit_hash() is None
            bar = lm_eval.api.model.tqdm(range(3), disable=False)      # the caller's disable=False is overruled
            assert bar.disable
        assert lm_eval.api.model.tqdm is orig_tqdm
    assert not quiet() and lg.level == logging.INFO
    assert lm_eval.evaluator.get_git_commit_hash is orig_git


def test_verbose_changes_nothing():
    import lm_eval.api.model

    lg = logging.getLogger("datasets")
    lg.setLevel(logging.INFO)
    with quiet_libraries(verbose=True), lm_eval_quiet():
        assert not quiet() and lg.level == logging.INFO
        assert not lm_eval.api.model.tqdm(range(1), disable=False).disable


def test_stage_display_reports_failures(capsys):
    d = StageDisplay()
    with d.stage("load"):
        sum(range(200_000))
    with pytest.raises(ValueError), d.stage("stats"):
        raise ValueError("boom")
    d.skipped("plan")
    err = capsys.readouterr().err
    assert "✓ load" in err and "x stats" in err and "failed" in err and "- plan      off" in err
