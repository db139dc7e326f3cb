"""BsrWeight and block_mask: layout, round trip, errors."""

import pytest
import torch

from sparse_compile.kernels import BsrWeight, block_mask


def _block_sparse(n, k, b, density, dtype=torch.float32):
    """randn weight [n, k] whose b x b blocks are kept with probability `density`."""
    keep = torch.rand(-(-n // b), -(-k // b)) < density
    if density >= 1:
        keep[:] = True
    full = keep.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :k]
    return (torch.randn(n, k) * full).to(dtype), keep


def _hand_block_mask(w, b):
    n, k = w.shape
    out = torch.zeros(-(-n // b), -(-k // b), dtype=torch.bool)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = bool((w[i * b : (i + 1) * b, j * b : (j + 1) * b] != 0).any())
    return out


@pytest.mark.parametrize("n, k", [(16, 16), (37, 50), (64, 129), (1, 5)])
@pytest.mark.parametrize("b", [3, 16, 32])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_block_mask_matches_hand_loop(n, k, b, density):
    w, _ = _block_sparse(n, k, b, density)
    # Sprinkle single nonzeros too: one nonzero anywhere must mark its block.
    w[torch.rand(n, k) < 0.01] = 1.5
    got = block_mask(w, b)
    assert got.dtype == torch.bool
    assert torch.equal(got, _hand_block_mask(w, b))


@pytest.mark.parametrize("n, k", [(64, 64), (100, 70), (17, 33), (3, 200)])
@pytest.mark.parametrize("b", [16, 32, 64])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_and_layout(n, k, b, density, dtype):
    w, keep = _block_sparse(n, k, b, density, dtype)
    bw = BsrWeight.from_dense(w, b)
    nb, kb = keep.shape
    assert (bw.out_features, bw.in_features, bw.blocksize) == (n, k, b)
    assert bw.values.dtype == dtype and bw.values.shape[1:] == (b, b)
    assert bw.crow_indices.dtype == torch.int32 and bw.crow_indices.shape == (nb + 1,)
    assert bw.col_indices.dtype == torch.int32 and bw.col_indices.shape == (bw.values.shape[0],)
    assert torch.equal(bw.to_dense(), w)
    mask = block_mask(w, b)
    assert bw.values.shape[0] == int(mask.sum())
    assert bw.density == pytest.approx(mask.float().mean().item())
    # Hand check of every stored block against the zero-padded weight.
    padded = torch.zeros(nb * b, kb * b, dtype=dtype)
    padded[:n, :k] = w
    for i in range(nb):
        lo, hi = bw.crow_indices[i].item(), bw.crow_indices[i + 1].item()
        cols = bw.col_indices[lo:hi].tolist()
        assert cols == sorted(cols) and cols == mask[i].nonzero().flatten().tolist()
        for p, j in zip(range(lo, hi), cols):
            assert torch.equal(bw.values[p], padded[i * b : (i + 1) * b, j * b : (j + 1) * b])


@pytest.mark.parametrize("b", [24, 8, 0, -16, 48])
def test_bad_blocksize(b):
    with pytest.raises(ValueError, match="power of two >= 16"):
        BsrWeight.from_dense(torch.randn(64, 64), b)


def test_bad_weight():
    with pytest.raises(ValueError, match="2-D"):
        BsrWeight.from_dense(torch.randn(4, 64, 64), 16)
    with pytest.raises(ValueError, match="2-D"):
        block_mask(torch.randn(64), 16)
    with pytest.raises(ValueError, match="positive"):
        block_mask(torch.randn(64, 64), 0)


def test_to_moves_and_casts():
    w, _ = _block_sparse(40, 40, 16, 0.5)
    bw = BsrWeight.from_dense(w, 16).to(torch.float16)
    assert bw.values.dtype == torch.float16 and bw.crow_indices.dtype == torch.int32
    assert torch.equal(bw.to_dense(), w.half())
