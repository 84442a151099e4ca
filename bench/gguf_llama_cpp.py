"""llama.cpp against mxq on the same GGUF-exported checkpoints: perplexity of held-out text, token for token.

    python bench/gguf_llama_cpp.py                                  # the embedded model as shipped
    python bench/gguf_llama_cpp.py --run outputs/runs/<...>_prune_25pct   # and a run's exported model/

For each checkpoint: ``python -m mxq.convert SRC --to gguf``, then llama.cpp (llama-cpp-python, CPU) and mxq
(float32) score the first ``--chars`` characters of a domain's held-out split in disjoint windows of
``--window`` tokens (mxq.evaluate.perplexity.sliding_windows, stride = window); both see the same token ids
(checked: llama.cpp's tokenizer must give mxq's ids). Prints one markdown row per checkpoint.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def llama_nll(gguf: Path, tokens: list[int], windows, n_ctx: int, **llama_kw) -> tuple[float, int]:
    """llama.cpp's summed negative log-likelihood (nats) and scored-token count over mxq's windows
    (``mxq.evaluate.perplexity.sliding_windows``): each window from a reset context, scoring its positions
    ``first .. end-1`` as mxq's ``target_logprobs`` does."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                          verbose=False, **llama_kw)
    nll, n = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(tokens[w.begin:w.end])
        lg = np.asarray(llm.scores[: w.end - w.begin], dtype=np.float64)                # [W, V]
        lp = lg - np.logaddexp.reduce(lg, axis=-1, keepdims=True)
        for pos in range(w.first, w.end):
            nll -= lp[pos - 1 - w.begin, tokens[pos]]
            n += 1
    return nll, n


def score(src: Path, gguf: Path, domain: str, chars: int, window: int) -> dict:
    import llama_cpp

    import mxq
    from mxq.data.corpus import load_text
    from mxq.evaluate.perplexity import sliding_windows, target_logprobs

    tok = mxq.load_tokenizer(src)
    text = load_text(domain, "heldout")[:chars]
    ids = tok(text, add_special_tokens=False).input_ids
    vocab = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    same = vocab.tokenize(text.encode(), add_bos=False, special=False) == ids
    wins = sliding_windows(len(ids), window, window)
    t0 = time.perf_counter()
    nll, n = llama_nll(gguf, ids, wins, window)
    t_llama = time.perf_counter() - t0
    model = mxq.load_model(src, dtype=torch.float32)
    t0 = time.perf_counter()
    lp = target_logprobs(model, torch.tensor(ids), window, window, batch_size=4)
    t_mxq = time.perf_counter() - t0
    p_mxq, p_llama = math.exp(-float(lp.double().sum()) / lp.numel()), math.exp(nll / n)
    return {"tokens": n, "same_ids": same, "ppl_mxq": p_mxq, "ppl_llama": p_llama,
            "rel": p_llama / p_mxq - 1, "s_mxq": t_mxq, "s_llama": t_llama}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", default=[], help="a run folder (its model/ is exported)")
    ap.add_argument("--domain", default="austen")
    ap.add_argument("--chars", type=int, default=6000)
    ap.add_argument("--window", type=int, default=512)
    a = ap.parse_args()
    from mxq.convert import convert, resolve_run_folder
    from mxq.io.sources import open_source
    from mxq.presets import resolve_preset_path

    srcs = [("tiny (as shipped)", resolve_preset_path("tiny"))] + [(Path(r).name, resolve_run_folder(r)) for r in a.run]
    print(f"llama-cpp-python {__import__('llama_cpp').__version__}, {platform.processor() or platform.machine()}, "
          f"{a.domain} held-out, first {a.chars} chars, windows of {a.window}")
    print("| checkpoint | experts/layer | tokens | same ids | ppl mxq (fp32) | ppl llama.cpp | rel. diff |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for name, src in srcs:
            g = convert(src, "gguf", Path(d) / f"{len(name)}.gguf").path
            r = score(src, g, a.domain, a.chars, a.window)
            E = open_source(src).config.num_local_experts
            print(f"| {name} | {E} | {r['tokens']} | {r['same_ids']} | {r['ppl_mxq']:.4f} | {r['ppl_llama']:.4f} | "
                  f"{100 * r['rel']:+.3f}% |")


if __name__ == "__main__":
    main()
