"""The lm-eval backend: loglikelihood vs a direct computation, padding-invariant batching, rolling
log-likelihood vs the sliding-window computation, generate_until stop strings, harmony wrapping."""
from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance

import mxq
from mxq.evaluate.lmeval_adapter import MxqLM, parse_harmony
from mxq.evaluate.perplexity import sliding_windows

PAIRS = [("It is a truth universally", " acknowledged"), ("The king", " said unto them, Go"),
         ("To be, or not to be, that is the", " question"), ("", "In the beginning"),
         ("Mr. Darcy ", "replied"), ("And God said, Let there be light: and there was", " light.")]



@pytest.fixture(scope="module")
def lm(make_ckpt):
    ckpt = make_ckpt("mxfp4", layers=1, num_local_experts=8)
    return MxqLM(mxq.load_model(ckpt, dtype=torch.float32), mxq.load_tokenizer(ckpt), batch_size=4,
                 max_length=32)


def _inst(kind: str, args: tuple, i: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


@torch.no_grad()
def _direct(lm: MxqLM, ctx: str, cont: str) -> tuple[float, bool]:
    """log P(cont | ctx) from one unpadded forward of ctx + cont, split the way lm-eval splits it."""
    if ctx:
        n_sp = len(ctx) - len(ctx.rstrip())
        ctx, cont = (ctx[:-n_sp], ctx[-n_sp:] + cont) if n_sp else (ctx, cont)
        whole, c = lm.tok_encode(ctx + cont), lm.tok_encode(ctx)
        c_ids, t_ids = c, whole[len(c):]
    else:
        c_ids, t_ids = [lm.prefix_token_id], lm.tok_encode(cont)
    ids = torch.tensor(c_ids + t_ids)
    lp = torch.log_softmax(lm.model(ids[None, :-1]).logits[0].double(), -1)[-len(t_ids):]    # [n, V]
    tgt = torch.tensor(t_ids)
    return float(lp.gather(-1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all())


def test_loglikelihood_equals_direct_and_batching_is_invariant(lm):
    reqs = [_inst("loglikelihood", p, i) for i, p in enumerate(PAIRS)]
    batched = lm.loglikelihood(reqs)                  # batch 4: sorted, right-padded, masked
    lm.batch_size = 1
    try:
        single = lm.loglikelihood(reqs)
    finally:
        lm.batch_size = 4
    for (ctx, cont), b, s in zip(PAIRS, batched, single):
        want, greedy = _direct(lm, ctx, cont)
        assert b[0] == pytest.approx(want, abs=2e-4), (ctx, cont)
        assert b[0] == pytest.approx(s[0], abs=2e-4)
        assert b[1] == s[1] == greedy


@torch.no_grad()
def test_loglikelihood_rolling_equals_sliding_windows(lm):
    from mxq.data.corpus import load_text

    text = load_text("kjv_bible", "heldout")[:600]
    toks = [lm.prefix_token_id] + lm.tok_encode(text)
    assert len(toks) > 3 * lm.max_length                 # several windows
    want = 0.0
    for w in sliding_windows(len(toks), lm.max_length, lm.max_length):
        ids = torch.tensor(toks[w.begin:w.end])
        lp = torch.log_softmax(lm.model(ids[None]).logits[0].double(), -1)
        tgt = torch.tensor(toks[w.first:w.end])
        want += float(lp[w.first - 1 - w.begin:w.end - 1 - w.begin].gather(-1, tgt[:, None]).sum())
    (got,) = lm.loglikelihood_rolling([_inst("loglikelihood_rolling", (text,))])
    assert got == pytest.approx(want, abs=1e-3)


def test_generate_until_stops_at_stop_strings(lm):
    free = lm.generate_until([_inst("generate_until", ("It is a truth", {"max_gen_toks": 12, "until": []}))])[0]
    assert free                                         # the model writes something within 12 tokens
    stop = free[len(free) // 2: len(free) // 2 + 2] or free[:1]
    cut = lm.generate_until([_inst("generate_until", ("It is a truth", {"max_gen_toks": 12, "until": [stop]})),
                             _inst("generate_until", ("The king", {"max_gen_toks": 5, "until": ["\u2603"]}), 1)])
    assert cut[0] == free.split(stop, 1)[0]             # greedy: same text, cut before the stop string
    assert stop not in cut[0]
    assert len(lm.tok_encode(cut[1])) <= 5


def test_harmony_wrapping_and_parsing(lm, monkeypatch):
    assert parse_harmony("<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>final"
                         "<|message|>42<|return|>") == "42"
    assert parse_harmony("plain answer") == "plain answer"
    seen = []
    monkeypatch.setattr(lm, "_generate", lambda ctxs, until, n, kw: seen.extend(ctxs) or ["x"] * len(ctxs))
    monkeypatch.setattr(lm, "chat_format", True)
    lm.generate_until([_inst("generate_until", ("What is 2+2?", {"until": ["\n"]}))])
    assert seen[0].startswith("<|start|>system<|message|>") and seen[0].endswith(
        "<|start|>user<|message|>What is 2+2?<|end|><|start|>assistant")
