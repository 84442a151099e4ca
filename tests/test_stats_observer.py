"""Every router statistic equals a brute-force reference computed token by token from the model's weights.

The reference captures each MoE layer's input, runs every expert on every token with
``experts.expert_forward(e, x)`` (dense, no routing), then loops over valid tokens and their top-k experts
(top-k of the router logits, softmax over the k) in Python: no observer, no grouping, no index_add.
The batch has left and right padding and three domains split over two batches (one mixed, one
single-domain without padding).
"""
from __future__ import annotations

import pytest
import torch

import mxq
from mxq.calib import CalibSet
from mxq.stats import collect

T = 12
DOMAINS = ["a", "b", "a", "c"]
ALL = "__all__"



@pytest.fixture(scope="module")
def model(make_ckpt):
    return mxq.load_model(make_ckpt("mxfp4"), dtype=torch.float32)


def calib_set(vocab: int) -> CalibSet:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, vocab, (4, T), generator=g)
    mask = torch.ones(4, T, dtype=torch.long)
    mask[1, 8:] = 0          # right padding
    mask[2, :7] = 0          # left padding
    ids[mask == 0] = 0
    return CalibSet(ids, mask, list(DOMAINS), "test")


@torch.no_grad()
def brute_force(model, cs: CalibSet) -> dict[str, dict[str, torch.Tensor]]:
    c = model.config
    L, E, k, H = c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok, c.hidden_size
    xs: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: xs.__setitem__(i, a[0].reshape(-1, H).clone()))
             for i, layer in enumerate(model.layers)]
    model(cs.input_ids, attention_mask=cs.attention_mask)
    for h in hooks:
        h.remove()
    z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
    ref = {d: {"tokens": z(L), "freq": z(L, E), "gate_mass": z(L, E), "reap_sum": z(L, E), "ean": z(L, E),
               "max_act_channel": z(L, E, H), "coselect": z(L, E, E), "prob": z(L, E), "tent": z(L)}
           for d in [*dict.fromkeys(cs.domains), ALL]}
    for layer in range(L):
        mlp = model.layers[layer].mlp
        logits = mlp.router(xs[layer]).float()                                       # [N, E]
        # f_e(x) of every token under every expert (the dense reference; per-token rows used below)
        f_all = [mlp.experts.expert_forward(e, xs[layer]).double() for e in range(E)]  # E x [N, H]
        for t in range(logits.shape[0]):
            b, pos = divmod(t, T)
            if not cs.attention_mask[b, pos]:
                continue
            vals, idx = torch.topk(logits[t], k)
            w = torch.softmax(vals, dim=-1)
            p = torch.softmax(logits[t], dim=-1)
            for key in (cs.domains[b], ALL):
                r = ref[key]
                r["tokens"][layer] += 1
                r["prob"][layer] += p.double()
                r["tent"][layer] += -(w.double() * w.double().log()).sum()
                for j in range(k):
                    e = int(idx[j])
                    f = f_all[e][t]                                                  # f_e(x) [H]
                    n = f.norm()
                    r["freq"][layer, e] += 1
                    r["gate_mass"][layer, e] += w[j].double()
                    r["reap_sum"][layer, e] += w[j].double() * n
                    r["ean"][layer, e] += n
                    r["max_act_channel"][layer, e] = torch.maximum(r["max_act_channel"][layer, e], f.abs())
                    for j2 in range(k):
                        r["coselect"][layer, e, int(idx[j2])] += 1
    return ref


def check(got: dict, r: dict, tokens: float) -> None:
    unc = r["freq"] == 0
    close = dict(rtol=1e-5, atol=1e-6)
    assert torch.equal(got["freq"], r["freq"])
    assert torch.equal(got["coselect"], r["coselect"])
    assert torch.equal(got["uncalibrated"], unc)
    torch.testing.assert_close(got["gate_mass"], r["gate_mass"], **close)
    torch.testing.assert_close(got["ean"], r["ean"], **close)
    reap = torch.where(unc, float("nan"), r["reap_sum"] / r["freq"].clamp(min=1))
    torch.testing.assert_close(got["reap"], reap, equal_nan=True, **close)
    mac = torch.where(unc[..., None], float("nan"), r["max_act_channel"])
    torch.testing.assert_close(got["max_act_channel"].double(), mac, equal_nan=True, **close)
    torch.testing.assert_close(got["max_act"], mac.amax(-1), equal_nan=True, **close)
    torch.testing.assert_close(got["route_prob"], r["prob"] / tokens, **close)
    torch.testing.assert_close(got["topk_entropy"], r["tent"] / tokens, **close)


@pytest.fixture(scope="module")
def both(model):
    cs = calib_set(model.config.vocab_size)
    return collect(model, cs, batch_size=3, progress=False), brute_force(model, cs), cs


def test_whole_set_matches_brute_force(both):
    stats, ref, cs = both
    r = ref[ALL]
    assert stats.tokens == int(cs.attention_mask.sum()) == int(r["tokens"][0])
    got = {k: getattr(stats, k) for k in ("freq", "gate_mass", "reap", "ean", "max_act", "max_act_channel",
                                          "coselect", "route_prob", "topk_entropy", "uncalibrated")}
    check(got, r, stats.tokens)
    torch.testing.assert_close(stats.freq_fraction, r["freq"] / stats.tokens)
    assert torch.allclose(stats.freq_fraction.sum(-1), torch.full((2,), 4.0, dtype=torch.float64))


def test_every_domain_matches_brute_force(both):
    stats, ref, _ = both
    assert stats.domains == ["a", "b", "c"]
    for d in stats.domains:
        assert stats.domain_tokens[d] == int(ref[d]["tokens"][0])
        check(stats.by_domain[d], ref[d], stats.domain_tokens[d])


def test_padding_content_is_ignored(model, both):
    stats, _, cs = both
    other = CalibSet(cs.input_ids.clone(), cs.attention_mask, cs.domains, "x")
    other.input_ids[cs.attention_mask == 0] = 5                  # different ids where the mask is 0
    again = collect(model, other, batch_size=3, progress=False)
    assert torch.equal(stats.freq, again.freq) and torch.equal(stats.coselect, again.coselect)
    # padding changes how many rows each expert matmul sees, hence last-bit rounding of valid rows only
    for k in ("gate_mass", "reap", "ean", "max_act_channel", "route_prob"):
        torch.testing.assert_close(getattr(stats, k), getattr(again, k), equal_nan=True, rtol=1e-5, atol=1e-6)


def test_results_are_deterministic(model, both):
    stats, _, cs = both
    again = collect(model, cs, batch_size=3, progress=False)
    for k in ("freq", "gate_mass", "reap", "ean", "max_act_channel", "coselect", "route_prob", "topk_entropy"):
        assert torch.equal(getattr(stats, k).nan_to_num(-1), getattr(again, k).nan_to_num(-1)), k


def test_batch_size_does_not_change_statistics(model, both):
    stats, _, cs = both
    one = collect(model, cs, batch_size=1, progress=False)
    assert torch.equal(one.freq, stats.freq)
    torch.testing.assert_close(one.reap, stats.reap, equal_nan=True, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one.max_act, stats.max_act, equal_nan=True, rtol=1e-5, atol=1e-6)
