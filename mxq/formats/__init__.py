"""Numeric formats for expert weights, selected by name through a registry (docs/formats.md).

Registered: mxfp4, nvfp4, nf4, nf4_dq, int4_g32, int4_g128, int4_g32_asym, int4_g128_asym, fp8,
fp8_block, bf16. Every format quantizes a weight along its contraction axis into a ``Packed`` of named
tensors stored ``[out, in]``-major.
"""
from .base import Format, FormatError, Packed
from .registry import get_format, list_formats, register_format
from . import mxfp4, nvfp4, nf4, int4, fp8, bf16  # noqa: F401,E401  (each module registers its formats)
from .mxfp4 import dequantize_mxfp4, quantize_mxfp4

__all__ = [
    "Format", "FormatError", "Packed", "get_format", "list_formats", "register_format",
    "quantize_mxfp4", "dequantize_mxfp4",
]
