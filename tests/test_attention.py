"""SDPA sink attention against the eager reference (sinks, GQA, sliding window as
in openai/gpt-oss ``gpt_oss/torch/model.py::sdpa``).

float32: the two implementations agree within 1e-5 relative L2 (measured ~1e-7) for causal, sliding
window with T > window, left/right padding, a KV cache (prefill then decode steps), GQA and a padded
batch split into several mask chunks. bfloat16: both are compared with a float32 computation on the same
bf16-rounded inputs; the SDPA result must be no farther from it than the eager bf16 one (eager rounds
q @ k^T to bf16 before the softmax, SDPA does not), and both within 2e-2.
"""
from __future__ import annotations

import pytest
import torch

import mxq
from mxq.model.attention import (AttentionMasks, attention_mask, eager_sink_attention, sdpa_sink_attention,
                                 set_attention_impl)

TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def qkvs(b: int, nh: int, kv: int, t: int, s: int, d: int = 16, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, nh, t, d, generator=g)
    k = torch.randn(b, kv, s, d, generator=g)
    v = torch.randn(b, kv, s, d, generator=g)
    sinks = torch.randn(nh, generator=g) * 2
    return [x.to(dtype) for x in (q, k, v, sinks)]


def valid_rows(lens: list[int], s: int, side: str) -> torch.Tensor:
    """[B, S] key validity with the real tokens at the left or right end."""
    kv = torch.zeros(len(lens), s, dtype=torch.bool)
    for i, n in enumerate(lens):
        if side == "left":
            kv[i, s - n:] = True
        else:
            kv[i, :n] = True
    return kv


def both(q, k, v, sinks, allowed, **kw):
    scale = q.shape[-1] ** -0.5
    return (sdpa_sink_attention(q, k, v, sinks, scale, allowed, **kw),
            eager_sink_attention(q, k, v, sinks, scale, allowed))


@pytest.mark.parametrize("window", [None, 16])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)])
def test_fp32_unpadded(window, heads):
    nh, kv = heads
    t = 48
    q, k, v, sinks = qkvs(3, nh, kv, t, t)
    allowed = AttentionMasks(torch.arange(t), torch.ones(3, t, dtype=torch.bool)).allowed(window)
    assert allowed.shape[0] == 1                                   # broadcast mask when nothing is padding
    a, b = both(q, k, v, sinks, allowed)
    assert rel(a, b) < TOL


def test_sdpa_output_in_a_non_contiguous_layout(monkeypatch):
    """Some SDPA backends (fp32 on CUDA) return [B, kv, g*T, d] with a transposed memory layout; the split
    back into [B, nh, T, d] must not assume a contiguous result (it once did: ``.view`` raised)."""
    import mxq.model.attention as A

    real = A.F.scaled_dot_product_attention

    def transposed_layout(*args, **kw):
        o = real(*args, **kw)
        return o.transpose(1, 2).contiguous().transpose(1, 2)         # same values, [B, g*T, kv, d] in memory

    t = 24
    q, k, v, sinks = qkvs(2, 8, 2, t, t)
    allowed = AttentionMasks(torch.arange(t), torch.ones(2, t, dtype=torch.bool)).allowed(None)
    monkeypatch.setattr(A.F, "scaled_dot_product_attention", transposed_layout)
    a, b = both(q, k, v, sinks, allowed)
    assert rel(a, b) < TOL


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("window", [None, 8])
def test_fp32_padded(side, window):
    t = 40
    q, k, v, sinks = qkvs(3, 8, 2, t, t, seed=1)
    kvalid = valid_rows([40, 23, 5], t, side)
    masks = AttentionMasks(torch.arange(t), kvalid)
    allowed = masks.allowed(window)
    assert not masks.dense and allowed.shape[0] == 3
    a, b = both(q, k, v, sinks, allowed)
    assert rel(a, b) < TOL
    if side == "left":                                             # queries before any real key: zeros
        assert a[2, :, : t - 5].abs().max() == 0 and b[2, :, : t - 5].abs().max() == 0


def test_fp32_padded_mask_split_over_batch():
    t = 24
    q, k, v, sinks = qkvs(5, 4, 2, t, t, seed=2)
    allowed = attention_mask(torch.arange(t), valid_rows([24, 20, 3, 11, 24], t, "left"), 8)
    one_row = 4 * t * (t + 1)
    a, b = both(q, k, v, sinks, allowed, max_bias_elems=2 * one_row)   # 3 chunks: 2 + 2 + 1 rows
    assert rel(a, b) < TOL


