"""Block compressed sparse row (BSR) weights for the BSR linear kernel.

A linear weight ``W`` is ``[N, K]`` (out features, in features). It is cut into ``b x b``
blocks; blocks that are entirely zero are dropped. ``N`` and ``K`` need not be multiples of
``b``: the last block row / column is zero-padded, so every stored block is a full ``b x b``
tile and the kernel never reads past a block. The padding lives only in the stored blocks;
``out_features`` / ``in_features`` keep the real sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .common import block_view

__all__ = ["BsrWeight", "block_mask", "check_blocksize"]


def check_blocksize(blocksize: int) -> None:
    """Raise ValueError unless ``blocksize`` is a power of two >= 16.

    ``tl.dot`` needs every dim >= 16, and ``tl.arange`` needs a power of two.
    """
    if (
        not isinstance(blocksize, int)
        or isinstance(blocksize, bool)
        or blocksize < 16
        or blocksize & (blocksize - 1)
    ):
        raise ValueError(
            f"blocksize must be a power of two >= 16 (16, 32, 64, 128, ...), got {blocksize!r}"
        )


def _check_weight(weight: Tensor) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D tensor [out_features, in_features], got {shape}")
    if weight.layout != torch.strided:
        raise ValueError(f"weight must be a dense (strided) tensor, got layout {weight.layout}")


def _padded_blocks(weight: Tensor, blocksize: int) -> Tensor:
    """``weight`` zero-padded to whole blocks, viewed as ``[N/b, K/b, b, b]`` (block (i, j) at [i, j])."""
    return block_view(weight, blocksize).transpose(1, 2)


def block_mask(weight: Tensor, blocksize: int) -> Tensor:
    """bool ``[ceil(N/b), ceil(K/b)]`` for a 2-D weight ``[N, K]``: True where the ``b x b`` block
    (zero-padded at the ragged edge) has any nonzero.

    Unlike :meth:`BsrWeight.from_dense`, any positive ``blocksize`` is accepted: the analysis
    code measures block structure at sizes the kernel may not take.
    """
    _check_weight(weight)
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    return (_padded_blocks(weight, blocksize) != 0).any(dim=-1).any(dim=-1)


@dataclass(frozen=True)
class BsrWeight:
    """A linear weight ``[N, K]`` in BSR form, in the layout the Triton kernel reads.

    Fields:
        values: ``[nnz_blocks, b, b]``, dtype/device of the weight. Block (i, j) covers
            ``W[i*b:(i+1)*b, j*b:(j+1)*b]``, zero-padded past N/K.
        crow_indices: int32 ``[ceil(N/b) + 1]``; row pointers over output-feature block rows.
        col_indices: int32 ``[nnz_blocks]``; input-feature block column of each stored block,
            ascending within a row.
        out_features: N, unpadded.
        in_features: K, unpadded.
        blocksize: b.
    """

    values: Tensor
    crow_indices: Tensor
    col_indices: Tensor
    out_features: int
    in_features: int
    blocksize: int

    @classmethod
    def from_dense(cls, weight: Tensor, blocksize: int) -> "BsrWeight":
        """Compress ``weight`` ``[N, K]``; ``blocksize`` must be a power of two >= 16."""
        _check_weight(weight)
        check_blocksize(blocksize)
        n, k = weight.shape
        blocks = _padded_blocks(weight.detach(), blocksize)  # [nb, kb, b, b]
        keep = (blocks != 0).any(dim=-1).any(dim=-1)  # [nb, kb]
        # nonzero() walks row-major, so columns come out ascending within each row.
        rows, cols = keep.nonzero(as_tuple=True)
        values = blocks[rows, cols].contiguous()
        counts = keep.sum(dim=1, dtype=torch.int32)
        crow = torch.zeros(keep.shape[0] + 1, dtype=torch.int32, device=weight.device)
        crow[1:] = torch.cumsum(counts, dim=0, dtype=torch.int32)
        return cls(
            values=values,
            crow_indices=crow,
            col_indices=cols.to(torch.int32),
            out_features=n,
            in_features=k,
            blocksize=blocksize,
        )

    def to_dense(self) -> Tensor:
        """The ``[N, K]`` weight this BSR describes (inverse of :meth:`from_dense`)."""
        b = self.blocksize
        nb = self.crow_indices.numel() - 1
        kb = -(-self.in_features // b)
        counts = self.crow_indices.diff().long()
        rows = torch.repeat_interleave(torch.arange(nb, device=counts.device), counts)
        dense = self.values.new_zeros(nb * b, kb * b)
        _padded_blocks(dense, b)[rows, self.col_indices.long()] = self.values  # a view: fills dense
        return dense[: self.out_features, : self.in_features].contiguous()

    @property
    def density(self) -> float:
        """Stored blocks / all blocks (0.0 for a weight with no blocks at all)."""
        b = self.blocksize
        total = (-(-self.out_features // b)) * (-(-self.in_features // b))
        return self.values.shape[0] / total if total else 0.0

    @property
    def nnz_blocks(self) -> int:
        return self.values.shape[0]

    def to(self, *args, **kwargs) -> "BsrWeight":
        """Move/cast like ``Tensor.to``: dtype applies to ``values`` only, device to all three."""
        values = self.values.to(*args, **kwargs)
        return BsrWeight(
            values=values,
            crow_indices=self.crow_indices.to(values.device),
            col_indices=self.col_indices.to(values.device),
            out_features=self.out_features,
            in_features=self.in_features,
            blocksize=self.blocksize,
        )
