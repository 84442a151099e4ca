"""GPU tests of sampling on the fast path and of the speed stage's choice of code path; skipped without CUDA.

* the sampler replayed from a captured CUDA graph draws fresh numbers on every replay, with the frequencies
  of the (truncated) softmax (chi-square, fixed seed);
* on the tiny model: temperature 0 equals greedy exactly, a tiny temperature samples an argmax at every step,
  a seed reproduces a sampled generation;
* a pruned model runs on the fast path; the speed stage measures the fast runtime on CUDA and falls back,
  with the reason recorded, for a model with several expert formats in a layer.
"""
from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -1.0, -3.0, 0.7])


def chi2_ok(counts: torch.Tensor, p: torch.Tensor) -> tuple[float, float]:
    """(Pearson's statistic, ~99.99th percentile of its chi-square) over the support of p; nothing outside it."""
    counts, p = counts.double().cpu(), p.double().cpu()
    assert counts[p == 0].sum() == 0, "a token outside the support was drawn"
    n = counts.sum()
    m = p > 0
    stat = float(((counts[m] - n * p[m]) ** 2 / (n * p[m])).sum())
    df = max(int(m.sum()) - 1, 1)
    crit = df * (1 - 2 / (9 * df) + 3.72 * math.sqrt(2 / (9 * df))) ** 3
    return stat, crit


