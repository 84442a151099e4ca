"""lm-evaluation-harness backend for mxq models: ``@register_model("mxq")``.

Why an own backend instead of ``HFLM(pretrained=model)``: mxq's model keeps experts packed in any mix of
formats and is not a transformers ``PreTrainedModel``; going through transformers would dequantize or
re-load it, so the scores would not be those of what was compressed (transformers dequantizes MXFP4
to bf16 whenever its kernels are missing: ``quantizers/quantizer_mxfp4.py``).

Scoring follows lm-eval's HF backend (``HFLM``) with gpt-oss's tokenizer, which adds no special tokens: raw
token ids of context + continuation, no BOS, no harmony wrapper; the prefix token (BOS, else EOS) only when the
context is empty. Batches are padded on the right with an attention mask (causal attention and per-token MoE
make padding invisible to real tokens), sorted longest-first to waste little padding. ``loglikelihood_rolling``
uses the same sliding windows as mxq's perplexity (``perplexity.sliding_windows``; ``rolling_stride`` =
max_length gives disjoint windows like HFLM). ``chat_format=True`` wraps generative prompts in the gpt-oss
harmony chat format (openai/harmony docs/format.md) and keeps only the final-channel answer: raw completions
collapse gpt-oss scores (GSM8K 0.90 via chat vs 0.30 via completions, reported in vllm-project/vllm#48253).

    lm_eval --model mxq --model_args pretrained=/path/ckpt,dtype=bfloat16,device=cuda --tasks arc_easy
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from ..console import quiet
from ..model.generate import sample_next
from .perplexity import target_logprobs

HARMONY_STOPS = ("<|return|>", "<|call|>", "<|endoftext|>")
FINAL_MARK = "<|channel|>final<|message|>"


def harmony_prompt(text: str) -> str:
    """``mxq.tokenizer.harmony_prompt`` (harmony format, date pinned)."""
    from ..tokenizer import harmony_prompt as render

    return render(text)


def parse_harmony(text: str) -> str:
    """The final-channel answer of a harmony completion; the whole text minus markup when there is none."""
    if FINAL_MARK in text:
        text = text.rsplit(FINAL_MARK, 1)[1]
    for stop in HARMONY_STOPS + ("<|end|>",):
        text = text.split(stop, 1)[0]
    return text


def _dtype(d: Any) -> torch.dtype | None:
    if d in (None, "auto"):
        return None
    return d if isinstance(d, torch.dtype) else getattr(torch, str(d))


@register_model("mxq")
class MxqLM(TemplateLM):
    """An mxq model (in memory, or a checkpoint folder / preset name) as an lm-eval ``LM``."""

    def __init__(self, pretrained: Any = "tiny", tokenizer: Any = None, batch_size: int | str = 8,
                 max_length: int | None = None, device: str | None = None, dtype: Any = "auto",
                 chat_format: bool = False, max_gen_toks: int = 256, rolling_stride: int | None = None,
                 **_: Any):
        super().__init__()
        from .. import load_model, load_tokenizer

        if isinstance(pretrained, (str, Path)):
            dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            dt = _dtype(dtype) or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
            self.model = load_model(pretrained, device=dev, dtype=dt)
            tokenizer = tokenizer or self.model.source
        else:
            self.model = pretrained
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        if self.tokenizer is None:
            raise ValueError("MxqLM needs a tokenizer when given a model object")
        self.model.eval()
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8   # "auto" -> 8
        tok_max = getattr(self.tokenizer, "model_max_length", None) or 2048
        self._max_length = int(max_length) if max_length else min(2048, int(tok_max),
                                                                   self.model.config.max_position_embeddings)
        self.chat_format = str(chat_format).lower() in ("1", "true", "yes")
        self.max_gen_toks = int(max_gen_toks)
        self.rolling_stride = int(rolling_stride) if rolling_stride else self._max_length
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eot_token_id)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None):
        """CLI construction: ``--model_args`` win over the CLI's own ``--device``/``--batch_size``."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ---------------------------------------------------------------- tokenization (TemplateLM contract)
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos if bos is not None else self.eot_token_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return "mxq-harmony" if self.chat_format else "mxq"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list[int]:
        return self.tokenizer(string, add_special_tokens=False).input_ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Harmony rendering with mxq's template, date pinned, for ``--apply_chat_template``."""
        from ..tokenizer import CHAT_TEMPLATE

        return self.tokenizer.apply_chat_template(chat_history, chat_template=CHAT_TEMPLATE, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # ---------------------------------------------------------------- scoring
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **_: Any) -> list[tuple[float, bool]]:
        """Sum of continuation log-probs and whether greedy decoding reproduces it, per request."""
        seqs = []
        for _, ctx, cont in requests:
            full = (ctx + cont)[-(self.max_length + 1):]
            seqs.append((full[:-1], full[1:], len(cont)))                    # inputs, targets, scored tail
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
        res: list[tuple[float, bool] | None] = [None] * len(seqs)
        for s in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm or quiet(), desc="loglikelihood",
                      leave=False):
            idx = order[s:s + self.batch_size]
            width = max(len(seqs[i][0]) for i in idx)
            ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)            # [b, W]
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, :len(seqs[i][0])] = torch.tensor(seqs[i][0])
                mask[r, :len(seqs[i][0])] = 1
            logits = self.model(ids.to(self.device), attention_mask=mask.to(self.device)).logits   # [b, W, V]
            for r, i in enumerate(idx):
                inp, tgt, n = seqs[i]
                lp = torch.log_softmax(logits[r, len(inp) - n:len(inp)].float(), dim=-1)        # [n, V]
                t = torch.tensor(tgt[-n:], device=lp.device)
                res[i] = (float(lp.gather(-1, t[:, None]).sum()), bool((lp.argmax(-1) == t).all()))
        for (args, _, _), r in zip(requests, res):
            self.cache_hook.add_partial("loglikelihood", args, r)
        return res  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents: sliding windows over prefix + tokens, every token once."""
        out = []
        for req in tqdm(requests, disable=disable_tqdm or quiet(), desc="loglikelihood_rolling", leave=False):
            (string,) = req.args
            toks = torch.tensor(self.tok_encode(string), dtype=torch.long)
            lp = target_logprobs(self.model, toks, self.max_length, self.rolling_stride, self.batch_size,
                                 prefix=self.prefix_token_id, pad_id=self.pad_id)
            out.append(float(lp.double().sum()))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), out[-1])
        return out

    # ---------------------------------------------------------------- generation
    def _stop_ids(self) -> set[int]:
        ids = {self.eot_token_id}
        if self.chat_format:
            for s in HARMONY_STOPS:
                i = self.tokenizer.convert_tokens_to_ids(s)
                if isinstance(i, int) and i != self.tokenizer.unk_token_id:
                    ids.add(i)
        return ids

    @torch.no_grad()
    def _generate(self, contexts: list[str], until: list[str], max_gen: int, kw: dict[str, Any]) -> list[str]:
        """Left-padded batch, KV cache; a row stops at a stop id or once its text contains a stop string."""
        enc = [self.tok_encode(c)[-max(self.max_length - max_gen, 1):] for c in contexts]
        b, t = len(enc), max(len(e) for e in enc)
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)                             # [B, T]
        mask = torch.zeros(b, t, dtype=torch.long)
        for r, e in enumerate(enc):
            ids[r, t - len(e):] = torch.tensor(e)
            mask[r, t - len(e):] = 1
        cache = self.model.new_cache(b, t + max_gen)
        out = self.model(ids.to(self.device), attention_mask=mask.to(self.device), cache=cache)
        stop_ids, skip = self._stop_ids(), not self.chat_format
        gen: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        g = torch.Generator(device=self.device).manual_seed(0) if kw.get("do_sample") else None
        step = torch.ones(b, 1, dtype=torch.long, device=self.device)
        for _ in range(max_gen):
            nxt = sample_next(out.logits[:, -1], bool(kw.get("do_sample", False)), float(kw.get("temperature", 1.0)),
                              float(kw.get("top_p", 1.0)), g)                                    # [B]
            for r, tok in enumerate(nxt.tolist()):
                if done[r]:
                    continue
                if tok in stop_ids:
                    done[r] = True
                    continue
                gen[r].append(tok)
                text = self.tok_decode(gen[r], skip_special_tokens=skip)
                done[r] = any(u in text for u in until)
            if all(done):
                break
            out = self.model(nxt[:, None], attention_mask=step, cache=cache)
        texts = []
        for r in range(b):
            text = self.tok_decode(gen[r], skip_special_tokens=skip)
            for u in until:
                text = text.split(u, 1)[0]
            texts.append(parse_harmony(text) if self.chat_format else text)
        return texts

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        res: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or quiet(), desc="generate_until", leave=False)
        for key, idx in groups.items():
            kw = dict(json.loads(key))
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kw.pop("max_gen_toks", self.max_gen_toks))
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                ctxs = [requests[i].args[0] for i in chunk]
                if self.chat_format:
                    ctxs = [c if c.startswith("<|start|>") else harmony_prompt(c) for c in ctxs]
                for i, text in zip(chunk, self._generate(ctxs, until, max_gen, kw)):
                    res[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return res  # type: ignore[return-value]


if __name__ == "__main__":   # `python -m mxq.evaluate.lmeval_adapter run --model mxq --model_args pretrained=DIR ...`
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
