"""o200k_harmony built offline from bpe-openai's ranks: same ids as the reference o200k encoder, harmony
specials at their ids (openai/harmony public_encodings.rs), no automatic BOS/EOS, a reused cache, and the
harmony prompt (openai/harmony docs/format.md)."""
from __future__ import annotations

import gzip
import random
import time
from pathlib import Path

import bpe_openai
import pytest
from transformers import PreTrainedTokenizerFast

from mxq import tokenizer as T

SAMPLE = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say you've done it, isn't it? WE'RE HERE. She'd've LL'D",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tif a != b:\n\t\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }  // C\r\n<div class=\"x\">&amp;</div>",
    "3.14159 2025-06-28 1,234,567 0x1F 1e-9 123456789012 +42 -7 ½ ² ٣٤٥ ४२",
    "Ünïcödé “quotes” — dash … 日本語のテキスト 中文 한국어 Ελληνικά русский עברית العربية हिन्दी",
    "emoji 🙂👍🏽👨‍👩‍👧 flags 🇫🇷 zwj\u200d nbsp\u00a0 combining e\u0301 a\u0308",
    "   leading spaces   and     runs\t\t\ttabs \n\n\n  \r\n\r\n trailing   ",
    "path/to/file.py:12 https://example.com/a?b=c&d=e#f user@host.org C:\\Windows\\",
    "", " ", "\n", "a", "  \n", "'s", "'",
]


def _fuzz(n: int, seed: int = 0) -> list[str]:
    """Random mixes of scripts, marks, digits, apostrophes and whitespace: stresses the regex split."""
    pools = ["abcXYZ", "'’", "0123456789", " \t\n\r\u00a0\u3000", "!?.,;:/\\-_()[]{}<>|@#$%^&*=+~`\"",
             "éÉßøÆ\u0301\u0308", "日本語中文", "한국어", "ΑαΩω", "Жж", "العربية", "हिन्दी", "🙂👍🏽\u200d", "ǅǈ"]
    rng = random.Random(seed)
    return ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def cache() -> Path:
    """The real cache ($MXQ_CACHE or ~/.cache/mxq): the first run builds (seconds), later runs reuse it."""
    return T.default_cache_dir()


@pytest.fixture(scope="module")
def folder(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("o200k_harmony")
    T.write_tokenizer_files(out, "o200k_harmony", cache_dir=cache)
    return out


@pytest.fixture(scope="module")
def tok(folder: Path) -> PreTrainedTokenizerFast:
    return T.load_tokenizer(folder)


@pytest.fixture(scope="module")
def ref():
    return bpe_openai.get_encoding("o200k_base")


def test_files_written(folder: Path) -> None:
    names = {p.name for p in folder.iterdir()}
    assert names == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}


@pytest.mark.parametrize("text", SAMPLE + ["\n".join(SAMPLE)])
def test_same_ids_as_bpe_openai(tok: PreTrainedTokenizerFast, ref, text: str) -> None:
    ids = tok(text).input_ids
    assert ids == ref.encode(text) == ref.encode_ordinary(text)
    assert tok.decode(ids) == text


def test_same_ids_fuzz(tok: PreTrainedTokenizerFast, ref) -> None:
    texts = _fuzz(2000)  # a wrong split regex mismatches ~5% of these
    assert [tok(t).input_ids for t in texts] == [ref.encode_ordinary(t) for t in texts]
    assert all(tok.decode(tok(t).input_ids) == t for t in texts)


def test_special_token_text(tok: PreTrainedTokenizerFast, ref) -> None:
    """HF parses special-token strings as specials by default, tiktoken-style encoders reject them
    unless allowed. Same ids when both treat them as specials, or both as plain text."""
    text = "end<|endoftext|>next <|endofprompt|>."
    with pytest.raises(Exception):
        ref.encode(text)
    assert tok(text).input_ids == ref.encode(text, allowed_special="all")
    assert 199999 in tok(text).input_ids and 200018 in tok(text).input_ids
    assert tok(text, split_special_tokens=True).input_ids == ref.encode_ordinary(text)
    assert 199999 in tok(text).input_ids  # the per-call option left no state behind


