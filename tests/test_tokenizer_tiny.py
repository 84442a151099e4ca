"""The shipped tiny tokenizer: offline loading, exact vocab, lossless round trip, gpt-oss-like specials."""
from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mxq.data.corpus import DOMAINS, load_text
from mxq.train import tokenizer as tt

TINY = Path(tt.__file__).resolve().parents[1] / "assets" / "tiny"


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(TINY), local_files_only=True)


def test_loads_offline_both_ways(tok: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    auto = AutoTokenizer.from_pretrained(str(TINY), local_files_only=True)
    assert auto("The LORD is my shepherd").input_ids == tok("The LORD is my shepherd").input_ids


def test_vocab_and_special_ids(tok: PreTrainedTokenizerFast) -> None:
    assert len(tok) == 6144 == tt.VOCAB_SIZE
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 0 == tok.eos_token_id == tok.pad_token_id
    assert tok.convert_tokens_to_ids("<|startoftext|>") == 1 == tok.bos_token_id
    ids = tok("Hello there").input_ids
    assert 0 not in ids and 1 not in ids          # no automatic BOS/EOS (like gpt-oss)


@pytest.mark.parametrize("domain", DOMAINS)
def test_round_trip_heldout(tok: PreTrainedTokenizerFast, domain: str) -> None:
    text = load_text(domain, "heldout")[:20000]
    assert tok.decode(tok(text).input_ids) == text


def test_round_trip_odd_text(tok: PreTrainedTokenizerFast) -> None:
    text = "  1 In\tthe\r\n\n“Ünïcödé” — 12345 日本語 🙂 don't  \n"
    assert tok.decode(tok(text).input_ids) == text
    assert tok("<|endoftext|>").input_ids == [0]


def test_retraining_reproduces_the_shipped_file(tmp_path: Path) -> None:
    tt.save_tokenizer(tt.train_tokenizer(), tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == (TINY / "tokenizer.json").read_bytes()
