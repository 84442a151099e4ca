"""``python -m mxq.convert SRC --to TARGET --out OUT``: any checkpoint mxq reads, in a form an engine loads.

SRC: the HF gpt-oss layout (MXFP4 or bf16 experts), an ``original/`` folder, mxq's own layout (any formats,
mixed, pruned or not), a run's ``model/`` folder, or a run folder holding one. TARGET is an export target of
``mxq.io.targets`` (``hf``, ``original``, ``gguf``, ``mxq``, ...: ``--help`` lists them). The checkpoint is
carried over as it is (no expert dropped, no format changed, except where the target says so and reports
the added error); tensors stream one layer at a time, and OUT appears only when complete (temporary name,
then rename). An existing OUT is refused unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .io.errors import ExportError
from .io.safetensors_io import CheckpointError
from .io.sources import open_source
from .io.targets import TARGETS, Written, write_target
from .plan import Plan, PlanError


def source_plan(src) -> Plan:
    """The identity plan of a source: every expert kept in its stored format, attention / lm_head as stored."""
    cfg = src.config
    att = {"bf16" if p is None else p.format for p in (src.linear(f"model.layers.{i}.self_attn.{x}_proj.weight")
                                                       for i in range(cfg.num_hidden_layers) for x in "qkvo")}
    if len(att) != 1:
        raise ExportError(f"{getattr(src, 'folder', 'source')}: attention projections in several formats {sorted(att)}")
    lm = src.linear("lm_head.weight")
    return Plan([list(src.formats(i)) for i in range(cfg.num_hidden_layers)], att.pop(),
                "bf16" if lm is None else lm.format, planner="convert")


def resolve_run_folder(path: str | Path) -> Path:
    """A run folder stands for its ``model/`` export."""
    p = Path(path)
    if p.is_dir() and not (p / "config.json").exists() and (p / "model" / "config.json").exists():
        return p / "model"
    return p


def convert(source: str | Path, to: str, out: str | Path, overwrite: bool = False, **options) -> Written:
    """Write the checkpoint ``source`` as target ``to`` into ``out`` (see the module docstring)."""
    src = open_source(resolve_run_folder(source))
    return write_target(to, src, source_plan(src), out, overwrite, **options)


def write_formats(model_dir: str | Path, formats: list[str], out_dir: str | Path, overwrite: bool = False,
                  **options) -> list[Written]:
    """The run pipeline's ``export.formats``: each target written from the exported ``model_dir`` (what the
    user receives) into ``out_dir/model.gguf`` (file targets) or ``out_dir/model-<target>/``. ``hf`` is the
    exported folder itself when that is in the HF layout."""
    src = open_source(model_dir)
    plan, out = source_plan(src), []
    for name in formats:
        if name == "hf" and not getattr(src, "packed_specs", None):      # model/ already is the HF layout
            out.append(Written(Path(model_dir)))
            continue
        t = TARGETS[name]
        dest = Path(out_dir) / (f"model.{name}" if t.file else f"model-{name}")
        out.append(write_target(name, src, plan, dest, overwrite,
                                **{k: v for k, v in options.items() if k in t.options}))
    return out


def main(argv: list[str] | None = None) -> int:
    targets = "\n".join(f"  {t.name:<20} {t.summary}" for t in TARGETS.values())
    ap = argparse.ArgumentParser(prog="python -m mxq.convert", description=__doc__.split("\n\n")[0],
                                 epilog="targets:\n" + targets, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="checkpoint folder, run folder, or preset name (tiny)")
    ap.add_argument("--to", required=True, choices=list(TARGETS), help="export target")
    ap.add_argument("--out", required=True, type=Path, help="output folder (a .gguf file for --to gguf)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    ap.add_argument("--gguf-type", default=None,
                    help="gguf: re-quantize layers whose experts have no exact GGML type to this type "
                         "(f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, mxfp4); the added error is printed")
    ap.add_argument("--shard-gb", type=float, default=None, help="folder targets: shard size in GB (default 2)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    opts = {"gguf_type": a.gguf_type, "shard_bytes": int(a.shard_gb * 1e9) if a.shard_gb else None}
    try:
        w = convert(a.src, a.to, a.out, a.overwrite, **opts)
    except (ExportError, CheckpointError, PlanError, FileExistsError) as e:
        print(f"mxq.convert: {e}", file=sys.stderr)
        return 2
    for note in w.notes:
        print(note)
    print(f"wrote {w.path} ({a.to}) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
