"""The training run of the embedded model: data -> AdamW + cosine -> MXFP4 QAT tail -> trained model + log.

The model is mxq's own ``GptOssForCausalLM`` built ``trainable`` (dense fp32 experts); while training, its
MoE layers run through ``dense_moe`` (same math, far fewer kernels) and ``residual_dropout``. Same seed,
same init and batches (GPU kernels may still differ in the last bits); bf16 autocast on CUDA.
"""
from __future__ import annotations

import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

from mxq.config import GptOssConfig
from mxq.data.corpus import DOMAINS, load_text
from mxq.model import GptOssForCausalLM
from mxq.presets import preset_config
from mxq.train.config import TrainConfig
from mxq.train.dense_moe import dense_moe
from mxq.train.regularize import residual_dropout
from mxq.train.data import DomainStreams, MixedBatches, eval_windows, tokenize
from mxq.train.losses import mean_balancing_loss, next_token_loss
from mxq.train.qat import enable_mxfp4_qat_
from mxq.train.routing import expert_frequencies, load_summary, specialisation

TINY_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny"


def build_model(cfg: TrainConfig, device: torch.device) -> GptOssForCausalLM:
    hf = preset_config(cfg.preset)
    hf.update(cfg.model_overrides)
    if "num_hidden_layers" in cfg.model_overrides and "layer_types" not in cfg.model_overrides:
        hf["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention"
                             for i in range(hf["num_hidden_layers"])]
    model = GptOssForCausalLM.from_config(GptOssConfig.from_hf_dict(hf), trainable=True, seed=cfg.seed)
    return model.to(device)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine down to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


@torch.no_grad()
def eval_loss(model: torch.nn.Module, windows: dict[str, torch.Tensor], autocast: bool) -> dict[str, float]:
    """Mean next-token loss per domain on fixed windows [n, T+1]."""
    was_training = model.training
    model.eval()
    out = {}
    for d, w in windows.items():
        total, count = 0.0, 0
        for chunk in w.split(16):
            with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
                logits = model(chunk[:, :-1]).logits
            total += float(next_token_loss(logits, chunk[:, 1:])) * chunk[:, 1:].numel()
            count += chunk[:, 1:].numel()
        out[d] = total / count
    model.train(was_training)
    return out


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _hardware(device: torch.device) -> dict[str, Any]:
    hw = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
          "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
    return hw


def train(cfg: TrainConfig, tokenizer) -> tuple[GptOssForCausalLM, dict[str, Any], dict[str, dict]]:
    """Run the whole schedule; returns the trained (QAT) model, the log dict and the eval windows."""
    t0 = time.time()
    device = _device(cfg.device)
    cuda = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    texts = {d: load_text(d, "train") for d in DOMAINS}
    if cfg.exclude_calib:
        texts = {d: t[: len(t) - len(load_text(d, "calib"))] for d, t in texts.items()}
    if cfg.max_chars:
        texts = {d: t[: cfg.max_chars] for d, t in texts.items()}
    train_data = DomainStreams({d: tokenize(tokenizer, t).to(device) for d, t in texts.items()})
    calib = DomainStreams.build(tokenizer, "calib", max_chars=cfg.max_chars, device=device)
    held = DomainStreams.build(tokenizer, "heldout", max_chars=cfg.max_chars, device=device)
    windows = {"calib": eval_windows(calib, cfg.seq_len, cfg.eval_windows),
               "heldout": eval_windows(held, cfg.seq_len, cfg.eval_windows)}
    batches = MixedBatches(train_data, cfg.batch_size, cfg.seq_len, cfg.seed)
    model = build_model(cfg, device)
    opt = make_optimizer(model, cfg, fused=cuda)
    top_k = model.config.num_experts_per_tok
    log: dict[str, Any] = {
        "config": vars(cfg).copy(), "hardware": _hardware(device),
        "model": {"hf_config": model.config.to_hf_dict(),
                  "parameters": sum(p.numel() for p in model.parameters())},
        "data": {"train_tokens": train_data.num_tokens(), "calib_tokens": calib.num_tokens(),
                 "heldout_tokens": held.num_tokens(), "tokens_per_step": cfg.batch_size * cfg.seq_len},
        "train": [], "eval": [],
    }
    print(f"[train] {log['model']['parameters']:,} parameters, train tokens {train_data.num_tokens()}", flush=True)
    setup_s = time.time() - t0
    t_train = time.time()
    acc = torch.zeros(2, device=device)                                    # running (ce, aux) sums
    n_acc, qat_from, stopped_early = 0, cfg.steps - cfg.qat_steps, False
    with dense_moe(model), residual_dropout(model, cfg.dropout):
        model.train()
        for step in range(cfg.steps):
            if cfg.qat_steps and step == qat_from:
                enable_mxfp4_qat_(model)
                log["qat_started_step"] = step
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            inputs, targets = batches.next()
            with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
                out = model(inputs, output_router_logits=True)
                ce = next_token_loss(out.logits, targets)
                aux = mean_balancing_loss(out.router_logits, top_k)
                loss = ce + cfg.aux_coef * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            acc += torch.stack((ce.detach(), aux.detach()))
            n_acc += 1
            last = step == cfg.steps - 1
            if (step + 1) % cfg.log_every == 0 or last:
                ce_m, aux_m = (acc / n_acc).tolist()
                el = time.time() - t_train
                log["train"].append({"step": step + 1, "loss": ce_m, "aux": aux_m, "lr": lr, "elapsed_s": el,
                                     "tokens_per_s": (step + 1) * cfg.batch_size * cfg.seq_len / el})
                acc.zero_()
                n_acc = 0
            if (step + 1) % cfg.eval_every == 0 or last:
                ev = {k: eval_loss(model, w, cuda) for k, w in windows.items()}
                log["eval"].append({"step": step + 1, **ev})
                mean = {k: sum(v.values()) / len(v) for k, v in ev.items()}
                tr = log["train"][-1]
                print(f"[train] step {step + 1}: loss {tr['loss']:.4f} aux {tr['aux']:.4f} calib {mean['calib']:.4f} "
                      f"heldout {mean['heldout']:.4f} lr {lr:.2e} ({time.time() - t0:.0f}s)", flush=True)
            if cfg.time_limit_s and time.time() - t0 > cfg.time_limit_s and not last:
                stopped_early = True
                log["stopped_early_at_step"] = step + 1
                break
        if cuda:
            torch.cuda.synchronize()
        train_s = time.time() - t_train
        model.eval()
        freqs = expert_frequencies(model, windows["heldout"])
        log["final"] = {
            "heldout_loss": eval_loss(model, windows["heldout"], cuda),
            "calib_loss": eval_loss(model, windows["calib"], cuda),
            "qat": "qat_started_step" in log, "stopped_early": stopped_early,
            "expert_frequencies_heldout": freqs, "router_js_divergence": specialisation(freqs),
            "expert_load": load_summary(freqs),
        }
    log["timing"] = {"setup_s": setup_s, "train_s": train_s, "steps_done": log["train"][-1]["step"],
                     "tokens_seen": log["train"][-1]["step"] * cfg.batch_size * cfg.seq_len}
    return model, log, windows
