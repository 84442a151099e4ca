"""The shared command line of the no-model floors (``python -m mxq.data.<task>_baseline``): measure the floors
on the committed task items, print the JSON, and optionally write it atomically."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from collections.abc import Callable
from typing import Any

from ..atomic import write_atomic


def floor_main(prog: str, description: str, measure: Callable[[Path], dict[str, Any]], evals_dir: Path,
               argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--evals_dir", default=str(evals_dir))
    ap.add_argument("--out", default=None, help="write the JSON here (atomically) as well as printing it")
    args = ap.parse_args(argv)
    text = json.dumps(measure(Path(args.evals_dir)), indent=1) + "\n"
    if args.out:
        write_atomic(args.out, text)
    print(text, end="")
    return 0
