"""Calibrated quantization of experts (GPTQ on routed tokens): ``quantize_(model, plan, recipe, ...)``.

    rep = mxq.quant.quantize_(model, plan, cfg.recipe, tokenizer=tok, calib_cfg=cfg.calib, run_dir=run_dir)

``recipe.quant.method=rtn`` is ``mxq.plan.apply_``; ``gptq`` quantizes layer by layer on the calibration
tokens (``calibrate``), onto each format's grid (``grid``), with per-expert Hessians (``hessian``) and
writes ``calibration.json``. Options and their validation: ``options``.
"""
from .calibrate import METHODS, quantize_
from .options import GPTQOptions, gptq_options

__all__ = ["METHODS", "GPTQOptions", "gptq_options", "quantize_"]
