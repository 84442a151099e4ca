"""``python -m mxq.dequantize IN OUT``: any checkpoint mxq reads -> a standard bf16 HF gpt-oss checkpoint.

IN may be the published HF layout (MXFP4 or bf16 experts), an ``original/`` folder, or mxq's own layout
(any formats, pruned or not). OUT is transformers' dequantized layout, as a model loaded with
``Mxfp4Config(dequantize=True)`` saves it (``gate_up_proj`` [E, H, 2I], ``down_proj`` [E, I, H], no
``quantization_config``; transformers ``integrations/mxfp4.py``), loadable by transformers and vLLM without a
quantizer. Dequantizing MXFP4 to bf16 is where other tools run out of memory (huggingface/transformers#43696,
sgl-project/sglang#8864): here it is the identity plan "every expert bf16" run through ``export_checkpoint``,
which reads one layer at a time from disk and writes shards as it goes, into a temporary folder renamed into
place only when complete.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .io.sources import open_source
from .io.targets import export_checkpoint
from .options import positive_float
from .plan import Plan


def dequantize(src_dir: str | Path, out_dir: str | Path, overwrite: bool = False,
               shard_bytes: int | None = None) -> Path:
    """Write ``src_dir`` as a bf16 HF checkpoint in ``out_dir`` (attention and lm_head bf16 as well).

    Every tensor of ``src_dir`` is checked first (``mxq.validate_weights``): NaN/Inf or an MXFP4 scale byte
    0xFF is refused, naming layer, expert and tensor (the bf16 conversion could not carry them anyway: the
    formats refuse non-finite weights)."""
    from .io.reader import resolve_source
    from .validate_weights import require_valid

    cfg = open_source(src_dir).config
    require_valid(resolve_source(src_dir), option=None)
    plan = Plan.uniform(cfg.num_hidden_layers, cfg.num_local_experts, "bf16", planner="dequantize")
    return export_checkpoint(src_dir, plan, out_dir, overwrite=overwrite, shard_bytes=shard_bytes)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mxq.dequantize", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="checkpoint folder (HF, original/ or mxq layout)")
    ap.add_argument("out", type=Path, help="output folder (must not exist unless --overwrite)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace OUT if it is a checkpoint made only of files mxq writes (anything else is refused)")
    ap.add_argument("--shard-gb", type=positive_float, default=None, help="shard size in GB, > 0 (default 2)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    shard = max(1, int(a.shard_gb * 1e9)) if a.shard_gb is not None else None
    out = dequantize(a.src, a.out, a.overwrite, shard)
    print(f"wrote {out} (bf16 experts) in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
