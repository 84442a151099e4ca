"""Export targets: every writer of mxq consumes the same per-layer stream (``mxq.io.streams``) of a
``WeightSource`` (``mxq.io.sources``: a loaded model or a checkpoint folder read lazily) under a plan.

The default export (a run's ``model/`` folder, ``export_checkpoint``) is the exact gpt-oss HF layout when
it can hold the plan, else mxq's own. Layouts are tried in registry order and the first that accepts the
plan writes it:

* ``hf-mxfp4``: every kept expert MXFP4, attention and lm_head bf16 -> the published HF layout with
  ``num_local_experts`` = experts kept (loads unmodified in transformers and vLLM; docs/export.md).
* ``hf-bf16``: every kept expert bf16 -> transformers' dequantized layout, no quantization_config.
* ``mxq``: anything else (other formats, mixed, fp8 attention) -> docs/export.md, loaded by ``mxq.load_model``.

``export_model`` writes a model that ``mxq.plan.apply_`` has already changed (through ``save_model`` for
the HF layouts); ``export_checkpoint`` applies a plan straight from a checkpoint folder to a new folder
without loading the model, tensor by tensor, so its memory does not grow with the model.

Plans are data handed in by the caller: this package never imports ``mxq.plan``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import ExportError
from ..sources import ModelSource, open_source
from ..streams import PROJ, hf_stream, mxq_stream
from ..writer import DEFAULT_SHARD_BYTES, MXFP4_QUANT_CONFIG, write_checkpoint
from .hf import TOKENIZER_FILES, generation_config, save_model
from .mxq import write_mxq
from .original import write_original

if TYPE_CHECKING:
    from ...plan.plan import Plan


@dataclass(frozen=True)
class Layout:
    name: str
    accepts: Callable[[Plan], bool]
    experts: str | None          # the HF expert format, None for the mxq layout


def _uniform(fmt: str) -> Callable[[Plan], bool]:
    return lambda p: set(p.formats_used()) == {fmt} and p.attention == "bf16" and p.lm_head == "bf16"


LAYOUTS: list[Layout] = [
    Layout("hf-mxfp4", _uniform("mxfp4"), "mxfp4"),
    Layout("hf-bf16", _uniform("bf16"), "bf16"),
    Layout("mxq", lambda p: True, None),
]


def choose_layout(plan: Plan) -> Layout:
    return next(lay for lay in LAYOUTS if lay.accepts(plan))


def _format(p) -> str:
    return "bf16" if p is None else p.format


def _check_applied(src: ModelSource, plan: Plan) -> None:
    """The model carries ``plan``: its experts per layer, attention and lm_head formats are the plan's."""
    want = plan.applied()
    L = len(src.model.layers)
    rows = [src.formats(i) for i in range(L)]
    att = {_format(src.linear(f"model.layers.{i}.self_attn.{p}.weight")) for i in range(L) for p in PROJ}
    if (rows, att, _format(src.linear("lm_head.weight"))) != (want.experts, {want.attention}, want.lm_head):
        raise ExportError("export_model: the model does not carry this plan (expert counts or formats differ); "
                          "call mxq.plan.apply_(model, plan) first, or use export_checkpoint(source, plan, out)")


def export_model(model, plan: Plan, out_dir: str | Path, source_dir: str | Path | None = None,
                 overwrite: bool = False, shard_bytes: int | None = None) -> Path:
    """Write ``model`` (already ``apply_``-ed with ``plan``) into ``out_dir``, atomically and streaming."""
    tok = source_dir or model.source
    src = ModelSource(model, tok)
    _check_applied(src, plan)
    lay = choose_layout(plan)
    if lay.experts is not None:
        return save_model(model, out_dir, experts=lay.experts, tokenizer_dir=tok, overwrite=overwrite,
                          shard_bytes=shard_bytes)
    applied = plan.applied()
    return write_mxq(src, applied, mxq_stream(src, applied), out_dir, plan, overwrite, shard_bytes)


def _write_hf_layout(src, plan: Plan, out_dir: str | Path, overwrite: bool, shard_bytes: int | None,
                     experts: str) -> Path:
    cfg = replace(src.config, num_local_experts=plan.num_kept)
    cfg_d = cfg.to_hf_dict()
    if experts == "mxfp4":
        cfg_d["quantization_config"] = dict(MXFP4_QUANT_CONFIG)
    tok = Path(src.tokenizer_dir) if src.tokenizer_dir else None
    extra = {f: tok / f for f in TOKENIZER_FILES if tok is not None and (tok / f).exists()}
    return write_checkpoint(out_dir, cfg_d, hf_stream(src, plan, experts), extra, generation_config(cfg),
                            shard_bytes or DEFAULT_SHARD_BYTES, overwrite)


