"""``python -m mxq.train [--key value ...]``: train the embedded tiny GPT-OSS and write its checkpoint.

Every ``TrainConfig`` field is a flag (``--steps 4000 --out_dir runs/tiny``; dict fields take JSON).
Output folder: the HF gpt-oss layout with MXFP4 experts (``mxq.io.save_model``), the tokenizer files,
``training_log.json`` and ``loss.png``. After writing, the checkpoint is read back with
``mxq.load_model`` and its held-out loss logged next to the in-memory model's (``reload_check``).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

import torch

from mxq.train.config import TrainConfig


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    ap = argparse.ArgumentParser(prog="python -m mxq.train", description=__doc__.splitlines()[0])
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        ap.add_argument(f"--{f.name}", default=None, help=f"default: {getattr(defaults, f.name)!r}")
    ns = ap.parse_args(argv)
    kw = {}
    for f in fields(TrainConfig):
        raw = getattr(ns, f.name)
        if raw is None:
            continue
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            kw[f.name] = raw.lower() in ("1", "true", "yes")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            kw[f.name] = type(default)(raw)
        elif isinstance(default, dict) or default is None:
            kw[f.name] = json.loads(raw)
        else:
            kw[f.name] = raw
    return TrainConfig(**kw)


def run(cfg: TrainConfig) -> dict:
    """Train with ``cfg``; if ``cfg.save``, write the checkpoint and check it by reading it back."""
    from transformers import PreTrainedTokenizerFast

    from mxq.io import load_model, save_model
    from mxq.train.loop import TINY_DIR, eval_loss, train
    from mxq.train.report import write_log

    tok = PreTrainedTokenizerFast.from_pretrained(str(TINY_DIR), local_files_only=True)
    model, log, windows = train(cfg, tok)
    if cfg.save:
        device = model.device
        save_model(model.cpu(), cfg.out_dir, experts="mxfp4", tokenizer_dir=TINY_DIR, overwrite=True)
        reloaded = load_model(cfg.out_dir, device=device, dtype=torch.bfloat16)
        held = {d: w.to(device) for d, w in windows["heldout"].items()}
        log["reload_check"] = {"heldout_loss_mxfp4_checkpoint_bf16": eval_loss(reloaded, held, autocast=False),
                               "heldout_loss_in_memory": log["final"]["heldout_loss"]}
        print(f"[train] reload check: {log['reload_check']}", flush=True)
    for path in write_log(log, cfg.out_dir):
        print(f"[train] wrote {path}", flush=True)
    return log


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
