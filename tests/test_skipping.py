"""Dynamic expert skipping: the gate rule, the MoE forward with skipped pairs not run, and beta calibration."""
from __future__ import annotations

import pytest
import torch

import mxq
from mxq.calib import CalibSet
from mxq.model import observe
from mxq.model.skipping import calibrate_beta, set_skipping, skip_weights


def test_skip_weights_zeroes_slots_below_beta_times_the_top_and_renormalises():
    w = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.4, 0.3, 0.2, 0.1]])
    out = skip_weights(w, 0.5)
    assert torch.allclose(out[0], torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.allclose(out[1], torch.tensor([4 / 9, 3 / 9, 2 / 9, 0.0]))
    assert torch.allclose(skip_weights(w, 0.0), w) and torch.equal(skip_weights(w, 1.0)[:, 0], torch.ones(2))


class Count:
    def __init__(self):
        self.pairs = 0

    def on_route(self, layer, logits, idx, w, valid):
        self.zero = int((w == 0).sum())
        self.total = w.numel()

    def on_expert(self, layer, expert, tok, gw, out):
        self.pairs += tok.numel()
        assert bool((gw > 0).all())


@pytest.fixture(scope="module")
def model(make_ckpt):
    return mxq.load_model(make_ckpt("mxfp4", layers=1), dtype=torch.float32)


def test_skipped_pairs_are_not_run_and_beta_one_is_top1_routing(model):
    mlp = model.layers[0].mlp
    x = torch.randn(1, 50, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(1, 50, dtype=torch.bool)
    with torch.no_grad():
        ref, _ = mlp(x, valid)
        set_skipping(model, 0.0)
        same, _ = mlp(x, valid)
        set_skipping(model, 0.3)
        c = Count()
        with observe(model, c):
            mlp(x, valid)
        assert c.zero > 0 and c.pairs == c.total - c.zero                  # skipped pairs cost no expert work
        set_skipping(model, 1.0)
        top1, _ = mlp(x, valid)
        set_skipping(model, None)
        flat = x.reshape(-1, x.shape[-1])
        _, idx, _ = mlp.route(flat)
        want = torch.stack([mlp.experts.expert_forward(int(e), flat[n:n + 1])[0] for n, e in enumerate(idx[:, 0])])
    assert torch.allclose(same, ref, atol=1e-6)
    assert torch.allclose(top1.reshape(-1, x.shape[-1]), want, atol=1e-5)
    with pytest.raises(ValueError, match="skip.beta"):
        set_skipping(model, 1.5)


def test_calibrated_beta_is_the_mean_second_over_top_ratio(model):
    ids = torch.randint(1, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    info = calibrate_beta(model, CalibSet(ids, torch.ones_like(ids), ["a", "a"], "t"), batch_size=2)
    assert info["tokens"] == 60 and len(info["beta"]) == 1 and 0 < info["beta"][0] <= 1
    shares = info["skipped_share_per_slot"][0]
    assert len(shares) == model.config.num_experts_per_tok - 1
    assert shares == sorted(shares) and 0 < shares[0] < 1              # lower slots are skipped more often


@pytest.mark.parametrize("beta", [1.5, -0.1, "often", True])
def test_bad_skip_beta_is_refused_before_any_work(beta):
    from omegaconf import OmegaConf

    from mxq.options import OptionError, check_run_options

    with pytest.raises(OptionError, match=r"^skip\.beta="):
        check_run_options(OmegaConf.create({"skip": {"beta": beta}}))
    for ok in (None, 0, 0.5, 1.0, "calibrated"):
        check_run_options(OmegaConf.create({"skip": {"beta": ok}}))