def export_checkpoint(source: str | Path, plan: Plan, out_dir: str | Path, overwrite: bool = False,
                      shard_bytes: int | None = None) -> Path:
    """Apply ``plan`` to the checkpoint folder ``source`` and write the result, without loading a model."""
    if getattr(plan, "merge", None) is not None:
        raise ExportError("export_checkpoint: a merge plan combines the members' weights, which this streaming "
                          "path does not do; load the model, mxq.plan.apply_(model, plan), then export_model")
    src = open_source(source)
    plan.check(src.config)
    lay = choose_layout(plan)
    if lay.experts is None:
        return write_mxq(src, plan, mxq_stream(src, plan), out_dir, plan, overwrite, shard_bytes)
    return _write_hf_layout(src, plan, out_dir, overwrite, shard_bytes, lay.experts)


# ------------------------------------------------------------------------------------------ the registry
@dataclass
class Written:
    """What a target wrote: the file or folder, and sentences the user should read (e.g. added error)."""
    path: Path
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Target:
    name: str
    write: Callable[..., Written]        # (src, plan, out, overwrite=False, **options) -> Written
    summary: str
    file: bool = False                   # writes one file (else a folder)
    options: tuple[str, ...] = ()        # keyword options it accepts besides overwrite


TARGETS: dict[str, Target] = {}


def register_target(name: str, summary: str, file: bool = False, options: tuple[str, ...] = ()) -> Callable:
    def deco(fn: Callable[..., Written]) -> Callable[..., Written]:
        if name in TARGETS:
            raise ValueError(f"export target {name!r} is registered twice")
        TARGETS[name] = Target(name, fn, summary, file, tuple(options))
        return fn

    return deco


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ExportError(f"unknown export target {name!r}; choose from {', '.join(TARGETS)}")
    return TARGETS[name]


def write_target(name: str, src, plan: Plan, out: str | Path, overwrite: bool = False, **options) -> Written:
    """Write ``src`` under ``plan`` in target ``name`` (options a target does not take are an error)."""
    t = get_target(name)
    extra = sorted(k for k, v in options.items() if v is not None and k not in t.options)
    if extra:
        raise ExportError(f"export target {name!r} takes no option {', '.join(extra)} (it takes: "
                          f"{', '.join(t.options) or 'none'})")
    plan.check(src.config)
    return t.write(src, plan, Path(out), overwrite, **{k: v for k, v in options.items() if k in t.options})


@register_target("hf", "the exact gpt-oss HF layout (MXFP4 or bf16 experts, bf16 attention): transformers, vLLM, "
                 "SGLang load it unmodified", options=("shard_bytes",))
def _hf(src, plan: Plan, out: Path, overwrite: bool = False, shard_bytes: int | None = None) -> Written:
    lay = choose_layout(plan)
    if lay.experts is None:
        raise ExportError(f"hf: the HF layout holds experts all MXFP4 or all bf16 with bf16 attention and lm_head; "
                          f"this checkpoint has experts {plan.formats_used()}, attention {plan.attention}, lm_head "
                          f"{plan.lm_head}. Options: --to gguf or --to compressed-tensors (engine formats), "
                          "--to mxq, or python -m mxq.dequantize (bf16 HF)")
    return Written(_write_hf_layout(src, plan, out, overwrite, shard_bytes, lay.experts))


@register_target("mxq", "mxq's own layout: any formats, mixed, fp8 attention; read by mxq.load_model",
                 options=("shard_bytes",))
def _mxq(src, plan: Plan, out: Path, overwrite: bool = False, shard_bytes: int | None = None) -> Written:
    return Written(write_mxq(src, plan, mxq_stream(src, plan), out, plan, overwrite, shard_bytes))


@register_target("original", "OpenAI's original/ layout (MXFP4 experts, fused qkv): OpenAI's reference "
                 "implementation; bf16 experts are quantized to MXFP4 with OpenAI's rule", options=("shard_bytes",))
def _original(src, plan: Plan, out: Path, overwrite: bool = False, shard_bytes: int | None = None) -> Written:
    return write_original(src, plan, out, overwrite, shard_bytes)


@register_target("gguf", "one GGUF file for llama.cpp (architecture gpt-oss): MXFP4 experts bit-exact, bf16 as is, "
                 "other formats only with --gguf-type", file=True, options=("gguf_type",))
def _gguf_target(src, plan: Plan, out: Path, overwrite: bool = False, gguf_type: str | None = None) -> Written:
    from .gguf import write_gguf

    path, req = write_gguf(src, plan, out, overwrite, gguf_type)
    return Written(path, [req.summary()] if req is not None else [])


@register_target("compressed-tensors", "compressed-tensors (llm-compressor's format): int4 W4A16 groups, FP8 channel, "
                 "NVFP4, bf16, mixed as several config groups; written and read with the compressed-tensors library",
                 options=("shard_bytes",))
def _compressed_tensors(src, plan: Plan, out: Path, overwrite: bool = False, shard_bytes: int | None = None) -> Written:
    from .compressed_tensors import write_compressed_tensors

    return write_compressed_tensors(src, plan, out, overwrite, shard_bytes)