def test_fp32_with_past_keys():
    """A cache step: T new queries at cache indices past..past+T-1 over S = past + T keys."""
    past, t = 30, 3
    s = past + t
    q, k, v, sinks = qkvs(2, 8, 2, t, s, seed=3)
    kvalid = valid_rows([s, s - 7], s, "left")
    for window in (None, 16):
        allowed = attention_mask(torch.arange(past, s), kvalid, window)
        a, b = both(q, k, v, sinks, allowed)
        assert rel(a, b) < TOL


@pytest.fixture(scope="module")
def models(make_ckpt):
    path = make_ckpt("mxfp4")
    eager = mxq.load_model(path, dtype=torch.float32)
    sdpa = mxq.load_model(path, dtype=torch.float32)
    set_attention_impl(eager, "eager")
    set_attention_impl(sdpa, "sdpa")
    return eager, sdpa


def test_model_long_sequence_and_cache(models):
    """T > sliding window; prefill then decode steps through the KV cache, left-padded batch."""
    eager, sdpa = models
    c = eager.config
    g = torch.Generator().manual_seed(4)
    t = 150
    assert c.sliding_window < t
    ids = torch.randint(2, c.vocab_size, (2, t + 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    with torch.no_grad():
        assert rel(sdpa(ids[:1]).logits, eager(ids[:1]).logits) < TOL
        outs = []
        for m in (sdpa, eager):
            cache = m.new_cache(2, t + 6)
            parts = [m(ids[:, :t], attention_mask=mask[:, :t], cache=cache).logits]
            for i in range(t, t + 6):
                parts.append(m(ids[:, i:i + 1], attention_mask=mask[:, i:i + 1], cache=cache).logits)
            outs.append(torch.cat(parts, dim=1))
    real = mask.bool()
    assert rel(outs[0][real], outs[1][real]) < TOL


def test_model_right_padding(models):
    eager, sdpa = models
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, eager.config.vocab_size, (2, 140), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 90:] = 0
    with torch.no_grad():
        a, b = sdpa(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits
    assert rel(a[mask.bool()], b[mask.bool()]) < TOL


def test_bf16_no_farther_from_fp32_than_eager():
    """bf16 inputs: relative L2 of each implementation against float32 math on the same inputs."""
    q, k, v, sinks = qkvs(2, 8, 2, 200, 200, d=64, seed=6, dtype=torch.bfloat16)
    q = q * 3                                                       # sharper softmax, as trained models have
    errs = {}
    for window in (None, 128):
        allowed = attention_mask(torch.arange(200), torch.ones(1, 200, dtype=torch.bool), window)
        truth = eager_sink_attention(q.float(), k.float(), v.float(), sinks.float(), 0.125, allowed)
        s, e = both(q, k, v, sinks, allowed)
        errs[window] = (rel(s, truth), rel(e, truth))
        assert s.dtype == torch.bfloat16
        assert errs[window][0] <= errs[window][1] * 1.05 + 1e-4 and errs[window][1] < 2e-2
    print("bf16 relative L2 vs fp32 (sdpa, eager):", errs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("padded", [False, True])
def test_cuda_efficient_kernel_at_gpt_oss_shapes(padded):
    """gpt-oss-20b attention shapes (64 heads, 8 kv heads, d=64, window 128, T=512) on the GPU: each fused
    kernel that accepts the sink mask here (memory-efficient; cuDNN -- torch 2.11 cu130 on an H100 turned the
    memory-efficient one off at run time and dispatched to cuDNN) gives finite output with whole key tiles
    masked and in bf16 is no farther from float32 than eager bf16 is; so is the backend torch picks."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    t, dev = 512, "cuda"
    q, k, v, sinks = (x.to(dev) for x in qkvs(2, 64, 8, t, t, d=64, seed=7, dtype=torch.bfloat16))
    kvalid = torch.ones(2, t, dtype=torch.bool, device=dev)
    if padded:
        kvalid[1, :200] = False
    fused = []
    for window in (None, 128):
        allowed = AttentionMasks(torch.arange(t, device=dev), kvalid).allowed(window)
        truth = eager_sink_attention(q.float(), k.float(), v.float(), sinks.float(), 0.125, allowed)
        e = eager_sink_attention(q, k, v, sinks, 0.125, allowed)
        outs = {"default": sdpa_sink_attention(q, k, v, sinks, 0.125, allowed)}
        for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel(backend):
                    outs[backend.name] = sdpa_sink_attention(q, k, v, sinks, 0.125, allowed)
            except RuntimeError:                      # this build/device does not offer the kernel
                continue
            fused.append(backend.name)
        for name, s in outs.items():
            assert torch.isfinite(s).all(), name
            assert rel(s, truth) <= rel(e, truth) * 1.05 + 1e-4, name
            if padded:
                assert s[1, :, :200].abs().max() == 0, name
    assert fused, "no fused SDPA kernel accepted the sink mask"
