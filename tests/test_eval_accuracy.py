"""Perplexity and KL against brute-force references (one window, batch 1, float64 softmax each)."""
from __future__ import annotations

import math

import pytest
import torch
from _fixtures_eval import requantize_with_noise_

import mxq
from mxq.evaluate import resolve_cfg
from mxq.evaluate.accuracy import heldout_accuracy
from mxq.evaluate.kl import kl_rows
from mxq.evaluate.perplexity import heldout_tokens, sliding_windows, target_logprobs

CFG = {"perplexity": {"domains": ["austen"], "max_tokens": 40, "max_length": 24, "stride": 10, "batch_size": 3},
       "kl": {"cache_dtype": "float32"}, "progress": False}



@pytest.fixture(scope="module")
def small(make_ckpt):
    ckpt = make_ckpt("mxfp4", layers=1, num_local_experts=8)
    return ckpt, mxq.load_model(ckpt, dtype=torch.float32), mxq.load_tokenizer(ckpt)


@pytest.fixture(scope="module")
def perturbed(small):
    ckpt = small[0]
    m = mxq.load_model(ckpt, dtype=torch.float32)
    requantize_with_noise_(m, noise=0.5, seed=1)
    return m


def _brute(model, tokens: torch.Tensor, max_length: int, stride: int) -> torch.Tensor:
    """[n-1, V] float64 log-probs of every scored position, each window run alone."""
    rows = []
    for w in sliding_windows(len(tokens), max_length, stride):
        logits = model(tokens[w.begin:w.end][None]).logits[0].double()                  # [W, V]
        rows.append(torch.log_softmax(logits, -1)[w.first - 1 - w.begin:w.end - 1 - w.begin])
    return torch.cat(rows)


@pytest.mark.parametrize("n,max_length,stride", [(10, 4, 4), (10, 4, 1), (11, 5, 3), (3, 8, 8), (50, 16, 5)])
def test_windows_score_every_token_once(n, max_length, stride):
    wins = sliding_windows(n, max_length, stride)
    scored = [t for w in wins for t in range(w.first, w.end)]
    assert scored == list(range(1, n))
    assert all(w.end - w.begin <= max_length and w.first > w.begin for w in wins)
    # after the first window, max(max_length - stride, 1) tokens of context precede the first target
    assert all(w.first - w.begin == max(max_length - stride, 1) for w in wins[1:])
    assert wins[0].begin == 0 and wins[0].first == 1


@torch.no_grad()
def test_target_logprobs_match_brute_force(small):
    _, model, tok = small
    tokens = heldout_tokens(tok, "austen", 40)
    ref = _brute(model, tokens, 24, 10)
    got = target_logprobs(model, tokens, 24, 10, batch_size=3)
    want = ref.gather(-1, tokens[1:, None]).squeeze(-1)
    torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=0)
    # max_length >= n: one window, identical to a single full-sequence forward
    full = torch.log_softmax(model(tokens[None]).logits[0].double(), -1)[:-1].gather(-1, tokens[1:, None]).squeeze(-1)
    torch.testing.assert_close(target_logprobs(model, tokens, 64, 64).double(), full, atol=2e-4, rtol=0)


