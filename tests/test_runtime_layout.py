"""The MXFP4 GEMV's f16 arithmetic, CPU only: its x layout (``mxq.runtime._common.h2perm_index``), the bit trick
that turns two E2M1 nibbles into an f16 pair (the PTX in ``_FP4_F16_ASM`` / ``fp4_pair_f16``), and the
power-of-two scales that keep its f16 products in range.

Within each block of 32, element 8w + n (nibble n of the block's int32 word w, low nibble first) sits at
8 (n % 4) + 2w + n // 4, so the GEMV reads the x pairs of nibbles (j, j + 4) for the block's 4 words as one
16-byte vector. A wrong layout or decode would pair weights with the wrong activations or values everywhere,
so both are pinned here independently of any kernel."""
from __future__ import annotations

import math

import torch

from mxq.formats.mxfp4 import FP4_VALUES
from mxq.runtime._common import FP4_PAIR_SHIFTS, X_EXP, Y_EXP, h2perm_index, y_f16_ok


def pair_f16(w: int, j: int) -> tuple[float, float]:
    """Pair slot j of the 32-bit word w decoded exactly as the kernel's PTX (built from ``FP4_PAIR_SHIFTS``) does,
    as two Python floats."""
    vs, ss = FP4_PAIR_SHIFTS[j]
    v = ((w << vs) if vs >= 0 else (w >> -vs)) & 0x0E000E00
    v |= (w << ss) & 0x80008000
    v &= 0xFFFFFFFF
    halves = torch.tensor([v & 0xFFFF, v >> 16], dtype=torch.int32).to(torch.int16).view(torch.float16)
    return float(halves[0]), float(halves[1])


def test_h2perm_is_a_permutation_within_each_block():
    n = 2880                                                     # gpt-oss hidden size: 90 blocks
    p = h2perm_index(n)
    assert sorted(p.tolist()) == list(range(n))
    assert torch.equal(p // 32, torch.arange(n) // 32)           # never leaves its block


def test_x_pairs_of_one_slot_are_contiguous_over_the_words():
    """What the kernel loads for slot j: 4 f16 pairs (x[8w + j], x[8w + j + 4]) for words w = 0..3."""
    x = torch.arange(64.0)
    stored = torch.empty(64)
    stored[h2perm_index(64)] = x
    for blk in range(2):
        for j in range(4):
            got = stored[32 * blk + 8 * j:32 * blk + 8 * j + 8].tolist()
            want = [32 * blk + v for w in range(4) for v in (8 * w + j, 8 * w + j + 4)]
            assert got == want


def test_every_nibble_pair_decodes_to_its_e2m1_value_times_2_pow_minus_14():
    """All 16 x 16 code pairs in every slot: f16 = E2M1 value x 2^-14, exactly (e = 0 lands on f16 subnormals)."""
    for j in range(4):
        for lo in range(16):
            for hi in range(16):
                w = (lo << (4 * j)) | (hi << (4 * (j + 4)))
                # other nibbles hold 0b0111 / 0b1111 junk that must not leak into the pair
                junk = sum(0xF << (4 * n) for n in range(8) if n not in (j, j + 4))
                for word in (w, w | junk, w | (junk & 0x77777777)):
                    a, b = pair_f16(word, j)
                    assert a == float(FP4_VALUES[lo]) * 2.0 ** -14, (j, lo, hi, hex(word))
                    assert b == float(FP4_VALUES[hi]) * 2.0 ** -14, (j, lo, hi, hex(word))


def test_f16_products_stay_in_range():
    """|x| < 2^X_EXP and |w| <= 6 x 2^-14: products below 12, sums of 4 below 48 (f16 max 65504), and the
    smallest nonzero weight times an x of 2^-8 of the row maximum is still a normal f16."""
    big = 6 * 2.0 ** -14 * 2.0 ** X_EXP
    assert big <= 12 and 4 * big < 65504
    assert 0.5 * 2.0 ** -14 * 2.0 ** (X_EXP - 1 - 8) >= 2.0 ** -14


def test_swiglu_limit_bounds_the_f16_y():
    assert y_f16_ok(7.0)                                         # gpt-oss: |y| <= 56 < 2^(15 - 9)
    assert (7.0 + 1) * 7.0 * 2.0 ** Y_EXP < 2.0 ** X_EXP
    assert not y_f16_ok(8.0) and not y_f16_ok(math.inf) and not y_f16_ok(float("nan"))
