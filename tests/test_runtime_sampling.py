"""``mxq.runtime.sampling`` on the CPU (pure torch; the same code runs inside the captured CUDA graph, which
tests/test_runtime_sampling_gpu.py checks): greedy at temperature 0, sampled frequencies equal to the
(truncated, renormalised) softmax, device-tensor parameters equal to Python ones, and the mode bookkeeping
of ``Runtime.use_sampling``."""
from __future__ import annotations

import math

import pytest
import torch

from mxq.model.generate import sample_next
from mxq.runtime.sampling import DeviceSampler, SamplingParams, sample

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -1.0, -3.0, 0.7])
N = 40_000


def freqs(ids: torch.Tensor, v: int) -> torch.Tensor:
    return torch.bincount(ids, minlength=v).double() / ids.numel()


def chi2(ids: torch.Tensor, p: torch.Tensor) -> float:
    """Pearson's statistic over the categories with p > 0 (and none outside them)."""
    obs = torch.bincount(ids, minlength=p.numel()).double()
    assert obs[p == 0].sum() == 0, "a token outside the support was drawn"
    exp = p.double() * ids.numel()
    m = p > 0
    return float(((obs[m] - exp[m]) ** 2 / exp[m]).sum())


def chi2_crit(df: int) -> float:
    """~99.99th percentile of chi-square(df) (Wilson-Hilferty), so a fixed-seed test fails only on a real bias."""
    z = 3.72
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def nucleus(p: torch.Tensor, top_p: float, top_k: int = 0) -> torch.Tensor:
    """Reference: transformers' order (top-k, then top-p of the renormalised rest), by explicit loops."""
    order = torch.argsort(p, descending=True).tolist()
    if top_k:
        order = order[:top_k]
    mass = sum(float(p[i]) for i in order)
    keep, cum = [], 0.0
    for i in order:
        keep.append(i)
        cum += float(p[i]) / mass
        if cum >= top_p:
            break
    q = torch.zeros_like(p, dtype=torch.float64)
    q[keep] = p[keep].double()
    return q / q.sum()


def draw(n: int, seed: int = 0, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return sample(LOGITS.expand(n, -1), generator=g, **kw)


def test_temperature_zero_is_argmax():
    x = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    x[3, 7] = x[3, 9] = x[3].max() + 1                  # a tie: argmax takes the lower id, so must sampling
    assert torch.equal(sample(x, temperature=0.0), x.argmax(-1))
    for filtered in (False, True):
        s = DeviceSampler("cpu", filtered)
        s.set(SamplingParams(0.0, 0.9 if filtered else 1.0))
        assert torch.equal(s(x), x.argmax(-1))
    # a very small temperature samples an argmax too (the noise cannot bridge the scaled gap)
    x = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample(x, temperature=1e-4, generator=torch.Generator().manual_seed(2)), x.argmax(-1))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_unfiltered_frequencies_match_softmax(temperature):
    ids = draw(N, temperature=temperature)
    p = torch.softmax(LOGITS.double() / temperature, -1)
    assert chi2(ids, p) < chi2_crit(LOGITS.numel() - 1)
    assert (freqs(ids, 8) - p).abs().max() < 0.01


@pytest.mark.parametrize("top_p,top_k", [(0.8, 0), (0.5, 0), (1.0, 3), (0.9, 4), (0.3, 1)])
def test_top_p_top_k_frequencies_match_the_renormalised_nucleus(top_p, top_k):
    ids = draw(N, seed=3, top_p=top_p, top_k=top_k)
    q = nucleus(torch.softmax(LOGITS.double(), -1), top_p, top_k)
    assert chi2(ids, q) < chi2_crit(max(int((q > 0).sum()) - 1, 1))


def test_top_p_matches_the_reference_sampler_in_distribution():
    """``mxq.model.generate.sample_next`` (the reference path's sampler, torch.multinomial) and ours agree."""
    x = LOGITS.expand(N, -1)
    ref = sample_next(x, True, 0.8, 0.7, torch.Generator().manual_seed(5))
    ours = sample(x, 0.8, 0.7, generator=torch.Generator().manual_seed(6))
    q = nucleus(torch.softmax(LOGITS.double() / 0.8, -1), 0.7)
    assert chi2(ref, q) < chi2_crit(int((q > 0).sum()) - 1)
    assert chi2(ours, q) < chi2_crit(int((q > 0).sum()) - 1)


