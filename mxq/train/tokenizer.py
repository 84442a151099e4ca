"""Train the embedded model's byte-level BPE tokenizer: ``python -m mxq.train.tokenizer OUT_DIR``.

It is built like gpt-oss's o200k_harmony tokenizer (openai/gpt-oss ``gpt_oss/tokenizer.py``), only smaller: the
o200k split regex, then byte-level BPE, a ByteLevel decoder and a post-processor that inserts no BOS/EOS.
Vocabulary: exactly ``VOCAB_SIZE`` = 6144 (the ``tiny`` preset's ``vocab_size``): id 0 ``<|endoftext|>`` (pad
and eos), id 1 ``<|startoftext|>`` (bos), then the 256 byte symbols, then merges. Trained on the corpus
``train`` split only, so held-out text never shaped the vocabulary either. The result is deterministic (checked
by ``tests/test_tokenizer_tiny.py`` against the shipped file).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mxq.data.corpus import DOMAINS, load_text

VOCAB_SIZE = 6144
EOS, BOS = "<|endoftext|>", "<|startoftext|>"
SPECIAL_TOKENS = (EOS, BOS)      # ids 0 and 1, in this order
MODEL_MAX_LENGTH = 4096          # the preset's original (pre-YaRN) context; training used 512
# tiktoken's o200k_base split (also gpt-oss's): case-aware words with contractions, 1-3 digit groups,
# punctuation runs, newline runs, spaces.
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
CHUNK_CHARS = 1 << 16


def _train_chunks() -> Iterator[str]:
    """The train split of every domain in pieces of about 64 KiB, cut after a newline.

    The split regex never joins text across a newline boundary except inside whitespace runs, so chunking
    changes only the rare pre-token that straddles a cut, and it is the same every run.
    """
    for domain in DOMAINS:
        text = load_text(domain, "train")
        start = 0
        while start < len(text):
            end = text.find("\n", start + CHUNK_CHARS)
            end = len(text) if end < 0 else end + 1
            yield text[start:end]
            start = end


def empty_tokenizer() -> Tokenizer:
    """The untrained pipeline: o200k split -> bytes -> BPE; decode bytes back; no added BOS/EOS."""
    tok = Tokenizer(models.BPE(fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train the BPE on the corpus train split; ids 0/1 are the special tokens."""
    tok = empty_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_train_chunks(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"BPE training gave {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, wanted {i}")
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str | Path) -> list[Path]:
    """Write the three HF tokenizer files that ``PreTrainedTokenizerFast.from_pretrained`` reads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return [out / n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mxq.train.tokenizer", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", help="folder to write tokenizer.json, tokenizer_config.json, special_tokens_map.json")
    args = ap.parse_args(argv)
    for path in save_tokenizer(train_tokenizer(), args.out_dir):
        print(path)


if __name__ == "__main__":
    main()
