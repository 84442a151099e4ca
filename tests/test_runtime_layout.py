"""The MXFP4 GEMV's x layout (``mxq.runtime._common.xperm_index``), CPU only.

Within each block of 32, element 8w + n (nibble n of the block's int32 word w, low nibble first) sits at 4n + w,
so the GEMV reads the x of nibble n for the block's 4 words as one 16-byte vector. A wrong layout would pair
weights with the wrong activations everywhere, so it is pinned here independently of any kernel."""
from __future__ import annotations

import torch

from mxq.runtime._common import xperm_index


def test_xperm_is_a_permutation_within_each_block():
    n = 2880                                                     # gpt-oss hidden size: 90 blocks
    p = xperm_index(n)
    assert sorted(p.tolist()) == list(range(n))
    assert torch.equal(p // 32, torch.arange(n) // 32)           # never leaves its block


def test_xperm_puts_nibble_n_of_word_w_at_4n_plus_w():
    p = xperm_index(64)
    for blk in range(2):
        for w in range(4):
            for nib in range(8):
                assert p[32 * blk + 8 * w + nib] == 32 * blk + 4 * nib + w


def test_x_of_one_nibble_is_contiguous_over_the_words():
    """What the kernel loads for nibble n of words 0..3: 4 consecutive positions holding elements n, 8+n, 16+n, 24+n."""
    x = torch.arange(32.0)
    stored = torch.empty(32)
    stored[xperm_index(32)] = x
    for nib in range(8):
        assert stored[4 * nib:4 * nib + 4].tolist() == [nib, 8 + nib, 16 + nib, 24 + nib]
