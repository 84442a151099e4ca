"""Exports that other engines load: the exact gpt-oss HF layout when it can hold the plan, else mxq's own.

Layouts are tried in registry order and the first that accepts the plan writes it:

* ``hf-mxfp4``: every kept expert MXFP4, attention and lm_head bf16 -> the published HF layout with
  ``num_local_experts`` = experts kept (format spec 9: loads unmodified in transformers and vLLM).
* ``hf-bf16``: every kept expert bf16 -> transformers' dequantized layout (spec 2.2), no quantization_config.
* ``mxq``: anything else (other formats, mixed, fp8 attention) -> docs/export.md, loaded by ``mxq.load_model``.

``export_model`` writes a model that ``apply_`` has already changed (through ``mxq.io.save_model`` for the
HF layouts); ``export_checkpoint`` applies a plan straight from a checkpoint folder to a new folder
without loading the model, tensor by tensor, so its memory does not grow with the model.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..io.export_hf import TOKENIZER_FILES, generation_config, save_model
from ..io.writer import DEFAULT_SHARD_BYTES, MXFP4_QUANT_CONFIG, write_checkpoint
from .apply import current_plan
from .export_mxq import write_mxq
from .plan import Plan, PlanError
from .sources import ModelSource, open_source
from .streams import hf_stream, mxq_stream


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


def _check_applied(model, plan: Plan) -> None:
    cur, want = current_plan(model), plan.applied()
    if (cur.experts, cur.attention, cur.lm_head) != (want.experts, want.attention, want.lm_head):
        raise PlanError("export_model: the model does not carry this plan (expert counts or formats differ); "
                        "call mxq.plan.apply_(model, plan) first, or use export_checkpoint(source, plan, out)")


def export_model(model, plan: Plan, out_dir: str | Path, source_dir: str | Path | None = None,
                 overwrite: bool = False, shard_bytes: int | None = None) -> Path:
    """Write ``model`` (already ``apply_``-ed with ``plan``) into ``out_dir``, atomically and streaming."""
    _check_applied(model, plan)
    lay = choose_layout(plan)
    tok = source_dir or model.source
    if lay.experts is not None:
        return save_model(model, out_dir, experts=lay.experts, tokenizer_dir=tok, overwrite=overwrite,
                          shard_bytes=shard_bytes)
    src = ModelSource(model, tok)
    applied = plan.applied()
    return write_mxq(src, applied, mxq_stream(src, applied), out_dir, plan, overwrite, shard_bytes)


def export_checkpoint(source: str | Path, plan: Plan, out_dir: str | Path, overwrite: bool = False,
                      shard_bytes: int | None = None) -> Path:
    """Apply ``plan`` to the checkpoint folder ``source`` and write the result, without loading a model."""
    if plan.merge is not None:
        raise PlanError("export_checkpoint: a merge plan combines the members' weights, which this streaming path "
                        "does not do; load the model, mxq.plan.apply_(model, plan), then export_model")
    src = open_source(source)
    plan.check(src.config)
    lay = choose_layout(plan)
    if lay.experts is None:
        return write_mxq(src, plan, mxq_stream(src, plan), out_dir, plan, overwrite, shard_bytes)
    cfg = replace(src.config, num_local_experts=plan.num_kept)
    cfg_d = cfg.to_hf_dict()
    if lay.experts == "mxfp4":
        cfg_d["quantization_config"] = dict(MXFP4_QUANT_CONFIG)
    tok = Path(src.tokenizer_dir) if src.tokenizer_dir else None
    extra = {f: tok / f for f in TOKENIZER_FILES if tok is not None and (tok / f).exists()}
    return write_checkpoint(out_dir, cfg_d, hf_stream(src, plan, lay.experts), extra, generation_config(cfg),
                            shard_bytes or DEFAULT_SHARD_BYTES, overwrite)

