"""Patch the installed triton 3.6 interpreter (``TRITON_INTERPRET=1``) for numpy 2.x; idempotent.

Two gaps break mxq.runtime's kernels under the interpreter (docs/runtime.md, "Developing without a GPU"):

1. ``int()`` of a loaded scalar (e.g. a ``range()`` bound read from memory) fails on numpy >= 2.4 because the
   scalar is a 1-element array: ``__index__`` now reads ``.reshape(-1)[0]``.
2. fp32 -> bf16 casts truncate (the interpreter passes no rounding mode, and its RTNE branch rounds half up
   without carrying into the exponent): fp32 -> bf16 now rounds to nearest even like the GPU (NaN stays NaN).

    python bench/patch_triton_interp.py          # patches site-packages/triton/runtime/interpreter.py
    python bench/patch_triton_interp.py --check  # exit 1 if not patched

Each patch is marked with "# mxq-patch"; a patched file is left alone; the first run keeps the original
as interpreter.py.orig. Development only, not for GPUs.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

INDEX_OLD = 'scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))'
INDEX_NEW = ('scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))'
             '  # mxq-patch: numpy 2.x')
CONV_HEAD = "def _convert_float(input, input_dtype, output_dtype, rounding_mode):\n"
CONV_NEW = CONV_HEAD + '''    # mxq-patch: fp32 -> bf16 rounds to nearest even (the code below truncates when no mode is given)
    if (input_dtype.primitive_bitwidth == 32 and output_dtype.primitive_bitwidth == 16
            and output_dtype.fp_mantissa_width == 7 and rounding_mode in (None, _ir.ROUNDING_MODE.RTNE)):
        u = np.frombuffer(input.tobytes(), dtype=np.uint32)
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        r = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
        r = np.where(nan, ((u >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16), r)
        return r.reshape(input.shape)
'''


def target() -> Path:
    import triton.runtime.interpreter as m
    return Path(m.__file__)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    path = target()
    src = path.read_text()
    need_index = INDEX_OLD in src
    need_conv = "mxq-patch: fp32 -> bf16" not in src
    if a.check:
        print(f"{path}: index {'unpatched' if need_index else 'ok'}, fp32->bf16 {'unpatched' if need_conv else 'ok'}")
        return 1 if (need_index or need_conv) else 0
    if need_index:
        src = src.replace(INDEX_OLD, INDEX_NEW)
    if need_conv:
        if CONV_HEAD not in src:
            print(f"{path}: _convert_float not found; not patched", file=sys.stderr)
            return 1
        src = src.replace(CONV_HEAD, CONV_NEW, 1)
    if need_index or need_conv:
        backup = path.with_name(path.name + ".orig")
        if not backup.exists():
            backup.write_text(path.read_text())
        tmp = path.with_name(path.name + ".mxq-tmp")
        tmp.write_text(src)
        os.replace(tmp, path)                       # atomic: a concurrent reader sees the old or new file
    print(f"{path}: index {'patched now' if need_index else 'already ok'}, "
          f"fp32->bf16 {'patched now' if need_conv else 'already ok'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