@torch.no_grad()
def test_perplexity_and_kl_match_brute_force(small, perturbed, tmp_path):
    ckpt, base, tok = small
    tokens = heldout_tokens(tok, "austen", 40)
    lp = _brute(base, tokens, 24, 10)
    lq = _brute(perturbed, tokens, 24, 10)
    tgt = tokens[1:]
    ppl = math.exp(-float(lq.gather(-1, tgt[:, None]).mean()))
    kl = (lp.exp() * (lp - lq)).sum(-1)                                                  # [n-1]
    top1 = float((lp.argmax(-1) == lq.argmax(-1)).double().mean())

    res = heldout_accuracy(perturbed, tok, resolve_cfg(CFG), str(ckpt), tmp_path, None, False)
    assert res["perplexity"]["austen"] == pytest.approx(ppl, rel=1e-4)
    assert res["perplexity"]["mean"] == pytest.approx(ppl, rel=1e-4)
    k = res["kl_vs_baseline"]
    assert k["tokens"] == len(tgt)
    assert k["mean"] == pytest.approx(float(kl.mean()), rel=1e-3, abs=1e-7)
    assert k["p99"] == pytest.approx(float(torch.quantile(kl, 0.99)), rel=1e-3, abs=1e-7)
    assert k["top1_agreement"] == pytest.approx(top1)
    assert k["mean"] > 1e-4                        # the perturbation is visible
    assert k["reference"]["mode"] == "disk-cache" and not k["reference"]["cached"]

    # second run: the reference comes from the disk cache and gives the same numbers
    again = heldout_accuracy(perturbed, tok, resolve_cfg(CFG), str(ckpt), tmp_path, None, False)["kl_vs_baseline"]
    assert again["reference"]["cached"] and again["mean"] == k["mean"]
    # paired mode (reference too large to cache) runs the baseline alongside and agrees
    paired_cfg = resolve_cfg({**CFG, "kl": {"cache_dtype": "float32", "max_cache_bytes": 0}})
    paired = heldout_accuracy(perturbed, tok, paired_cfg, str(ckpt), tmp_path, None, False)["kl_vs_baseline"]
    assert paired["reference"]["mode"] == "paired"
    assert paired["mean"] == pytest.approx(k["mean"], rel=1e-6)
    # fp16 storage (the default) stays within a few percent of the exact value
    f16 = heldout_accuracy(perturbed, tok, resolve_cfg({**CFG, "kl": {}}), str(ckpt), tmp_path, None, False)
    assert f16["kl_vs_baseline"]["mean"] == pytest.approx(float(kl.mean()), rel=3e-2)


@torch.no_grad()
def test_baseline_against_itself(small, tmp_path):
    ckpt, base, tok = small
    res = heldout_accuracy(base, tok, resolve_cfg({**CFG, "kl": {"cache_dtype": "float16"}}), str(ckpt), tmp_path,
                           tmp_path, False)
    k = res["kl_vs_baseline"]
    assert k["mean"] == 0.0 and k["p99"] == 0.0 and k["max"] == 0.0
    assert k["top1_agreement"] == 1.0
    assert (tmp_path / "kl_per_token.safetensors").is_file()


def test_kl_rows_is_exact_for_known_distributions():
    p = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]))
    q = torch.log(torch.tensor([[0.25, 0.5, 0.25], [0.1, 0.2, 0.7]]))
    kl, agree = kl_rows(p, q, torch.float64)
    torch.testing.assert_close(kl.double(), torch.tensor([0.5 * math.log(2) - 0.25 * math.log(2), 0.0],
                                                         dtype=torch.float64), atol=1e-6, rtol=0)
    assert agree.tolist() == [False, True]


@torch.no_grad()
def test_reference_runs_the_candidates_attention_and_keys_its_cache_by_it(small, tmp_path):
    """eager and SDPA logits differ (~1e-5 in fp32): a reference cached from an eager run must not serve an SDPA
    candidate, and the baseline must run the candidate's attention, so the model against itself is exactly 0."""
    from mxq.model import set_attention_impl

    ckpt, _, tok = small
    cfg = resolve_cfg({**CFG, "kl": {"cache_dtype": "float32"}})
    eager = mxq.load_model(ckpt, dtype=torch.float32)
    first = heldout_accuracy(eager, tok, cfg, str(ckpt), tmp_path, tmp_path, False)["kl_vs_baseline"]
    sdpa = mxq.load_model(ckpt, dtype=torch.float32)
    set_attention_impl(sdpa, "sdpa")
    k = heldout_accuracy(sdpa, tok, cfg, str(ckpt), tmp_path, tmp_path, False)["kl_vs_baseline"]
    assert first["mean"] == 0.0
    assert k["mean"] == 0.0 and k["max"] == 0.0 and k["top1_agreement"] == 1.0, k
