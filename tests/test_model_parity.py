"""Logit parity with transformers' GptOssForCausalLM on the same folder (float32), padding, KV cache.

Tolerance reached: max |logit difference| below 1e-4 (measured ~3e-6) in float32, on sequences longer
than the sliding window, for MXFP4 (dequantized by transformers) and bf16 expert checkpoints.
"""
from __future__ import annotations

import pytest
import torch

import mxq

TOL = 1e-4


def hf_model(path):
    from transformers import GptOssForCausalLM, Mxfp4Config

    kw = {}
    if (path / "config.json").read_text().find("mxfp4") >= 0:
        kw["quantization_config"] = Mxfp4Config(dequantize=True)
    m = GptOssForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    return m.eval()


@pytest.fixture(scope="module", params=["mxfp4", "bf16"])
def pair(request, make_ckpt):
    path = make_ckpt(request.param)
    return mxq.load_model(path, dtype=torch.float32), hf_model(path)


def test_long_sequence_matches_transformers(pair):
    ours, ref = pair
    ids = torch.randint(0, ours.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(1))
    assert ours.config.sliding_window < 300
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    assert (a - b).abs().max().item() < TOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_transformers_and_unpadded(pair, side):
    ours, ref = pair
    g = torch.Generator().manual_seed(2)
    lens = [150, 97]
    T = max(lens)
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    rows = [torch.randint(2, ours.config.vocab_size, (n,), generator=g) for n in lens]
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = ref(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            single = ours(r[None]).logits[0]
            assert (a[i, sl] - single).abs().max().item() < TOL
            assert (a[i, sl] - b[i, sl]).abs().max().item() < TOL
    assert torch.isfinite(a).all()


def test_incremental_decoding_equals_full_forward(pair):
    ours, _ = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 160), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(ids).logits
        cache = ours.new_cache(2, 160)
        parts = [ours(ids[:, :100], cache=cache).logits]
        for t in range(100, 160):
            parts.append(ours(ids[:, t:t + 1], cache=cache).logits)
    assert (torch.cat(parts, 1) - full).abs().max().item() < TOL


def test_last_position_logits_equal_the_full_forwards_last_column(pair):
    """``logits="last"`` (what generate's prefill asks for) is the last column of the full logits (to rounding),
    with a cache too; a value other than True / False / "last" is refused."""
    ours, _ = pair
    ids = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = ours(ids).logits                                                    # [2, 40, V]
        last = ours(ids, logits="last").logits                                     # [2, 1, V]
        cached = ours(ids, cache=ours.new_cache(2, 48), logits="last").logits
    assert last.shape == (2, 1, full.shape[-1])
    assert (last[:, 0] - full[:, -1]).abs().max().item() < TOL     # a 1-row matmul may block differently
    assert (cached - last).abs().max().item() < TOL
    with pytest.raises(ValueError, match="logits"):
        ours(ids, logits="first")


def test_generate_greedy_matches_transformers(pair):
    ours, ref = pair
    ids = torch.randint(0, ours.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4))
    a = ours.generate(ids, max_new_tokens=12)
    b = ref.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(a, b)


def test_generate_left_padded_batch_matches_single_rows(make_ckpt):
    m = mxq.load_model(make_ckpt("mxfp4"), dtype=torch.float32)
    r0, r1 = torch.arange(10, 30), torch.arange(40, 52)
    ids = torch.zeros(2, 20, dtype=torch.long)
    mask = torch.zeros(2, 20, dtype=torch.long)
    ids[0], mask[0] = r0, 1
    ids[1, 8:], mask[1, 8:] = r1, 1
    out = m.generate(ids, max_new_tokens=6, attention_mask=mask)
    assert torch.equal(out[0, 20:], m.generate(r0[None], max_new_tokens=6)[0, 20:])
    assert torch.equal(out[1, 20:], m.generate(r1[None], max_new_tokens=6)[0, 12:])


def test_bf16_runtime_close_to_fp32(make_ckpt):
    path = make_ckpt("mxfp4")
    ids = torch.randint(0, 6144, (1, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = mxq.load_model(path, dtype=torch.float32)(ids).logits
        b = mxq.load_model(path, dtype=torch.bfloat16)(ids).logits.float()
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 3e-2, rel
