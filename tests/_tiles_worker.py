"""CPU check of the expert-sort kernels (mxq.runtime.tile_kernels) in the Triton interpreter.

Run by tests/test_runtime_tiles.py in a subprocess with TRITON_INTERPRET=1 (the switch is read when the kernels
are defined):

    TRITON_INTERPRET=1 python tests/_tiles_worker.py

Prints one JSON object per case: {"case": ..., "P": ..., "equal": {output: bool}, "seconds": ...}, comparing
``expert_tiles`` (the two kernels) with ``expert_tiles_torch`` exactly.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("run with TRITON_INTERPRET=1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mxq.runtime.interp_patch import apply as _patch  # noqa: E402

_patch()

from mxq.runtime import moe_kernels as M  # noqa: E402
from mxq.runtime import tile_kernels as TK  # noqa: E402

torch.set_num_threads(1)


def uniform(n: int, k: int, e: int, seed: int) -> torch.Tensor:
    """Distinct top-k experts per token, like the router."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]).int()


def cases():
    """(name, idx [N, k], E, bm)."""
    for n, k, e, bm in ((1, 4, 32, 64), (7, 4, 32, 64), (2048, 4, 32, 64), (2048, 4, 32, 128), (300, 4, 128, 64),
                        (513, 4, 5, 16), (2200, 4, 128, 16)):       # the last: 35 chunks, 678 tile entries
        yield f"uniform N={n} k={k} E={e} bm={bm}", uniform(n, k, e, n + e), e, bm
    yield "all pairs on one expert", torch.full((700, 4), 17, dtype=torch.int32), 32, 64
    g = torch.Generator().manual_seed(3)
    sparse = torch.tensor([0, 3, 4, 9, 30])[torch.randint(0, 5, (900, 4), generator=g)].int()
    yield "5 of 32 experts used (0, 3, 4, 9, 30)", sparse, 32, 64
    yield "int64 ids, E=1", torch.zeros(130, 2, dtype=torch.int64), 1, 16
    yield "int64 ids, non-contiguous", uniform(600, 4, 20, 1).long().t().contiguous().t(), 20, 128
    skew = torch.randint(0, 128, (1000, 4), generator=g)
    skew[torch.rand(1000, 4, generator=g) < 0.8] = 77
    yield "skewed: 80% on expert 77 of 128", skew.int(), 128, 64
    yield "P=0", torch.zeros(0, 4, dtype=torch.int32), 32, 64


def main() -> None:
    assert TK.dev_ok(torch.zeros(1)), "expected the interpreter"
    for name, idx, e, bm in cases():
        t0 = time.perf_counter()
        try:
            fn = M.expert_tiles if bm == M.GROUP_BM else TK.expert_tiles   # also through moe_kernels
            got = fn(idx, e, bm=bm)
            ref = TK.expert_tiles_torch(idx, e, bm)
            eq = {n: bool(a.dtype == b.dtype and torch.equal(a, b))
                  for n, a, b in zip(("order", "te", "ts", "tn"), got, ref)}
            print(json.dumps({"case": name, "P": idx.numel(), "equal": eq,
                              "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
        except Exception as exc:                                          # report, keep going
            print(json.dumps({"case": name, "error": f"{type(exc).__name__}: {exc}"}), flush=True)


if __name__ == "__main__":
    main()
