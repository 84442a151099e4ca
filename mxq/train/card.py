"""Measure the numbers of the embedded model's card: ``python -m mxq.train.card MODEL_DIR PART --out F.json``.

PART is one of
* ``ppl``: token perplexity of the whole held-out split per domain, computed by mxq on the shipped MXFP4
  checkpoint and by transformers (``GptOssForCausalLM`` + ``Mxfp4Config(dequantize=True)``) on the same
  windows, plus a unigram model (add-one smoothed token frequencies of the train split, same tokenizer)
  scored on the same target tokens. Windows: 512 tokens (the training length), disjoint except for the
  one context token, no BOS (as lm-eval's HF backend feeds it), i.e.
  ``mxq.evaluate.perplexity.sliding_windows(n, 512, 512)``.
* ``routing``: per-domain expert-frequency distributions on held-out windows and their per-layer
  Jensen-Shannon divergences (``mxq.train.routing``).
* ``lmeval``: the local lm-eval tasks through mxq's lm-eval backend (``MxqLM``) and/or, as a
  cross-check, lm-eval's ``HFLM`` on the transformers model (``--adapters``, ``--tasks``).

Every PART writes its own JSON so parts can run apart (they take minutes each on a 2-core CPU).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

from mxq import jsonout
from mxq.atomic import write_atomic
from mxq.data.corpus import DOMAINS, load_text

WINDOW = 512


def _tokens(tok, domain: str, split: str) -> torch.Tensor:
    return torch.tensor(tok(load_text(domain, split), add_special_tokens=False, verbose=False).input_ids)


def _hf_model(model_dir: str, dtype: torch.dtype):
    from transformers import GptOssForCausalLM, Mxfp4Config

    return GptOssForCausalLM.from_pretrained(model_dir, quantization_config=Mxfp4Config(dequantize=True),
                                             dtype=dtype).eval()


class _HFAdapter(torch.nn.Module):
    """Gives a transformers model mxq's call signature (``model(ids, attention_mask=...).logits``)."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    @property
    def device(self) -> torch.device:
        return self.hf.device

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.hf(input_ids=ids, attention_mask=attention_mask)


def _nll_per_domain(model, tokens: dict[str, torch.Tensor], batch: int) -> dict[str, dict[str, float]]:
    from mxq.evaluate.perplexity import sliding_windows, window_logprobs

    out = {}
    for d, toks in tokens.items():
        items = [(toks, w) for w in sliding_windows(len(toks), WINDOW, WINDOW)]
        nll, n = 0.0, 0
        for lp, tgt, _ in window_logprobs(model, items, batch):
            nll -= float(lp.gather(-1, tgt[:, None]).double().sum())
            n += int(tgt.numel())
        out[d] = {"nll_sum": nll, "tokens": n, "ppl": math.exp(nll / n)}
    return out