@pytest.mark.parametrize("params", [SamplingParams(0.9), SamplingParams(1.2, 0.8), SamplingParams(1.0, 1.0, 5),
                                    SamplingParams(0.5, 0.6, 3)])
def test_device_tensor_parameters_draw_exactly_like_python_numbers(params):
    """The graph path reads temperature/top-p/top-k from tensors; with the same random numbers it must pick
    the same tokens as the Python-number path."""
    x = torch.randn(256, 300, generator=torch.Generator().manual_seed(7)) * 3
    a = sample(x, params.temperature, params.top_p, params.top_k, generator=torch.Generator().manual_seed(8))
    s = DeviceSampler("cpu", params.filtered)
    s.set(params)
    b = sample(x, s.temperature, s.top_p, s.top_k, s.filtered, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)


def test_filtered_path_without_truncation_keeps_the_full_distribution(monkeypatch):
    """top-p = 1 on the sorted path must keep tail tokens whose probability is below fp32's resolution at 1
    (the cumsum saturates there, so ``cum - p < top_p * total`` alone would drop them)."""
    head, v = 10_000, 10_001
    x = torch.zeros(1, v)
    x[0, 1234] = -10.0                                  # p = e^-10 / 1e4 = 4.5e-9 < ulp(1) / 2
    u = torch.full((1, v), 0.5)
    u[0, -1] = 1 - 2 ** -24                             # the largest Gumbel draw, at the last sorted rank
    monkeypatch.setattr(torch, "rand", lambda *a, **k: u.clone())
    s = DeviceSampler("cpu", True)
    s.set(SamplingParams(1.0, 1.0, 0))                  # filtered path (tensors) with nothing truncated
    assert int(s(x)) == 1234                            # 16.6 of Gumbel noise bridges the gap of 10
    s.set(SamplingParams(1.0, 0.999999, 0))             # a real nucleus does drop it
    assert int(s(x)) != 1234
    assert head + 1 == v


def test_sampling_params_are_checked():
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert not SamplingParams().filtered and SamplingParams(top_p=0.9).filtered and SamplingParams(top_k=5).filtered
    s = DeviceSampler("cpu", False)
    with pytest.raises(ValueError):
        s.set(SamplingParams(top_p=0.5))


def test_use_sampling_keeps_one_graph_per_mode():
    """Mode bookkeeping of ``Runtime.use_sampling`` with the capture stubbed out (no GPU needed)."""
    pytest.importorskip("triton")
    from mxq.runtime.engine import DecodeState, Runtime

    rt = Runtime.__new__(Runtime)
    rt.use_graph = True
    captured = []

    def capture(st):
        assert int(st.pos) == 0 and st.host_pos == 0           # captured at position 0, before the prefill
        st.graph, st.logits = object(), object()
        captured.append((st.mode, st.graph))

    rt._capture = capture
    st = DecodeState.__new__(DecodeState)
    st.seq, st.pos, st.host_pos = torch.zeros(1, 9, dtype=torch.int32), torch.tensor([5], dtype=torch.int32), 5
    st.graph, st.logits, st.mode, st.sampler, st.modes = "greedy-graph", None, "greedy", None, {}
    rt.use_sampling(st, None)
    assert st.graph == "greedy-graph" and not captured
    rt.use_sampling(st, SamplingParams(0.7))
    assert st.mode == "sample" and len(captured) == 1 and st.sampler is not None and not st.sampler.filtered
    assert float(st.sampler.temperature) == pytest.approx(0.7)
    g_sample = st.graph
    rt.use_sampling(st, SamplingParams(0.9, 0.5, 4))
    assert st.mode == "sample-filtered" and len(captured) == 2 and st.sampler.filtered
    assert float(st.sampler.top_p) == 0.5 and int(st.sampler.top_k) == 4
    rt.use_sampling(st, None)
    assert st.graph == "greedy-graph" and st.sampler is None and len(captured) == 2
    rt.use_sampling(st, SamplingParams(1.3))                      # back to a captured mode: new values, no capture
    assert st.graph is g_sample and len(captured) == 2 and float(st.sampler.temperature) == pytest.approx(1.3)