def nucleus(p: torch.Tensor, top_p: float) -> torch.Tensor:
    order = torch.argsort(p, descending=True).tolist()
    keep, cum = [], 0.0
    for i in order:
        keep.append(i)
        cum += float(p[i])
        if cum >= top_p:
            break
    q = torch.zeros_like(p, dtype=torch.float64)
    q[keep] = p[keep].double()
    return q / q.sum()


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampler_replayed_from_a_cuda_graph(top_p):
    from mxq.runtime.sampling import DeviceSampler, SamplingParams

    rows, replays = 1000, 40
    logits = LOGITS.to(DEV).expand(rows, -1).contiguous()
    params = SamplingParams(1.0, top_p)
    s = DeviceSampler(DEV, params.filtered)
    s.set(params)
    counts = torch.zeros(LOGITS.numel(), dtype=torch.long, device=DEV)
    ones = torch.ones(rows, dtype=torch.long, device=DEV)
    torch.manual_seed(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            s(logits)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ids = s(logits)
        counts.index_add_(0, ids, ones)
    counts.zero_()
    g.replay()
    first = ids.clone()
    for _ in range(replays - 1):
        g.replay()
    torch.cuda.synchronize()
    assert not torch.equal(first, ids), "replays repeat the same random numbers"
    assert int(counts.sum()) == rows * replays
    p = torch.softmax(LOGITS.double(), -1)
    stat, crit = chi2_ok(counts, nucleus(p, top_p) if top_p < 1 else p)
    assert stat < crit, (stat, crit, counts.tolist())


@pytest.fixture(scope="module")
def tiny(make_ckpt):
    pytest.importorskip("triton")
    import mxq

    return mxq.load_model(make_ckpt("mxfp4", layers=4), device=DEV, dtype=torch.bfloat16)


def prompt(model, b: int = 2, t: int = 150, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, model.config.vocab_size, (b, t), generator=g).to(DEV)


def test_temperature_zero_equals_greedy_and_small_temperature_samples_an_argmax(tiny):
    from mxq.runtime import SamplingParams, disable, enable, fast_generate

    ids = prompt(tiny)
    t, n = ids.shape[1], 16
    greedy = fast_generate(tiny, ids, n)
    assert torch.equal(fast_generate(tiny, ids, n, do_sample=True, temperature=0.0), greedy)
    assert torch.equal(fast_generate(tiny, ids, n, do_sample=True, temperature=0.0, top_p=0.9), greedy)
    assert torch.equal(fast_generate(tiny, ids, n), greedy)           # back to the greedy graph
    # T = 1e-4: every token chosen inside the graph is an argmax of its step's logits (ties allowed)
    for params in (SamplingParams(1e-4), SamplingParams(1e-4, 0.9)):
        rt = enable(tiny)
        st = rt.state_for(ids.shape[0], t + n)
        rt.use_sampling(st, params)
        lg = rt.prefill(st, ids)
        b = ids.shape[0]                                          # the state's batch bucket may hold more rows
        st.seq[:b, t] = rt.choose(st, lg).to(torch.int32)
        for _ in range(n - 1):
            h = st.host_pos
            lg = rt.step(st)[:b].float()
            tok = st.seq[:b, h + 1].long()
            assert torch.equal(lg.gather(1, tok[:, None])[:, 0], lg.max(-1).values)
    disable(tiny)


def test_sampling_in_the_graph_is_seeded_and_varies(tiny):
    from mxq.runtime import disable, fast_generate

    ids = prompt(tiny, seed=2)
    kw = {"do_sample": True, "temperature": 1.0, "top_p": 0.95}
    fast_generate(tiny, ids, 16, **kw)                                # capture (consumes random numbers)
    torch.manual_seed(123)
    a = fast_generate(tiny, ids, 16, **kw)
    torch.manual_seed(123)
    b = fast_generate(tiny, ids, 16, **kw)
    torch.manual_seed(321)
    c = fast_generate(tiny, ids, 16, **kw)
    disable(tiny)
    assert torch.equal(a, b) and not torch.equal(a, c)
    new = a[:, ids.shape[1]:]
    assert int(new.min()) >= 0 and int(new.max()) < tiny.config.vocab_size


def test_pruned_model_runs_on_the_fast_path(make_ckpt):
    pytest.importorskip("triton")
    import mxq
    from mxq.plan import build_plan, apply_
    from mxq.runtime import disable, fast_generate

    model = mxq.load_model(make_ckpt("mxfp4", layers=4), device=DEV, dtype=torch.bfloat16)
    plan = build_plan({"planner": "prune", "prune": {"fraction": 0.25, "criterion": "random"}}, None, model)
    apply_(model, plan)
    ids = prompt(model)
    out = fast_generate(model, ids, 16)                     # refused (UnsupportedModel) if experts were loose
    disable(model)
    ref = model.generate(ids, max_new_tokens=16)
    agree = [next((i for i, (x, y) in enumerate(zip(r1, r2)) if x != y), 16)
             for r1, r2 in zip(out[:, 150:].tolist(), ref[:, 150:].tolist())]
    assert min(agree) >= 8, agree


SPEED = {"contexts": [64], "new_tokens": 6, "repeats": 2, "warmup": 1, "batch_size": 1,
         "modes": ["greedy", "sample"], "temperature": 1.0, "top_p": 0.9, "seed": 0}


def test_speed_stage_measures_the_fast_runtime_on_cuda(tiny):
    from mxq.evaluate.metrics import DEFAULT_PATH
    from mxq.evaluate.speed import speed_report
    from mxq.runtime import RUNTIME_PATH

    rep = speed_report(tiny, SPEED, progress=False)
    assert rep["code_path"] == RUNTIME_PATH == rep["precision"]["path"] and rep["fallback_reason"] is None
    assert rep["by_setting"]["sample@64"]["decode_tokens_per_s"] > 0 and rep["decode_tokens_per_s"] > 0
    assert rep["peak_allocated_bytes"] > 0
    assert "_mxq_runtime" not in tiny.__dict__ and not hasattr(tiny, "runtime_path")     # detached afterwards
    ref = speed_report(tiny, {**SPEED, "runtime": "reference"}, progress=False)
    assert ref["code_path"] == DEFAULT_PATH and "reference" in ref["fallback_reason"]


def test_speed_stage_runs_several_formats_in_a_layer_on_the_fast_path(make_ckpt):
    """A layer whose experts are in two formats (a mixed plan) runs on the fmt_kernels of the fast runtime."""
    pytest.importorskip("triton")
    import mxq
    from mxq.evaluate.speed import speed_report
    from mxq.plan import Plan, apply_
    from mxq.runtime import RUNTIME_PATH

    model = mxq.load_model(make_ckpt("mxfp4", layers=2), device=DEV, dtype=torch.bfloat16)
    e = model.config.num_local_experts
    apply_(model, Plan([["nvfp4" if j % 2 else "mxfp4" for j in range(e)] for _ in range(2)]))
    rep = speed_report(model, {**SPEED, "modes": ["greedy"]}, progress=False)
    assert rep["code_path"] == RUNTIME_PATH and rep["fallback_reason"] is None
    assert rep["decode_tokens_per_s"] > 0