def unigram(tok, tokens: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Add-one smoothed unigram over the train split (all domains pooled), scored on tokens 1..n-1."""
    vocab = len(tok)
    counts = torch.ones(vocab, dtype=torch.float64)
    for d in DOMAINS:
        counts += torch.bincount(_tokens(tok, d, "train"), minlength=vocab).double()
    logp = torch.log(counts / counts.sum())
    out = {}
    for d, toks in tokens.items():
        nll = -float(logp[toks[1:]].sum())
        out[d] = {"nll_sum": nll, "tokens": len(toks) - 1, "ppl": math.exp(nll / (len(toks) - 1))}
    return out


def part_ppl(model_dir: str, device: str, batch: int) -> dict[str, Any]:
    import mxq

    tok = mxq.load_tokenizer(model_dir)
    tokens = {d: _tokens(tok, d, "heldout") for d in DOMAINS}
    res: dict[str, Any] = {"window": WINDOW, "stride": WINDOW, "bos": False, "unigram": unigram(tok, tokens)}
    dtypes = [torch.float32] + ([torch.bfloat16] if device.startswith("cuda") else [])
    for dt in dtypes:
        name = str(dt).removeprefix("torch.")
        t = time.time()
        res[f"mxq_{name}"] = _nll_per_domain(mxq.load_model(model_dir, device=device, dtype=dt), tokens, batch)
        res[f"mxq_{name}"]["seconds"] = time.time() - t
        t = time.time()
        res[f"transformers_{name}"] = _nll_per_domain(_HFAdapter(_hf_model(model_dir, dt).to(device)), tokens, batch)
        res[f"transformers_{name}"]["seconds"] = time.time() - t
    return res


def part_routing(model_dir: str, device: str) -> dict[str, Any]:
    import mxq
    from mxq.train.routing import expert_frequencies, load_summary, specialisation

    tok = mxq.load_tokenizer(model_dir)
    model = mxq.load_model(model_dir, device=device, dtype=torch.float32)
    windows = {}
    for d in DOMAINS:
        toks = _tokens(tok, d, "heldout")
        n = len(toks) // WINDOW
        windows[d] = toks[: n * WINDOW].view(n, WINDOW)                         # [n, 512]
    freqs = expert_frequencies(model, windows)
    return {"windows_per_domain": {d: int(w.shape[0]) for d, w in windows.items()}, "expert_frequencies": freqs,
            "js_divergence_bits": specialisation(freqs), "load": load_summary(freqs)}


def part_lmeval(model_dir: str, device: str, batch: int, limit: int | None, adapters: list[str],
                tasks: list[str], out_path: Path) -> dict[str, Any]:
    """Run ``tasks`` with each adapter; the JSON is rewritten after each one (runs take long on a CPU)."""
    import lm_eval

    import mxq
    from mxq.data.evals import task_manager

    def make(name: str):
        if name == "mxq":
            from mxq.evaluate.lmeval_adapter import MxqLM

            return MxqLM(pretrained=model_dir, batch_size=batch, device=device, dtype="float32")
        try:
            from lm_eval.models.huggingface import HFLM  # imports the accelerate package
        except ImportError as e:
            raise SystemExit(f"--adapters hflm needs lm-eval's HFLM, which failed to import ({e}); "
                             "install it with: pip install -e '.[card]'") from e

        return HFLM(pretrained=_hf_model(model_dir, torch.float32).to(device),
                    tokenizer=mxq.load_tokenizer(model_dir), batch_size=batch)

    out: dict[str, Any] = {"tasks": tasks, "limit": limit}
    for name in adapters:
        t = time.time()
        res = lm_eval.simple_evaluate(model=make(name), tasks=tasks, task_manager=task_manager(), limit=limit,
                                      log_samples=False)
        out[name] = {"results": res["results"], "seconds": time.time() - t}
        write_atomic(out_path, jsonout.dumps(out, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mxq.train.card", description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("part", choices=("ppl", "routing", "lmeval"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--limit", type=int, default=None, help="lm-eval documents per task (default: all)")
    ap.add_argument("--adapters", default="mxq,hflm", help="lmeval: mxq (MxqLM) and/or hflm (transformers)")
    ap.add_argument("--tasks", default="tiny_ppl,tiny_cloze,tiny_nextsent", help="lmeval: task or group names")
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.part == "ppl":
        res = part_ppl(args.model_dir, args.device, args.batch)
    elif args.part == "routing":
        res = part_routing(args.model_dir, args.device)
    else:
        res = part_lmeval(args.model_dir, args.device, args.batch, args.limit, args.adapters.split(","),
                          args.tasks.split(","), Path(args.out))
    cmd = f"python -m mxq.train.card {args.model_dir} {args.part} --device {args.device} --batch {args.batch}"
    if args.part == "lmeval":
        cmd += f" --adapters {args.adapters} --tasks {args.tasks}" + (f" --limit {args.limit}" if args.limit else "")
    res["meta"] = {"command": cmd,
                   "seconds": time.time() - t0, "torch": torch.__version__, "python": platform.python_version(),
                   "machine": platform.machine(), "threads": torch.get_num_threads(),
                   "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    write_atomic(args.out, jsonout.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "expert_frequencies"}, indent=1)[:4000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
