"""Calibration data for router statistics and quantizers: ``build_calibration(cfg, tokenizer)``."""
from .config import CalibConfig, CalibError
from .windows import CalibSet, build_calibration

__all__ = ["CalibConfig", "CalibError", "CalibSet", "build_calibration"]
