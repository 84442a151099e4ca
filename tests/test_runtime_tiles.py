"""CPU tests of the prefill expert sort (``mxq.runtime.tile_kernels``).

* The kernels, in the Triton interpreter (``tests/_tiles_worker.py`` in a subprocess with TRITON_INTERPRET=1,
  ~10 s): all four outputs equal ``expert_tiles_torch`` exactly, over sizes from 1 pair to 35 chunks and 678
  tile entries, E from 1 to 128 (not only powers of two), bm 16/64/128, int32 and int64 ids, one expert taking
  every pair, empty experts, skewed routing, no pairs.
* The reference itself (in process): order is a stable sort by expert; live tiles cover every sorted position
  once, each of one expert and at most bm long, as few as possible and first in the table; padding tiles are
  (E - 1, 0, 0). So the exact comparison above cannot pass against a wrong reference.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

WORKER = Path(__file__).with_name("_tiles_worker.py")


def test_kernels_equal_reference_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True, env=env, timeout=600)
    res = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert r.returncode == 0 and len(res) == 13, \
        f"worker failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    bad = [c for c in res if "error" in c or not all(c["equal"].values())]
    assert not bad, bad


def check_tiles(idx: torch.Tensor, e: int, bm: int) -> None:
    """The documented properties of ``expert_tiles_torch``'s outputs, checked from scratch."""
    from mxq.runtime.tile_kernels import expert_tiles_torch

    order, te, ts, tn = expert_tiles_torch(idx, e, bm)
    flat = idx.reshape(-1).long()
    p = flat.numel()
    assert all(t.dtype == torch.int32 for t in (order, te, ts, tn))
    t_max = -(-p // bm) + e
    assert te.shape == ts.shape == tn.shape == (t_max,) and order.shape == (p,)
    assert sorted(order.tolist()) == list(range(p))                          # a permutation of the pair ids
    key = flat[order.long()] * (p + 1) + order.long()                       # (expert, pair id) strictly increasing
    assert bool((key[1:] > key[:-1]).all())
    live = (ts < tn).tolist()
    n_live = sum(live)
    assert live == [True] * n_live + [False] * (t_max - n_live)              # real tiles first
    counts = torch.bincount(flat, minlength=e)
    assert n_live == int(((counts + bm - 1) // bm).sum())                    # as few tiles as possible
    covered = torch.zeros(p, dtype=torch.int64)
    for tau in range(n_live):
        a, b, x = int(ts[tau]), int(tn[tau]), int(te[tau])
        assert 0 < b - a <= bm and 0 <= x < e
        assert bool((flat[order[a:b].long()] == x).all())                   # one expert per tile
        covered[a:b] += 1
    assert bool((covered == 1).all())                                       # every sorted position once
    pad = slice(n_live, t_max)
    assert bool((te[pad] == e - 1).all() and (ts[pad] == 0).all() and (tn[pad] == 0).all())


def test_reference_small_example():
    from mxq.runtime.tile_kernels import expert_tiles_torch

    order, te, ts, tn = expert_tiles_torch(torch.tensor([[2, 0], [2, 2]], dtype=torch.int32), 4, 16)
    assert order.tolist() == [1, 0, 2, 3]
    assert te.tolist() == [0, 2, 3, 3, 3] and ts.tolist() == [0, 1, 0, 0, 0] and tn.tolist() == [1, 4, 0, 0, 0]


@pytest.mark.parametrize("n,k,e,bm,mode", [(1, 4, 32, 64, "uniform"), (513, 4, 5, 16, "uniform"),
                                           (300, 4, 128, 64, "uniform"), (400, 4, 32, 64, "one"),
                                           (600, 4, 32, 16, "sparse"), (900, 4, 128, 128, "skewed")])
def test_reference_properties(n, k, e, bm, mode):
    g = torch.Generator().manual_seed(n + e)
    idx = torch.randint(0, e, (n, k), generator=g, dtype=torch.int32)
    if mode == "one":
        idx.fill_(e // 2)
    elif mode == "sparse":
        idx = torch.tensor([1, 2, 7, 31])[idx % 4].int()
    elif mode == "skewed":
        idx[torch.rand(n, k, generator=g) < 0.8] = 3
    check_tiles(idx, e, bm)


def test_bad_input_raises():
    from mxq.runtime.tile_kernels import expert_tiles

    idx = torch.zeros(4, 2, dtype=torch.int32)
    for args, name in (((idx.reshape(-1), 32, 64), "idx"), ((idx.float(), 32, 64), "idx"),
                       ((idx, 0, 64), "num_experts"), ((idx, 32, 48), "bm"), ((idx, 32, 8), "bm")):
        with pytest.raises(ValueError, match=name):
            expert_tiles(*args)


def test_cpu_tensor_without_interpreter_uses_reference():
    from mxq.runtime import tile_kernels as TK
    from mxq.runtime.moe_kernels import expert_tiles

    if TK.dev_ok(torch.zeros(1)):
        pytest.skip("TRITON_INTERPRET=1 in this process")
    idx = torch.randint(0, 32, (50, 4), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    for a, b in zip(expert_tiles(idx, 32), TK.expert_tiles_torch(idx, 32, 64)):
        assert torch.equal(a, b)
