"""GPU tests of batched, left-padded decode on the fast path (mxq.runtime); skipped without CUDA.

* Every expert format: a left-padded batch decoded greedily equals each prompt decoded alone (token ids; a
  row may only part at a bf16 near-tie of the per-sequence logits: ``tests/_batch_decode_check.py``), on
  the batch-1 GEMV kernels and on the grouped-GEMM path that large batches take, with prompts longer than
  the sliding window and than one decode key split (128).
* Sampling with padding: rows are independent draws (a padded row samples like the same prompt alone under
  the same seed is not guaranteed, the generator is shared), so only shape, range and per-row EOS handling.
* Batch buckets: sizes between buckets reuse one captured graph; the decode step of a 64-row batch at the
  runtime's own thresholds (grouped MoE) matches the GEMV path's logits.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _batch_decode_check import compare, greedy_with_logits, left_pad  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"
PATHS = {"gemv": (1 << 30, 1 << 30), "grouped": (0, 1)}


@pytest.fixture(autouse=True)
def _need_triton():
    pytest.importorskip("triton")


def _formats() -> list[str]:
    from mxq.formats import list_formats

    return ["mxfp4-stacked"] + [f for f in list_formats() if f != "mxfp4"] + ["mxfp4"]


def _model(make_ckpt, fmt: str):
    import mxq
    from mxq.plan import Plan, apply_

    model = mxq.load_model(make_ckpt("mxfp4", layers=2), device=DEV, dtype=torch.bfloat16)
    if fmt != "mxfp4-stacked":                    # "mxfp4" through a plan: per-expert MXFP4 on fmt_kernels
        cfg = model.config
        apply_(model, Plan.uniform(cfg.num_hidden_layers, cfg.num_local_experts, fmt))
    return model


def _rows(vocab: int, lengths=(7, 150, 300)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(2, vocab, (n,), generator=g).to(DEV) for n in lengths]


@pytest.mark.parametrize("fmt", _formats())
def test_padded_batch_equals_per_sequence(make_ckpt, fmt):
    from mxq.runtime import Runtime

    model = _model(make_ckpt, fmt)
    rt = Runtime(model)
    rows = _rows(model.config.vocab_size)
    for path, (dense_max, grouped_min) in PATHS.items():
        rt.dense_gemv_max_tokens, rt.moe_grouped_min_tokens = dense_max, grouped_min
        r = compare(rt, rows, 8)
        assert r["ok"], (path, r)


def test_batch_buckets_share_graph_and_paths_agree(make_ckpt):
    """B = 5 and 7 run in bucket 8 (one captured graph); a 64-row batch's logits on the grouped path (the
    runtime's default there) match the GEMV path's within 1e-2."""
    from mxq.runtime import Runtime, batch_bucket

    model = _model(make_ckpt, "mxfp4-stacked")
    rt = Runtime(model)
    vocab = model.config.vocab_size
    assert (batch_bucket(5), batch_bucket(7), batch_bucket(64), batch_bucket(300)) == (8, 8, 64, 320)
    ids5, m5 = left_pad(_rows(vocab, (40, 150, 300, 7, 201)))
    rt.generate(ids5, 3, attention_mask=m5)
    g = rt._states[8].graph
    ids7, m7 = left_pad(_rows(vocab, (9, 30, 2, 70, 5, 11, 100)))
    out = rt.generate(ids7, 3, attention_mask=m7)
    assert out.shape == (7, 103) and rt._states[8].graph is g
    gen = torch.Generator().manual_seed(9)
    rows = [torch.randint(2, vocab, (int(n),), generator=gen).to(DEV)
            for n in torch.randint(1, 200, (64,), generator=gen)]
    ids, mask = left_pad(rows)
    logits = {}
    for path, (dense_max, grouped_min) in {"default": (rt.dense_gemv_max_tokens, rt.moe_grouped_min_tokens),
                                           "gemv": PATHS["gemv"]}.items():
        rt.dense_gemv_max_tokens, rt.moe_grouped_min_tokens = dense_max, grouped_min
        rt._states.clear()
        _, lg = greedy_with_logits(rt, ids, mask, 2)
        logits[path] = lg
    err = ((logits["default"][:, 1] - logits["gemv"][:, 1]).norm() / logits["gemv"][:, 1].norm()).item()
    assert err < 1e-2, err


def test_sampling_and_eos_with_padding(make_ckpt):
    from mxq.runtime import fast_generate

    model = _model(make_ckpt, "mxfp4-stacked")
    ids, mask = left_pad(_rows(model.config.vocab_size))
    torch.manual_seed(0)
    out = fast_generate(model, ids, 20, attention_mask=mask, do_sample=True, temperature=0.9, top_p=0.9, top_k=50)
    assert out.shape == (3, ids.shape[1] + 20)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    assert int(out.min()) >= 0 and int(out.max()) < model.config.vocab_size
    greedy = fast_generate(model, ids, 20, attention_mask=mask)
    eos = int(greedy[1, ids.shape[1] + 4])                      # row 1 emits this token at step 5
    stopped = fast_generate(model, ids, 20, attention_mask=mask, eos_token_id=eos)
    new = stopped[:, ids.shape[1]:]
    first = (greedy[1, ids.shape[1]:] == eos).nonzero()[0].item()
    assert torch.equal(new[1, :first + 1], greedy[1, ids.shape[1]:ids.shape[1] + first + 1])
    assert (new[1, first:] == eos).all()


def test_padding_mask_errors(make_ckpt):
    from mxq.runtime import fast_generate

    model = _model(make_ckpt, "mxfp4-stacked")
    ids = torch.randint(2, 100, (2, 6), device=DEV)
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6], device=DEV)
    with pytest.raises(ValueError, match="left padding"):
        fast_generate(model, ids, 2, attention_mask=right)
    with pytest.raises(ValueError, match="shape"):
        fast_generate(model, ids, 2, attention_mask=right[:, :5])
