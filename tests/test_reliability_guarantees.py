"""Guarantees the rest of the suite assumed without checking: each format's error bound derived from its own
rounding grid, ``Format.matmul`` against decoders written from the storage specs, pruning ties and counts.

* Error bounds: for a format storing ``W ~= (grid value - shift) * S`` (S the effective per-element scale
  read from the packed tensors), round-to-nearest on the grid errs by at most half the gap between the two
  grid values around ``W / S + shift``, plus the distance to the grid's end when the value saturates. bf16:
  half an ulp (8 significant bits). Each bound is checked element by element and must also be *reached*
  (max error / bound > 0.5), so a loose bound cannot hide a regression. The old single test bound was
  0.2 x amax for all eleven formats.
* matmul: the reference decodes the packed bytes in float64 from the layouts in the format modules'
  docstrings (nibble order, scale encodings), independently of ``dequantize``.
* Pruning: ties in the score prune the lower expert index (``choose_pruned``'s documented rule), tied
  uncalibrated experts likewise, and the count per layer is floor(fraction x E) for fractions that do not
  divide E.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mxq.formats import get_format, list_formats
from mxq.formats.nf4 import NF4_LEVELS, dequantize_nested

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_GRID = torch.tensor(sorted({s * v for v in E2M1 for s in (1, -1)}), dtype=torch.float64)
E4M3_GRID = torch.unique(torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double())
E4M3_GRID = E4M3_GRID[torch.isfinite(E4M3_GRID)]
NF4_GRID = torch.tensor(NF4_LEVELS, dtype=torch.float64)
INT_SYM = torch.arange(-8, 8, dtype=torch.float64)
INT_ASYM = torch.arange(0, 16, dtype=torch.float64)


def expand(s: torch.Tensor, out: int, k: int, g_in: int, g_out: int = 1) -> torch.Tensor:
    """Per-group scales -> [out, k] (groups of g_out rows x g_in columns, ragged last groups allowed)."""
    s = s.double()
    return s.repeat_interleave(g_out, 0)[:out].repeat_interleave(g_in, 1)[:, :k]


def nibbles(packed: torch.Tensor, low_first: bool) -> torch.Tensor:
    """u8 [out, k/2] -> codes [out, k]; ``low_first``: element 2j in the low nibble."""
    lo, hi = (packed & 0x0F).long(), (packed >> 4).long()
    a, b = (lo, hi) if low_first else (hi, lo)
    return torch.stack((a, b), dim=-1).flatten(-2)


def e2m1_value(code: torch.Tensor) -> torch.Tensor:
    mag = torch.tensor(E2M1, dtype=torch.float64)[code & 7]
    return torch.where(code >= 8, -mag, mag)


def grid_of(name: str, p) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(decoded W float64 [out, k], scale S [out, k], shift [out, k], grid) from the packed tensors alone."""
    out, k = p.shape
    t = p.tensors
    zero = torch.zeros(out, k, dtype=torch.float64)
    if name == "mxfp4":                            # blocks [out, k/32, 16], element 2j low; scale 2^(s-127)
        S = expand(torch.ldexp(torch.ones_like(t["scales"], dtype=torch.float64), t["scales"].long() - 127), out, k, 32)
        codes = nibbles(t["blocks"].reshape(out, k // 2), low_first=True)
        return e2m1_value(codes) * S, S, zero, E2M1_GRID
    if name == "nvfp4":                            # element 2j low; S = fp8 block scale x fp32 global scale
        S = expand(t["scales"].double() * float(t["global_scale"]), out, k, 16)
        return e2m1_value(nibbles(t["packed"], low_first=True)) * S, S, zero, E2M1_GRID
    if name.startswith("int4"):                    # offset binary (q + 8) or q with zero point; element 2j low
        g = int(p.meta["group"])
        S = expand(t["scales"], out, k, g)
        q = nibbles(t["packed"], low_first=True).double()
        if p.meta["asym"]:
            z = expand(t["zeros"], out, k, g)
            return (q - z) * S, S, z, INT_ASYM
        return (q - 8) * S, S, zero, INT_SYM
    if name.startswith("nf4"):                     # element 2j in the HIGH nibble (bitsandbytes order)
        if name == "nf4_dq":
            a = dequantize_nested(t["absmax"].reshape(-1), t["nested_absmax"], t["offset"]).reshape(out, -1)
        else:
            a = t["absmax"]
        S = expand(a, out, k, 64)
        return NF4_GRID[nibbles(t["packed"], low_first=False)] * S, S, zero, NF4_GRID
    if name.startswith("fp8"):
        b = int(p.meta.get("block") or 0)
        S = expand(t["scale"], out, k, k) if b == 0 else expand(t["scale"], out, k, b, b)
        return t["weight"].double() * S, S, zero, E4M3_GRID
    assert name == "bf16"
    w = t["weight"].double()
    return w, torch.ones_like(w), zero, torch.empty(0)


def bound(name: str, w: torch.Tensor, S: torch.Tensor, shift: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Largest error round-to-nearest on ``grid`` at scale ``S`` can make for each element of ``w``."""
    w = w.double()
    if name == "bf16":                             # half an ulp: 8 significant bits
        return torch.ldexp(torch.ones_like(w), torch.floor(torch.log2(w.abs().clamp(min=1e-300))).long() - 8)
    v = torch.where(S > 0, w / S, torch.zeros_like(w)) + shift
    vc = v.clamp(float(grid[0]), float(grid[-1]))
    i = torch.searchsorted(grid, vc.contiguous()).clamp(1, len(grid) - 1)
    half_gap = (grid[i] - grid[i - 1]) / 2
    return (half_gap + (v - vc).abs()) * S + 2.0 ** -20 * w.abs()     # + fp32 rounding of the scale product


def weights(kind: str, shape=(40, 320), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    if kind == "student_t":                        # heavy tails: saturation and wide blocks
        z = z / (torch.randn(3, *shape, generator=g).pow(2).sum(0) / 3).sqrt()
    return z


@pytest.mark.parametrize("name", list_formats())
@pytest.mark.parametrize("kind,scale", [("gauss", 1.0), ("student_t", 1.0), ("gauss", 1e-6), ("gauss", 1e5)])
def test_error_within_the_formats_own_rounding_bound(name, kind, scale):
    f = get_format(name)
    w = weights(kind) * scale                                        # [40, 320]: ragged int4_g128/fp8_block groups
    p = f.quantize(w)
    d = f.dequantize(p, torch.float32).double()
    _, S, shift, grid = grid_of(name, p)
    if name == "nf4_dq":            # codes are chosen with the exact block absmax, decoded with its 8-bit copy:
        a = expand(w.abs().reshape(w.shape[0], -1, 64).amax(-1), *w.shape, 64)   # |level| <= 1, so the
        b = bound(name, w, a, shift, grid) + (S - a).abs()                       # copy adds at most |a' - a|
    else:
        b = bound(name, w, S, shift, grid)
    err = (d - w.double()).abs()
    worst = (err / b).max()
    assert bool((err <= b).all()), f"{name}: error {float(err.max()):.3g} beyond its bound at {int((err / b).argmax())}"
    assert float(worst) > 0.5, f"{name}: bound never approached (max error / bound {float(worst):.3f})"


@pytest.mark.parametrize("name", list_formats())
def test_decoders_agree_with_dequantize(name):
    """The spec decoders of this file read the bytes as the format does (else the reference below is moot)."""
    f = get_format(name)
    p = f.quantize(weights("student_t", (24, 256), seed=3))
    ref, *_ = grid_of(name, p)
    torch.testing.assert_close(f.dequantize(p, torch.float32).double(), ref, rtol=2 ** -23, atol=0)


@pytest.mark.parametrize("name", list_formats())
@pytest.mark.parametrize("out,k", [(24, 256), (256, 256)])
def test_matmul_against_spec_decoder(name, out, k):
    f = get_format(name)
    p = f.quantize(weights("gauss", (out, k), seed=1))
    x = weights("gauss", (5, k), seed=2)                              # [N, in]
    w_ref, *_ = grid_of(name, p)                                      # [out, in] float64 from the bytes
    y_ref = torch.einsum("ni,oi->no", x.double(), w_ref)             # [N, out]
    y = f.matmul(x, p)
    assert y.shape == (5, out) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5 * float(y_ref.abs().max()))
    with pytest.raises(Exception, match="input features"):
        f.matmul(x[:, :-16], p)


# ---------------------------------------------------------------------------------------------- pruning
def fake_stats(scores: np.ndarray, uncal: np.ndarray | None = None):
    L, E = scores.shape
    unc = np.zeros((L, E), bool) if uncal is None else uncal
    table = np.where(unc, np.nan, scores)
    return SimpleNamespace(num_layers=L, num_experts=E, super_experts=[], uncalibrated=unc,
                           score=lambda name: table, reap=table, freq=scores)


def choose(scores, count, uncal=None):
    from mxq.plan.scores import choose_pruned

    cfg = SimpleNamespace(num_hidden_layers=scores.shape[0], num_local_experts=scores.shape[1])
    pruned, _, _ = choose_pruned(cfg, fake_stats(scores, uncal), "reap", count, False, 0)
    return pruned


def test_tied_scores_prune_the_lower_index():
    scores = np.array([[0.5, 0.2, 0.9, 0.2, 0.2, 0.7],              # three-way tie for least important
                       [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])             # all tied
    assert choose(scores, 2) == [[1, 3], [0, 1]]


def test_tied_uncalibrated_experts_prune_the_lower_index():
    scores = np.array([[0.5, 0.1, 0.9, 0.3, 0.05, 0.7]])
    uncal = np.array([[False, False, True, False, False, True]])     # uncalibrated go first, then by index
    assert choose(scores, 1, uncal) == [[2]]
    assert choose(scores, 2, uncal) == [[2, 5]]
    assert choose(scores, 3, uncal) == [[2, 4, 5]]


@pytest.mark.parametrize("fraction,E,count", [(0.25, 6, 1), (0.5, 7, 3), (0.3, 10, 3), (0.99, 32, 31),
                                              (0.125, 32, 4), (0.7, 10, 7), (1 / 3, 12, 4), (0.1, 4, 0)])
def test_pruned_count_is_floor_of_fraction_times_experts(fraction, E, count):
    from mxq.plan.plan import removed_count as pruned_count

    assert pruned_count(fraction, E) == count == math.floor(fraction * E + 1e-9)


def torch_stats(scores: np.ndarray, uncal: np.ndarray | None = None, supers=()):
    """RouterStats-like object holding torch tensors, as the real statistics do."""
    s = fake_stats(scores, uncal)
    unc = torch.from_numpy(s.uncalibrated)
    table = torch.from_numpy(np.where(s.uncalibrated, np.nan, scores))
    return SimpleNamespace(num_layers=s.num_layers, num_experts=s.num_experts, super_experts=list(supers),
                           uncalibrated=unc, score=lambda name: table)


def test_choose_pruned_records_what_it_did():
    from mxq.plan.scores import choose_pruned

    scores = np.array([[0.5, 0.1, 0.9, 0.3], [0.4, 0.8, 0.2, 0.6]])
    uncal = np.array([[False, False, True, False], [False, False, False, False]])
    cfg = SimpleNamespace(num_hidden_layers=2, num_local_experts=4)
    pruned, notes, info = choose_pruned(cfg, torch_stats(scores, uncal, [(1, 2)]), "reap", 2, True, 0)
    assert pruned == [[1, 2], [0, 3]]                          # layer 1: super expert 2 protected
    assert info["criterion"] == "reap" and info["pruned_per_layer"] == 2 and info["pruned"] == pruned
    assert info["protected_super"] == [[1, 2]] and info["scores"][0][2] is None and info["scores"][0][1] == 0.1
    assert any("layer 0 expert 2: uncalibrated" in n and n.endswith("pruned") for n in notes)
    assert "super experts protected from pruning: [(1, 2)]" in notes
    # protect_super=false says the super experts may go; a candidate set exactly the prune count is fine
    _, notes, info = choose_pruned(cfg, torch_stats(scores, None, [(1, 2)]), "reap", 2, False, 0)
    assert "protect_super=false: super experts [(1, 2)] may be pruned" in notes and "protected_super" not in info
    pruned, _, _ = choose_pruned(cfg, torch_stats(scores, None, [(0, 0), (0, 1)]), "reap", 2, True, 0)
    assert pruned[0] == [2, 3]
    _, notes, _ = choose_pruned(cfg, torch_stats(scores), "reap", 1, True, 0)        # no super experts at all
    assert not any("super experts" in n for n in notes)
    # more uncalibrated experts than the count: the rest are kept, and the note says so
    all_unc = np.ones((2, 4), bool)
    _, notes, _ = choose_pruned(cfg, torch_stats(scores, all_unc), "reap", 1, True, 0)
    assert "layer 0 expert 3: uncalibrated (no calibration token), ranked least important, kept (more " \
           "uncalibrated experts than the prune count)" in notes
    _, _, info = choose_pruned(cfg, None, "random", 1, True, 7)
    assert info["seed"] == 7 and info["criterion"] == "random"
    from mxq.plan import PlanError

    with pytest.raises(PlanError, match=r"recipe.prune.criterion='reap' needs router statistics.*recipe.stats=true"):
        choose_pruned(cfg, None, "reap", 1, True, 0)
    with pytest.raises(PlanError, match=r"layer 0: 2 protected super experts leave 2 candidates.*recipe.prune.fraction"):
        choose_pruned(cfg, torch_stats(scores, None, [(0, 0), (0, 1)]), "reap", 3, True, 0)


def test_importance_table_fill_clip_and_scope():
    """Mixed precision weighs each expert's error by its importance: uncalibrated experts get the layer's
    smallest calibrated importance (not 0: their error would be free), negatives clip to 0, and with one
    model-wide budget each layer is divided by its mean over kept experts."""
    from mxq.plan import PlanError
    from mxq.plan.scores import importance_table

    scores = np.array([[2.0, -1.0, 4.0, 6.0], [0.0, 0.0, 0.0, 0.0]])
    uncal = np.array([[False, False, True, False], [False, False, False, False]])
    cfg = SimpleNamespace(num_hidden_layers=2, num_local_experts=4)
    kept = [[0, 1, 2, 3], [0, 1, 2]]
    t, notes = importance_table(torch_stats(scores, uncal), cfg, "reap", kept, "layer")
    np.testing.assert_array_equal(t, [[2.0, 0.0, 0.0, 6.0], [0.0, 0.0, 0.0, 1.0]])   # fill = min(2, -1, 6) -> clip
    assert notes == ["layer 0 expert 2: uncalibrated, importance set to the layer minimum -1"]
    t, _ = importance_table(torch_stats(scores, uncal), cfg, "reap", kept, "model")
    np.testing.assert_allclose(t, [[1.0, 0.0, 0.0, 3.0], [1.0, 1.0, 1.0, 1.0]])      # mean 2 -> /2; mean 0 -> ones
    t, _ = importance_table(torch_stats(scores / 8, uncal), cfg, "reap", kept, "model")
    np.testing.assert_allclose(t[0], [1.0, 0.0, 0.0, 3.0])                            # mean 0.25: still / mean
    all_unc = np.array([[True] * 4, [False] * 4])
    t, _ = importance_table(torch_stats(scores, all_unc), cfg, "reap", kept, "layer")
    np.testing.assert_array_equal(t[0], [1.0] * 4)                                    # nothing calibrated: 1
    assert (importance_table(None, cfg, "uniform", kept, "layer")[0] == 1).all()
    with pytest.raises(PlanError, match=r"recipe.mixed.importance='reap' needs router statistics.*importance=uniform"):
        importance_table(None, cfg, "reap", kept, "layer")
