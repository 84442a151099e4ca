"""CPU tests of the batched fast path's host-side pieces: batch buckets, the left-padding check and the
batched decode roofline (``decode_bytes_per_step``). Kernels: tests/test_runtime_interp.py (interpreter) and
tests/test_runtime_batch_gpu.py (GPU)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from mxq.runtime import batch_bucket, decode_bytes_per_step, decode_bytes_per_token, left_padding  # noqa: E402


def test_batch_bucket():
    assert [batch_bucket(b) for b in (1, 2, 3, 5, 9, 17, 33, 64, 65, 200, 256, 257, 300)] == \
        [1, 2, 4, 8, 16, 24, 48, 64, 96, 224, 256, 320, 320]
    with pytest.raises(ValueError, match="batch size"):
        batch_bucket(0)


def test_left_padding_counts_and_refusals():
    ids = torch.zeros(3, 5, dtype=torch.long)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert left_padding(ids, mask).tolist() == [2, 0, 4]
    assert left_padding(ids, None).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="left padding"):
        left_padding(ids, torch.tensor([[1, 1, 1, 0, 1]] * 3))
    with pytest.raises(ValueError, match="no token"):
        left_padding(ids, torch.tensor([[0] * 5] * 3))
    with pytest.raises(ValueError, match="shape"):
        left_padding(ids, mask[:, :4])
    with pytest.raises(ValueError, match="only 0"):
        left_padding(ids, mask * 2)


def test_decode_bytes_per_step_batches(make_ckpt):
    """Batch 1 reads k experts per layer, like the batch-1 count; the expert bytes grow toward all E experts
    and stay below them; the KV bytes grow linearly with B; the dense weights do not grow."""
    import mxq

    model = mxq.load_model(make_ckpt("mxfp4", layers=2), dtype=torch.bfloat16)
    one = decode_bytes_per_token(model, 300)
    b1, b64, b4k = (decode_bytes_per_step(model, 300, b) for b in (1, 64, 4096))
    assert abs(b1["experts"] - one["experts"]) <= 2 and b1["kv_cache"] == one["kv_cache"]
    assert b1["experts"] < b64["experts"] < b4k["experts"]
    e, k = model.config.num_local_experts, model.config.num_experts_per_tok
    assert b4k["experts"] == pytest.approx(one["experts"] * e / k, rel=1e-3)
    assert b64["kv_cache"] == 64 * one["kv_cache"] and b64["attention"] == one["attention"]
    assert b64["total"] == sum(v for n, v in b64.items() if n != "total")
