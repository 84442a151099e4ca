"""The speed stage records which code path it measured (``speed.code_path``) and, when the fast runtime is not
used, why (``speed.fallback_reason``); on the CPU it measures the reference torch path. (On CUDA it picks the
fast runtime: tests/test_runtime_sampling_gpu.py.)"""
from __future__ import annotations

import pytest
import torch

import mxq
from mxq.evaluate.metrics import DEFAULT_PATH
from mxq.evaluate.speed import FAST_PATH, choose_runtime, speed_report

CFG = {"contexts": [4], "new_tokens": 3, "repeats": 1, "warmup": 0, "modes": ["greedy", "sample"], "top_p": 0.9}


@pytest.fixture(scope="module")
def model(make_ckpt):
    return mxq.load_model(make_ckpt("mxfp4", layers=1, num_local_experts=8), dtype=torch.float32)


def test_fast_path_constant_is_the_runtime_s():
    from mxq.runtime import RUNTIME_PATH

    assert FAST_PATH == RUNTIME_PATH


def test_cpu_measures_the_reference_path_and_says_why(model):
    rep = speed_report(model, CFG, progress=False)
    assert rep["code_path"] == DEFAULT_PATH == rep["precision"]["path"]
    assert rep["runtime_requested"] == "auto"
    assert "needs a CUDA GPU" in rep["fallback_reason"] and "cpu" in rep["fallback_reason"]
    assert rep["peak_allocated_bytes"] is None
    assert set(rep["by_setting"]) == {"greedy@4", "sample@4"} and rep["decode_tokens_per_s"] > 0
    assert "_mxq_runtime" not in model.__dict__ and not hasattr(model, "runtime_path")
    # the batch sweep (speed.batch_sizes) needs the fast runtime: empty here, and it says why
    assert rep["by_batch"] == {} and rep["batch_decode_tokens_per_s_max"] is None
    assert "fast runtime only" in rep["batch_sweep_skipped"] and "cpu" in rep["batch_sweep_skipped"]


def test_asking_for_the_fast_path_where_it_cannot_run_falls_back_with_the_reason(model):
    """runtime=fast on a CPU model: the runtime raises UnsupportedModel (no CUDA, fp32, or no triton); the
    stage measures the reference path and records the refusal instead of failing."""
    rep = speed_report(model, {**CFG, "runtime": "fast"}, progress=False)
    assert rep["code_path"] == DEFAULT_PATH and rep["runtime_requested"] == "fast"
    assert rep["fallback_reason"].startswith("UnsupportedModel: ")
    assert "_mxq_runtime" not in model.__dict__ and not hasattr(model, "runtime_path")


def test_reference_on_request_and_bad_values(model):
    rt, path, reason = choose_runtime(model, "reference")
    assert rt is None and path == DEFAULT_PATH and "reference" in reason
    model.runtime_path = FAST_PATH            # a runtime's mark: forward() is still the reference path
    try:
        assert choose_runtime(model, "reference")[1] == DEFAULT_PATH
    finally:
        del model.runtime_path
    with pytest.raises(ValueError, match="speed.runtime"):
        choose_runtime(model, "turbo")


def test_report_and_summary_name_the_code_path(model, tmp_path):
    from mxq.evaluate.report import _speed_md, summary_rows

    rep = speed_report(model, CFG, progress=False)
    md = _speed_md(rep)
    assert f"Code path: `{DEFAULT_PATH}`" in md and "fast runtime not used: model on cpu" in md
    assert ("speed code path", DEFAULT_PATH) in summary_rows({"speed": rep})


def test_a_failing_fast_runtime_costs_only_its_own_numbers(model, monkeypatch):
    """runtime=auto: an error inside the fast runtime (a kernel that does not compile, a capture error) is
    recorded and the reference path measured instead; runtime=fast re-raises it."""
    import mxq.evaluate.speed as S

    class Broken:
        path = FAST_PATH

        def state_for(self, *a):
            raise RuntimeError("boom in the kernel")

    monkeypatch.setattr(S, "choose_runtime", lambda m, want: (Broken(), FAST_PATH, None))
    rep = S.speed_report(model, CFG, progress=False)
    assert rep["code_path"] == DEFAULT_PATH == rep["precision"]["path"] and rep["decode_tokens_per_s"] > 0
    assert "fast runtime failed" in rep["fallback_reason"]
    assert "RuntimeError: boom in the kernel" in rep["fallback_reason"]
    with pytest.raises(RuntimeError, match="boom"):
        S.speed_report(model, {**CFG, "runtime": "fast"}, progress=False)
