"""Standard JSON for every file mxq writes: NaN and +-Inf become ``null`` (RFC 8259 has no such numbers).

Python's ``json.dumps`` writes bare ``NaN``/``Infinity`` by default, which ``jq``, JavaScript and most JSON
parsers reject; a metrics.json with a NaN perplexity must still load everywhere (the NaN says "no number",
which is what ``null`` means). ``dumps`` replaces them and then calls ``json.dumps(allow_nan=False)`` so a
missed case fails loudly instead of writing non-standard JSON.
"""
from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (Python, numpy or 0-d tensor) replaced by None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if hasattr(obj, "dtype") and hasattr(obj, "tolist"):         # numpy scalars/arrays, torch tensors
        return finite(obj.tolist())
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """``json.dumps`` of ``finite(obj)`` with ``allow_nan=False`` (other keyword arguments passed through)."""
    return json.dumps(finite(obj), allow_nan=False, **kw)
