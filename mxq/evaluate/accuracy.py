"""The ``accuracy`` section: per-domain perplexity, KL / top-1 agreement vs the baseline, lm-eval tasks.

One forward pass of the candidate per batch of windows feeds both the perplexity (log-prob of the
target) and the KL (the whole distribution against the reference), so KL costs no extra candidate
compute. Results are per domain and per task, never only an average: FP4 formats can collapse one
skill while the average looks fine (math fell from 77.7 to 3.7 in vllm-project/llm-compressor#2936).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import per_doc
from .intervals import Settings
from .kl import Reference, kl_rows
from .metrics import LOGLIKELIHOOD_NOTE, quantile
from .perplexity import heldout_tokens, perplexity, sliding_windows, window_logprobs


def _domains(spec: Any) -> list[str]:
    from ..data.corpus import DOMAINS

    if spec in (None, "all"):
        return list(DOMAINS)
    return [spec] if isinstance(spec, str) else list(spec)


def _kl_summary(kl: torch.Tensor, agree: torch.Tensor) -> dict[str, float]:
    return {"mean": float(kl.double().mean()), "p99": quantile(kl, 0.99), "max": float(kl.max()),
            "top1_agreement": float(agree.double().mean()), "tokens": int(kl.numel())}


@torch.no_grad()
def heldout_accuracy(model, tokenizer, cfg: dict[str, Any], baseline_source: str | None, cache_dir: Path,
                     run_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Perplexity per domain (+ token-weighted "mean") and KL vs ``baseline_source`` on the same tokens."""
    pc, kc = cfg.get("perplexity", {}), cfg.get("kl", {})
    max_len, stride = int(pc.get("max_length", 256)), int(pc.get("stride", pc.get("max_length", 256)))
    bs = int(pc.get("batch_size", cfg.get("batch_size", 4)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    domains = _domains(pc.get("domains", "all"))
    tokens = {d: heldout_tokens(tokenizer, d, pc.get("max_tokens")) for d in domains}
    windows = {d: sliding_windows(len(t), max_len, stride) for d, t in tokens.items()}
    items = [(tokens[d], w) for d in domains for w in windows[d]]                  # windows of all domains
    item_dom = torch.tensor([i for i, d in enumerate(domains) for _ in windows[d]])  # [n_items]
    tok_pos = torch.cat([torch.arange(w.first, w.end) for _, w in items]) if items else torch.zeros(0)  # [N]
    ref = None
    notes = [LOGLIKELIHOOD_NOTE]
    if kc.get("enabled", True) and baseline_source:
        ref = Reference(baseline_source, items, bs, pad, model, kc, cache_dir, progress)
    elif kc.get("enabled", True):
        notes.append("KL vs baseline not computed: no baseline source was given to evaluate().")
    model.eval()
    nll = torch.zeros(len(domains), dtype=torch.float64)
    count = torch.zeros(len(domains), dtype=torch.long)
    kls, agrees, doms, nlls = [], [], [], []
    ref_iter = ref.batches() if ref is not None else None
    for lq, tgt, owner in window_logprobs(model, items, bs, pad, progress, "perplexity + KL"):
        dom = item_dom[owner]                                                          # [m]
        tok_nll = -lq.gather(-1, tgt[:, None]).squeeze(-1).double().cpu()             # [m]
        nll.index_add_(0, dom, tok_nll)
        count += torch.bincount(dom, minlength=len(domains))
        nlls.append(tok_nll)
        doms.append(dom)
        if ref_iter is not None:
            k, a = kl_rows(next(ref_iter), lq, ref.cache_dtype)
            kls.append(k)
            agrees.append(a)
    ppl = {d: perplexity(float(nll[i]), int(count[i])) for i, d in enumerate(domains)}
    ppl["mean"] = perplexity(float(nll.sum()), int(count.sum()))
    detail = {"max_length": max_len, "stride": stride, "split": "heldout", "bos": "none (as lm-eval's HF backend)",
              "tokens": {d: int(count[i]) for i, d in enumerate(domains)},
              "windows": {d: len(windows[d]) for d in domains}, "batch_size": bs}
    out: dict[str, Any] = {"perplexity": ppl, "perplexity_detail": detail, "kl_vs_baseline": None, "notes": notes}
    dom_all = torch.cat(doms) if doms else torch.zeros(0, dtype=torch.long)           # [N] in item order
    units = per_doc.heldout_units(domains, dom_all, tok_pos, torch.cat(nlls) if nlls else torch.zeros(0),
                                  torch.cat(kls) if kls else None, torch.cat(agrees) if agrees else None,
                                  int(pc.get("block_tokens", per_doc.BLOCK_TOKENS)))
    out["_per_doc"] = {"heldout": units}
    if ref is not None:
        ref.free()
        kl_all, ag_all = torch.cat(kls), torch.cat(agrees)
        per_dom = {d: (kl_all[dom_all == i], ag_all[dom_all == i]) for i, d in enumerate(domains)}
        out["kl_vs_baseline"] = {**_kl_summary(kl_all, ag_all),
                                 "per_domain": {d: _kl_summary(*v) for d, v in per_dom.items()},
                                 "reference": ref.describe(), "direction": "KL(P_baseline || Q_model), nats"}
        if run_dir is not None:   # per-token values for the report's histogram (a few KB)
            from ..atomic import save_safetensors_atomic

            save_safetensors_atomic(Path(run_dir) / "kl_per_token.safetensors",
                                    {d: v[0].float().contiguous() for d, v in per_dom.items()})
    return out


def accuracy_report(model, tokenizer, cfg: dict[str, Any], baseline_source: str | None, cache_dir: Path,
                    run_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"perplexity": None, "kl_vs_baseline": None, "notes": [LOGLIKELIHOOD_NOTE]}
    if cfg.get("perplexity", {}).get("enabled", True):
        out.update(heldout_accuracy(model, tokenizer, cfg, baseline_source, cache_dir, run_dir, progress))
    lc = cfg.get("lm_eval", {})
    if lc.get("enabled", False):
        from .lmeval_run import run_lm_eval

        with tqdm(total=1, desc="lm-eval", disable=not progress, leave=False) as bar:
            out["lm_eval"] = run_lm_eval(model, tokenizer, lc, run_dir)
            bar.update(1)
    add_intervals(out, Settings.from_cfg(cfg.get("intervals")), run_dir)
    return out


def add_intervals(out: dict[str, Any], s: Settings, run_dir: Path | None) -> None:
    """Bootstrap intervals of every held-out and lm-eval metric into ``out``; per-unit values to per_doc.json.

    The intervals sit beside the point values (``perplexity_ci``, ``kl_vs_baseline.*_ci``, ``lm_eval.ci``) so
    that readers of ``accuracy.perplexity.<domain>`` keep getting a number.
    """
    units = out.pop("_per_doc", None) or {}
    le = out.get("lm_eval") or {}
    if le.get("_per_doc"):
        units["lm_eval"] = le.pop("_per_doc")
    if not units:
        return
    out["intervals"] = s.describe()
    if "heldout" in units:
        ci = per_doc.heldout_intervals(units["heldout"], s)
        out["perplexity_ci"] = ci["perplexity"]
        out["intervals"]["heldout_units"] = ci["units"]
        kl = out.get("kl_vs_baseline")
        if kl and "kl_mean" in ci:
            kl["mean_ci"], kl["top1_agreement_ci"] = ci["kl_mean"]["all"], ci["top1_agreement"]["all"]
            for d, v in kl.get("per_domain", {}).items():
                v["mean_ci"], v["top1_agreement_ci"] = ci["kl_mean"].get(d), ci["top1_agreement"].get(d)
    if "lm_eval" in units:
        le["ci"] = per_doc.lmeval_intervals(units["lm_eval"], s)
        out["intervals"]["lm_eval_units"] = "one per document (lm-eval log_samples)"
    if run_dir is not None:
        per_doc.write(Path(run_dir), units)
