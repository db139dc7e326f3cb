"""Weight analysis: does this linear weight run faster as BSR, and at which block size?

This layer knows nothing about graphs: it takes a dense weight ``[out_features, in_features]``
(whatever produced it: a pruned checkpoint, a parametrized mask folded by freezing,
``torch.ao.pruning``) and returns a :class:`LayerDecision` with the numbers behind it.

With ``density_threshold="auto"`` the numbers are timings (``sparse_compile.measure``): dense
and BSR at every candidate block size are run on the weight's device with its shape, dtype and
the traced rows, and the fastest wins. With a number, no timing: the block size with the lowest
estimated cost is taken and compared with the threshold.
"""

from __future__ import annotations

import dataclasses

import torch

from sparse_compile import measure
from sparse_compile.kernels import block_mask
from sparse_compile.options import SparseOptions

#: Dtypes the BSR kernel takes (fp32 accumulation for all of them).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Estimated cost of a stored block relative to the same work in a dense matmul, per block size.
#: Small blocks keep the tensor cores less busy and read the activation more often. Used only
#: with a numeric ``density_threshold``, to rank block sizes under ``blocksize="auto"``: the
#: chosen size minimises
#: ``density * overhead``. The numbers follow the shape of torch's BSR kernel tables
#: (torch/sparse/_triton_ops_meta.py: larger blocks reach a larger fraction of dense throughput);
#: GPU timings will replace them.
BLOCK_OVERHEAD = {16: 2.0, 32: 1.4, 64: 1.15, 128: 1.1}


@dataclasses.dataclass(frozen=True)
class LayerDecision:
    """What the pass does with one linear weight, and why.

    Attributes:
        format: ``"bsr"`` or ``"dense"``.
        blocksize: the block size measured (and used, for BSR); ``None`` when none was measured.
        density: stored blocks / all blocks at ``blocksize`` (``None`` when not measured).
        reason: for dense layers, why; empty for BSR layers.
        time_ms: measured time of the chosen way (``None`` with a numeric threshold).
        dense_ms: measured time of dense ``F.linear`` for the same layer.
        from_cache: True when no timing ran for this layer (cache hit, or a layer of the same
            shape and density measured before); ``None`` when nothing was timed.
        timings: ``(candidate label, ms)`` of every candidate timed, e.g. ``("bsr32", 0.41)``.
    """

    format: str
    blocksize: int | None
    density: float | None
    reason: str = ""
    time_ms: float | None = None
    dense_ms: float | None = None
    from_cache: bool | None = None
    timings: tuple[tuple[str, float], ...] = ()

    @property
    def is_sparse(self) -> bool:
        return self.format == "bsr"


def block_density(weight: torch.Tensor, blocksize: int) -> float:
    """Fraction of the ``blocksize x blocksize`` blocks of ``weight`` that hold a nonzero.

    Ragged edges count as whole (zero-padded) blocks, as the kernel stores them.
    """
    mask = block_mask(weight, blocksize)
    return float(mask.float().mean()) if mask.numel() else 0.0


def decide(
    weight: torch.Tensor,
    options: SparseOptions,
    rows: int | None = None,
) -> LayerDecision:
    """Chooses BSR or dense for a linear weight ``[out_features, in_features]``.

    Args:
        weight: the constant weight, on the device the layer runs on (timed there).
        options: the backend's options.
        rows: rows of the layer's input as traced (batch x tokens); timings use it.
    """
    if weight.dim() != 2:
        return LayerDecision("dense", None, None, f"weight is {weight.dim()}-D, not a 2-D linear weight")
    if weight.dtype not in SUPPORTED_DTYPES:
        supported = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        return LayerDecision(
            "dense", None, None,
            f"dtype {str(weight.dtype).removeprefix('torch.')} has no sparse kernel ({supported} only)",
        )
    if weight.numel() == 0:
        return LayerDecision("dense", None, None, f"weight {tuple(weight.shape)} is empty")
    candidates = candidate_blocksizes(weight.shape, options)
    densities = {b: block_density(weight, b) for b in candidates}
    if options.measured:
        return _fastest(weight, densities, rows)
    # As before measuring existed: sizes up to the smallest dim (a narrow weight: the smallest size).
    ranked = [b for b in candidates if b <= min(weight.shape)] or candidates[:1]
    blocksize = min(ranked, key=lambda b: (densities[b] * BLOCK_OVERHEAD[b], -b))
    density = densities[blocksize]
    if density > options.density_threshold:
        return LayerDecision(
            "dense", blocksize, density,
            f"block density {density:.2f} > threshold {options.density_threshold:.2f}",
        )
    return LayerDecision("bsr", blocksize, density)


def candidate_blocksizes(shape: tuple[int, int], options: SparseOptions) -> list[int]:
    """Block sizes worth trying for a weight of ``shape``.

    A fixed ``blocksize`` is always tried: the BSR copy zero-pads a dim smaller than one block,
    and the op computes such a layer exactly (timm Mixer's 16x384 token mixing at block 32:
    12 padded blocks). Under ``"auto"``, sizes beyond the smallest dim rounded up to a power
    of two are left out: they only add padding to the blocks the smaller size stores.
    """
    sizes = options.blocksizes
    if len(sizes) == 1:
        return list(sizes)
    smallest = min(shape)
    fits = [b for b in sizes if b <= max(sizes[0], measure.rows_bucket(smallest))]
    return fits or [sizes[0]]


def _fastest(weight: torch.Tensor, densities: dict[int, float], rows: int | None) -> LayerDecision:
    """Times dense and BSR at each block size that has a block to skip; keeps the fastest."""
    bsr = [measure.Candidate("bsr", b, d) for b, d in densities.items() if d < 1.0]
    timed = measure.time_candidates(weight, [measure.DENSE, *bsr], rows)
    dense, others = timed[0], timed[1:]
    timings = tuple((t.candidate.label, t.ms) for t in timed)
    from_cache = all(t.from_cache for t in timed)
    # Ties go to dense: same speed, no conversion, no extra op in the graph.
    best = min(others, key=lambda t: (t.ms, -t.candidate.blocksize), default=None)
    if best is None or best.ms >= dense.ms:
        sizes = "/".join(str(b) for b in densities)
        if best is None:
            reason = f"every block holds a nonzero at block size {sizes}: no block to skip"
            blocksize, density = max(densities), densities[max(densities)]
        else:
            blocksize, density = best.candidate.blocksize, best.candidate.density
            reason = (
                f"dense measured faster: {dense.ms:.3g} ms vs {best.ms:.3g} ms for BSR at block "
                f"{blocksize} (density {density:.2f})"
            )
        return LayerDecision(
            "dense", blocksize, density, reason, time_ms=dense.ms, dense_ms=dense.ms,
            from_cache=from_cache, timings=timings,
        )
    blocksize = best.candidate.blocksize
    if weight.device.type == "cpu":
        # The op's CPU kernel must run what was timed (the gather path), whatever its fixed rule says.
        from sparse_compile.kernels.bsr_linear import set_cpu_variant

        nnz_blocks = int(block_mask(weight, blocksize).sum())
        set_cpu_variant(weight.dtype, *weight.shape, blocksize, nnz_blocks, "gather")
    return LayerDecision(
        "bsr", blocksize, densities[blocksize], time_ms=best.ms, dense_ms=dense.ms,
        from_cache=from_cache, timings=timings,
    )
