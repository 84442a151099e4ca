"""A few CPU training steps of a 1-layer model: it runs, learns, balances, QATs and saves a loadable checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mxq.train.__main__ import main, parse_args
from mxq.train.config import TrainConfig
from mxq.train.dense_moe import dense_moe
from mxq.train.loop import build_model
from mxq.train.losses import load_balancing_loss
from mxq.train.qat import fake_mxfp4


def test_balancing_loss_is_one_when_uniform_and_grows_when_collapsed() -> None:
    n, e, k = 64, 8, 2
    uniform = torch.zeros(n, e)
    uniform[torch.arange(n)[:, None], (torch.arange(n)[:, None] * k + torch.arange(k)) % e] = 1e-3
    assert load_balancing_loss(uniform, k).item() == pytest.approx(1.0, abs=1e-3)
    collapsed = torch.zeros(n, e)
    collapsed[:, :k] = 10.0
    assert load_balancing_loss(collapsed, k).item() > 3.0


def test_fake_mxfp4_rounds_forward_and_passes_gradient() -> None:
    w = torch.randn(4, 64, requires_grad=True)
    q = fake_mxfp4(w)
    assert not torch.equal(q, w)
    assert torch.equal(fake_mxfp4(q.detach()), q.detach())             # MXFP4 values are fixed points
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_dense_moe_matches_the_reference_moe() -> None:
    model = build_model(TrainConfig(model_overrides={"num_hidden_layers": 2}), torch.device("cpu"))
    with torch.no_grad():
        for layer in model.layers:          # sharper routing and non-zero biases than the init gives
            layer.mlp.router.weight.normal_(0, 0.5)
            layer.mlp.experts.gate_up_bias.normal_(0, 0.1)
            layer.mlp.experts.down_bias.normal_(0, 0.1)
    ids = torch.randint(0, 6144, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = model(ids, output_router_logits=True)
    ref.logits.float().pow(2).mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with dense_moe(model):
        new = model(ids, output_router_logits=True)
        new.logits.float().pow(2).mean().backward()
    assert "forward" not in vars(model.layers[0].mlp)                    # unpatched on exit
    torch.testing.assert_close(new.logits, ref.logits, atol=1e-5, rtol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-6, rtol=1e-3, msg=n)


def test_cli_parses_every_field_type() -> None:
    cfg = parse_args(["--steps", "700", "--lr", "0.01", "--exclude_calib", "true",
                      "--model_overrides", '{"num_hidden_layers": 1}', "--max_chars", "1000"])
    assert (cfg.steps, cfg.lr, cfg.exclude_calib, cfg.max_chars) == (700, 0.01, True, 1000)
    assert cfg.model_overrides == {"num_hidden_layers": 1}


def test_training_smoke(tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc = main(["--out_dir", str(out), "--steps", "8", "--qat_steps", "2", "--warmup_steps", "2",
               "--batch_size", "8", "--seq_len", "32", "--eval_every", "4", "--log_every", "2",
               "--eval_windows", "2", "--max_chars", "40000", "--device", "cpu",
               "--model_overrides", '{"num_hidden_layers": 1, "num_local_experts": 8}'])
    assert rc == 0
    log = json.loads((out / "training_log.json").read_text())
    losses = [r["loss"] for r in log["train"]]
    assert losses[-1] < losses[0]                                         # it learns something
    assert log["final"]["qat"] and log["qat_started_step"] == 6
    assert len(log["final"]["router_js_divergence"]["mean"]) == 1
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (out / name).is_file(), name
    # the written MXFP4 checkpoint reproduces the in-memory QAT model's held-out loss (bf16 vs fp32)
    rc_ = log["reload_check"]
    for d, v in rc_["heldout_loss_in_memory"].items():
        assert rc_["heldout_loss_mxfp4_checkpoint_bf16"][d] == pytest.approx(v, abs=0.02)
    # deterministic: the same seed gives the same losses
    main(["--out_dir", str(tmp_path / "again"), "--steps", "8", "--qat_steps", "2", "--warmup_steps", "2",
          "--batch_size", "8", "--seq_len", "32", "--eval_every", "4", "--log_every", "2",
          "--eval_windows", "2", "--max_chars", "40000", "--device", "cpu", "--save", "false",
          "--model_overrides", '{"num_hidden_layers": 1, "num_local_experts": 8}'])
    again = json.loads((tmp_path / "again" / "training_log.json").read_text())
    assert [r["loss"] for r in again["train"]] == losses