def test_special_ids(tok: PreTrainedTokenizerFast) -> None:
    for name, i in T.HARMONY_SPECIALS.items():
        assert tok.convert_tokens_to_ids(name) == i, name
        assert tok("x" + name).input_ids == [87, i]
    for i in (200000, 200001, 200004, 200009, 200010, 200011, 200013, 200017):
        assert tok.convert_ids_to_tokens(i) == f"<|reserved_{i}|>"
    assert len(tok) == 200019
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (199998, 200002, 199999)
    assert tok.model_max_length == 131072


def test_no_bos_eos_added(tok: PreTrainedTokenizerFast, ref) -> None:
    ids = tok("Hello there").input_ids
    assert ids == tok("Hello there", add_special_tokens=False).input_ids == ref.encode("Hello there")
    assert not set(ids) & set(T.HARMONY_SPECIALS.values())


def test_cache_reused(cache: Path, folder: Path) -> None:
    path = T.o200k_tokenizer_json(cache)
    mtime = path.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert T.o200k_tokenizer_json(cache) == path
    assert time.perf_counter() - t0 < 1.0
    assert path.stat().st_mtime_ns == mtime
    assert path.read_bytes() == (folder / "tokenizer.json").read_bytes()


def test_corrupt_source_raises(tmp_path: Path) -> None:
    lines = gzip.decompress(T.o200k_source().read_bytes()).splitlines(keepends=True)
    bad = tmp_path / "o200k_base.tiktoken.gz"
    bad.write_bytes(gzip.compress(b"".join(lines[:-1])))  # one token dropped
    with pytest.raises(ValueError, match="SHA-256"):
        T.o200k_tokenizer_json(tmp_path / "c", source=bad)
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="gzip"):
        T.o200k_tokenizer_json(tmp_path / "c", source=bad)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        T.load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        T.write_tokenizer_files(tmp_path, "gpt2")


def test_tiny_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not (T._TINY_DIR / "tokenizer.json").is_file():
        pytest.skip("embedded tiny tokenizer not produced yet")
    T.write_tokenizer_files(tmp_path, "tiny")
    assert T.load_tokenizer(tmp_path)("Hello").input_ids == T.load_tokenizer("tiny")("Hello").input_ids
    monkeypatch.setattr(T, "_TINY_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="embedded tiny tokenizer is missing"):
        T.write_tokenizer_files(tmp_path / "out", "tiny")


SPEC_PROMPT = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\n"
    "Current date: 2025-06-28\n"
    "\n"
    "Reasoning: medium\n"
    "\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
    "<|start|>user<|message|>What is 2+2?<|end|><|start|>assistant"
)


def test_harmony_prompt() -> None:
    assert T.harmony_prompt("What is 2+2?") == SPEC_PROMPT
    assert T.harmony_prompt("What is 2+2?", "2025-06-28", "medium") == SPEC_PROMPT
    assert "Reasoning: high\n" in T.harmony_prompt("x", reasoning="high")
    assert "Current date: 2024-01-02\n" in T.harmony_prompt("x", date_string="2024-01-02")
    with pytest.raises(ValueError):
        T.harmony_prompt("x", reasoning="max")


def test_chat_template_matches_harmony_prompt(tok: PreTrainedTokenizerFast) -> None:
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == SPEC_PROMPT
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, date_string="2024-01-02",
                                   reasoning_effort="low") == T.harmony_prompt("What is 2+2?", "2024-01-02", "low")
    chat = [{"role": "system", "content": "Be brief."}, *msgs, {"role": "assistant", "content": "4"}]
    out = tok.apply_chat_template(chat, tokenize=False)
    assert out.endswith("<|start|>developer<|message|># Instructions\n\nBe brief.\n\n<|end|>"
                        "<|start|>user<|message|>What is 2+2?<|end|>"
                        "<|start|>assistant<|channel|>final<|message|>4<|return|>")
    ids = tok(SPEC_PROMPT).input_ids
    assert ids[:2] == [200006, 17360] and ids[-2:] == [200006, 173781]  # <|start|>system ... <|start|>assistant


def test_preset_names(cache: Path, tok: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MXQ_CACHE", str(cache))
    assert T.load_tokenizer("gpt-oss-20b")(SPEC_PROMPT).input_ids == tok(SPEC_PROMPT).input_ids
