"""In-process fixes for the Triton interpreter (``TRITON_INTERPRET=1``, development and CPU tests only).

The same two gaps as ``bench/patch_triton_interp.py`` (which edits the installed file instead), applied to the
loaded ``triton.runtime.interpreter`` module, so that a CPU test process works on an unpatched install:

1. ``int()`` of a loaded scalar (a ``range()`` bound read from memory) fails on numpy >= 2.4, where the scalar
   is a 1-element array: ``__index__`` reads ``.reshape(-1)[0]``.
2. fp32 -> bf16 casts truncate: they round to nearest even here, as on the GPU (NaN stays NaN).

``apply()`` is idempotent and harmless on an already patched install. It changes the interpreter for the whole
process; call it only where every kernel runs interpreted.
"""
from __future__ import annotations


def apply() -> bool:
    """Patch the interpreter module once; returns False when triton is missing."""
    try:
        import numpy as np
        import triton.runtime.interpreter as ip
    except ImportError:                              # pragma: no cover - CPU-only installs without triton
        return False
    if getattr(ip, "_mxq_patched", False):
        return True
    orig_convert = ip._convert_float
    rtne = ip._ir.ROUNDING_MODE.RTNE

    def _convert_float(input, input_dtype, output_dtype, rounding_mode):
        if (input_dtype.primitive_bitwidth == 32 and output_dtype.primitive_bitwidth == 16
                and output_dtype.fp_mantissa_width == 7 and rounding_mode in (None, rtne)):
            u = np.frombuffer(input.tobytes(), dtype=np.uint32)
            nan = (u & 0x7FFFFFFF) > 0x7F800000
            r = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
            r = np.where(nan, ((u >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16), r)
            return r.reshape(input.shape)
        return orig_convert(input, input_dtype, output_dtype, rounding_mode)

    orig_patch = ip._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    ip._convert_float = _convert_float
    ip._patch_lang_tensor = _patch_lang_tensor
    ip._mxq_patched = True
    return True
