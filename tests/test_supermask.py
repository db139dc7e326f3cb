"""Supermask: tile mask invariants, straight-through gradients, options, bad input."""

import math
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from sparse_compile.training import Supermask


def expand_ref(tile_mask, shape, tile):
    """Hand-written tile expansion: entry [i0, i1, ...] of the full mask is tile_mask[i0 // tile, i1 // tile, ...]."""
    idx = torch.meshgrid(*[torch.arange(d) // tile for d in shape], indexing="ij")
    return tile_mask[idx]


def superblock_k(sparsity, num_tiles):
    """SuperBlock's ``percentile(scores, sparsity * 100)``: the same float operations in the same order."""
    q = sparsity * 100
    return 1 + round(0.01 * float(q) * (num_tiles - 1))


def threshold_ref(scores, sparsity):
    flat = sorted(scores.double().reshape(-1).tolist())
    return flat[superblock_k(sparsity, len(flat)) - 1]


SHAPES = [
    ((64, 48), 8, 0.5),
    ((50, 30), 8, 0.8),  # ragged tiles
    ((37, 23), 1, 0.9),
    ((16, 8, 3, 3), 2, 0.6),  # conv: tiles over every dim
    ((16, 8, 1, 1), 4, 0.5),
    ((24, 12, 5, 5), 8, 0.75),
]


@pytest.mark.parametrize("shape,tile,sparsity", SHAPES)
def test_kept_fraction_and_expansion(shape, tile, sparsity):
    sm = Supermask(shape, sparsity, tile)
    assert tuple(sm.scores.shape) == tuple(math.ceil(d / tile) for d in shape)
    num_tiles = sm.scores.numel()
    kept = int(sm.tile_mask().sum())
    assert kept == num_tiles - (superblock_k(sparsity, num_tiles) - 1) == sm.kept_tiles
    # the rule itself: keep the scores >= k-th smallest
    ref_tiles = (sm.scores >= threshold_ref(sm.scores.detach(), sparsity)).double()
    assert torch.equal(sm.tile_mask().double(), ref_tiles)
    mask = sm.mask()
    assert mask.shape == torch.Size(shape)
    assert torch.equal(mask.double(), expand_ref(ref_tiles, shape, tile))
    w = torch.randn(shape, dtype=torch.float64) + 3.0  # never zero
    eff = sm.double()(w)
    assert torch.equal(eff, w * expand_ref(ref_tiles, shape, tile))


# Tile counts of real layers (ViT-B/16 768x768 at tile 32 = 576, its MLP at tile 64 = 576,
# 768x3072 at tile 32 = 2304) and small ones, where a one-tile difference is a large fraction.
TILE_GRIDS = [(1, 2), (1, 3), (2, 2), (3, 3), (4, 4), (5, 7), (10, 10), (24, 24), (24, 96)]
SWEEP = sorted({i / 100 for i in range(100)} | {0.125, 0.333, 0.875, 0.9375, 0.999})


@pytest.mark.parametrize("grid", TILE_GRIDS, ids=[f"{r}x{c}" for r, c in TILE_GRIDS])
def test_kept_tiles_match_superblock_over_a_sweep(grid):
    rows, cols = grid
    num_tiles = rows * cols
    tile = 4
    for sparsity in SWEEP:
        capped = min(sparsity, 1 - 1 / num_tiles)  # SuperBlock caps the same way
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the cap warning
            sm = Supermask((rows * tile - 1, cols * tile), sparsity, tile)  # ragged last tile row
        with torch.no_grad():
            sm.scores.copy_(torch.randn(rows, cols) + 0.5)
        ref = (sm.scores.detach().double() >= threshold_ref(sm.scores.detach(), capped)).sum().item()
        want = num_tiles - (superblock_k(capped, num_tiles) - 1)
        assert ref == want  # distinct scores: the rank decides the count
        assert int(sm.tile_mask().sum()) == want == sm.kept_tiles, f"sparsity {sparsity}"


@pytest.mark.parametrize(
    "shape,tile,sparsity,kept",
    [
        ((64, 64), 16, 0.7, 5),  # 16 tiles: 0.01 * 70.0 * 15 = 10.500000000000002 rounds up
        ((768, 768), 32, 0.7, 173),  # ViT-B/16 attention projection
        ((124, 4), 4, 0.95, 2),  # 31 tiles: 0.01 * 95.0 * 30 = 28.500000000000004
    ],
)
def test_superblock_counts_where_plain_rounding_differs(shape, tile, sparsity, kept):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = Supermask(shape, sparsity, tile)
    assert int(sm.tile_mask().sum()) == kept


def test_set_sparsity_changes_the_next_mask():
    lin = nn.Linear(40, 32)
    parametrize.register_parametrization(lin, "weight", Supermask(lin.weight.shape, 0.5, 4))
    sm = lin.parametrizations.weight[0]
    x = torch.randn(3, 40)
    w = lin.parametrizations.weight.original.detach()
    for new, setter in ((0.8, "assign"), (0.25, "method"), (0.7, "assign")):
        if setter == "assign":
            sm.sparsity = new  # SuperBlock's set_sparsity does `mod.sparsity = s`
        else:
            sm.set_sparsity(new)
        assert sm.sparsity == new
        ref_tiles = (sm.scores.detach().double() >= threshold_ref(sm.scores.detach(), new)).double()
        assert int(ref_tiles.sum()) == 80 - (superblock_k(new, 80) - 1)
        mask = expand_ref(ref_tiles, (32, 40), 4)
        # fp32 sums of 40 products (a wrong mask is off by O(1)): fp32 tolerances, not float64's
        expected = x.double() @ (w.double() * mask).T + lin.bias.double()
        torch.testing.assert_close(lin(x).double(), expected, atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="capped"):
        sm.sparsity = 0.999
    assert sm.sparsity == pytest.approx(1 - 1 / 80)
    assert sm.kept_tiles == 80 - (superblock_k(1 - 1 / 80, 80) - 1) == 2  # the cap bounds; the rank rule counts
    with pytest.raises(ValueError, match="sparsity"):
        sm.set_sparsity(1.0)
    assert sm.sparsity == pytest.approx(1 - 1 / 80)  # a rejected value leaves the mask as it was


def test_registered_on_linear_and_conv():
    lin = nn.Linear(32, 24)
    w = lin.weight.detach().clone()
    parametrize.register_parametrization(lin, "weight", Supermask(lin.weight.shape, 0.75, 4))
    sm = lin.parametrizations.weight[0]
    assert torch.equal(lin.weight, w * sm.mask())
    x = torch.randn(5, 32)
    torch.testing.assert_close(lin(x), x @ (w * sm.mask()).T + lin.bias)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    parametrize.register_parametrization(conv, "weight", Supermask(conv.weight.shape, 0.5, 2))
    assert (conv.weight == 0).float().mean() > 0.3
    assert conv(torch.randn(2, 4, 6, 6)).shape == (2, 8, 6, 6)


@pytest.mark.parametrize("shape,tile", [((12, 10), 4), ((6, 4, 3, 3), 2)])
def test_straight_through_gradients(shape, tile):
    sm = Supermask(shape, 0.5, tile).double()
    w = (torch.randn(shape, dtype=torch.float64) + 2.0).requires_grad_()
    g = torch.randn(shape, dtype=torch.float64)
    (sm(w) * g).sum().backward()
    mask = sm.mask().detach()
    # W: ordinary gradient through W * mask
    torch.testing.assert_close(w.grad, g * mask, rtol=0, atol=0)
    # scores: dL/dmask = g * W, summed over each tile (straight through the threshold)
    gm = (g * w.detach()).numpy()
    ref = torch.zeros(sm.scores.shape, dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(d) for d in shape]).tolist():
        ref[tuple(i // tile for i in idx)] += gm[tuple(idx)]
    torch.testing.assert_close(sm.scores.grad, ref)


def test_gradcheck_weight():
    sm = Supermask((6, 5), 0.4, 2).double()
    w = (torch.randn(6, 5, dtype=torch.float64) + 2.0).requires_grad_()
    assert torch.autograd.gradcheck(sm, (w,))


def test_cap_at_reachable_sparsity():
    with pytest.warns(UserWarning, match="capped"):
        sm = Supermask((8, 8), 0.99, 4)  # 4 tiles: at most 3/4 prunable
    assert sm.sparsity == pytest.approx(0.75)
    # the reference's threshold rule at the capped sparsity: k = 1 + round(0.75 * 3) = 3, so 2 of 4
    # tiles are kept (the cap bounds the request; the k rule decides the count)
    assert int(sm.tile_mask().sum()) == 4 - (superblock_k(0.75, 4) - 1) == 2


def test_zero_sparsity_keeps_everything():
    sm = Supermask((10, 7), 0.0, 3)
    assert bool(sm.mask().all())


def test_fixed_mask_and_fixed_weight():
    lin = nn.Linear(8, 8)
    parametrize.register_parametrization(lin, "weight", Supermask((8, 8), 0.5, 2, fixed_mask=True, fixed_weight=True))
    sm = lin.parametrizations.weight[0]
    assert not sm.scores.requires_grad
    assert not lin.parametrizations.weight.original.requires_grad
    lin(torch.randn(3, 8)).sum().backward()
    assert lin.parametrizations.weight.original.grad is None
    assert sm.scores.grad is None
    assert lin.bias.grad is not None
    # fixed_weight also holds when someone re-enables requires_grad: the parametrization detaches W
    lin.parametrizations.weight.original.requires_grad_(True)
    lin(torch.randn(3, 8)).sum().backward()
    assert lin.parametrizations.weight.original.grad is None


def test_mask_follows_scores():
    sm = Supermask((4, 4), 0.5, 1)
    with torch.no_grad():
        sm.scores.copy_(torch.arange(16.0).reshape(4, 4))
    # k = 1 + round(0.5 * 15) = 9 (banker's rounding of 7.5 -> 8): threshold 8, keep 8..15
    assert torch.equal(sm.mask(), (torch.arange(16.0).reshape(4, 4) >= 8).float())


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        Supermask((4, 4), sparsity, 1)


@pytest.mark.parametrize("tile", [0, -2, 1.5])
def test_bad_tile_size(tile):
    with pytest.raises(ValueError, match="tile_size"):
        Supermask((4, 4), 0.5, tile)


def test_bad_shape():
    with pytest.raises(ValueError, match="2 dims"):
        Supermask((4,), 0.5, 1)
    sm = Supermask((4, 4), 0.5, 1)
    with pytest.raises(ValueError, match="shape"):
        sm(torch.randn(4, 5))


def test_set_sparsity_reaches_a_compiled_model():
    # torch.compile guards on k: a new sparsity recompiles instead of reusing the old mask.
    torch._dynamo.reset()
    lin = nn.Linear(32, 32)
    parametrize.register_parametrization(lin, "weight", Supermask(lin.weight.shape, 0.25, 8))
    compiled = torch.compile(lin, backend="eager")
    x = torch.randn(4, 32)
    torch.testing.assert_close(compiled(x), lin(x))
    lin.parametrizations.weight[0].sparsity = 0.75
    out = compiled(x)
    torch.testing.assert_close(out, lin(x))
    assert int(lin.parametrizations.weight[0].tile_mask().sum()) == 16 - (superblock_k(0.75, 16) - 1)
    torch._dynamo.reset()
