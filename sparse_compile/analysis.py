"""Weight analysis: which sparse format (if any) runs this linear weight fastest, and how.

This layer knows nothing about graphs: it takes a dense weight ``[out_features, in_features]``
(whatever produced it: a pruned checkpoint, a parametrized mask folded by freezing,
``torch.ao.pruning``) and returns a :class:`LayerDecision` with the numbers behind it.

Each format (``sparse_compile.formats``: BSR, ...) contributes its own analysis rule: the
candidates it could run the weight as (BSR: one per block size), or why it cannot. Then:

- ``density_threshold="auto"``: the candidates of every format and dense (as Inductor compiles
  it) are timed (``sparse_compile.measure``) on the weight's device with its shape, dtype and
  the traced rows; the fastest sparse candidate wins only when it saves more than the measured
  spread and more than ``min_saving_ms`` per call over dense (:func:`tie_band_ms`); anything
  less is a tie, and a tie goes to dense.
- a number: no timing. The formats are asked in order of preference (``formats.FORMATS``), and
  the first that takes the weight under the threshold wins (BSR: block density at most the
  threshold, at the block size with the lowest estimated cost).

A dense decision says, for every format, why it was not taken.
"""

from __future__ import annotations

from typing import Sequence

import torch

from sparse_compile import formats as _formats
from sparse_compile import measure
from sparse_compile.formats.base import DENSE, Candidate, LayerDecision, Reason, ReasonCode, combine_reasons
from sparse_compile.formats.bsr import BLOCK_OVERHEAD, block_density, candidate_blocksizes
from sparse_compile.options import SparseOptions

__all__ = ["BLOCK_OVERHEAD", "block_density", "candidate_blocksizes", "decide"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def decide(
    weight: torch.Tensor,
    options: SparseOptions,
    rows: int | None = None,
    formats: Sequence[_formats.SparseFormat] | None = None,
) -> LayerDecision:
    """Chooses a sparse format or dense for a linear weight ``[out_features, in_features]``.

    Args:
        weight: the constant weight, on the device the layer runs on (timed there).
        options: the backend's options.
        rows: rows of the layer's input as traced (batch x tokens); timings use it.
        formats: the formats to consider, in order of preference; default: those of ``options``.
    """
    formats = list(formats) if formats is not None else options.sparse_formats()
    if weight.dim() != 2:
        return LayerDecision.dense(Reason(ReasonCode.OTHER, f"weight is {weight.dim()}-D, not a 2-D linear weight"))
    dtypes = [d for f in formats for d in f.dtypes]
    if weight.dtype not in dtypes:
        supported = ", ".join(dict.fromkeys(_dtype_name(d) for d in dtypes))
        return LayerDecision.dense(
            Reason(ReasonCode.UNSUPPORTED_DTYPE, f"dtype {_dtype_name(weight.dtype)} has no sparse kernel ({supported} only)")
        )
    if weight.numel() == 0:
        return LayerDecision.dense(Reason(ReasonCode.OTHER, f"weight {tuple(weight.shape)} is empty"))

    proposals: list[tuple[_formats.SparseFormat, list[Candidate]]] = []
    reasons: dict[str, Reason | None] = {fmt.name: None for fmt in formats}  # why each format was not taken
    for fmt in formats:
        unavailable = fmt.unavailable_reason(weight.device.type)
        if unavailable:
            reasons[fmt.name] = Reason(ReasonCode.NO_KERNEL_FOR_DEVICE, unavailable)
        elif weight.dtype not in fmt.dtypes:
            reasons[fmt.name] = Reason(
                ReasonCode.UNSUPPORTED_DTYPE,
                f"{fmt.name} takes {', '.join(map(_dtype_name, fmt.dtypes))}, not {_dtype_name(weight.dtype)}",
            )
        else:
            found = fmt.candidates(weight, options)
            if isinstance(found, Reason):
                reasons[fmt.name] = found
            else:
                proposals.append((fmt, found))
    if options.measured:
        return _fastest(weight, proposals, reasons, rows, options)
    return _by_threshold(weight, options, proposals, reasons)


def _sparse(fmt, weight, candidate, **timing) -> LayerDecision:
    return LayerDecision(
        fmt.name, candidate.blocksize, candidate.density, candidate=candidate,
        kernel=fmt.kernel(weight.device.type, weight.dtype), **timing,
    )


def _by_threshold(weight, options, proposals, reasons) -> LayerDecision:
    considered = None  # the first format's best candidate: its numbers go in the report
    for fmt, candidates in proposals:
        choice = fmt.pick_by_threshold(weight, candidates, options)
        if choice.chosen is not None:
            return _sparse(fmt, weight, choice.chosen)
        considered = considered or choice.considered
        reasons[fmt.name] = choice.reason
    return LayerDecision.dense(_joined(reasons), considered)


def _joined(reasons: dict[str, Reason | None], first: Reason | None = None) -> Reason | None:
    """One reason: ``first``, then each format's reason in order of preference (the code is the
    first of theirs in ``ReasonCode`` order)."""
    return combine_reasons([first, *reasons.values()])


def tie_band_ms(dense_ms: float, spread: float, min_saving_ms: float) -> float:
    """How much faster (ms per call) than dense a sparse candidate must be to be taken: more than
    its measured spread (a fraction of dense's time, ``measure.Measured``) and more than
    ``min_saving_ms``."""
    return max(spread * dense_ms, min_saving_ms)


def _fastest(weight, proposals, reasons, rows, options: SparseOptions) -> LayerDecision:
    """Times dense and every candidate worth timing; keeps the fastest sparse one when it beats
    dense by more than the tie band (:func:`tie_band_ms`), else dense."""
    timed_candidates: list[Candidate] = []
    owner: dict[Candidate, _formats.SparseFormat] = {}
    order = {}
    for index, (fmt, candidates) in enumerate(proposals):
        worth = fmt.timed_candidates(candidates)
        if not worth:
            reasons[fmt.name] = fmt.nothing_to_time_reason(candidates)
        for candidate in worth:
            timed_candidates.append(candidate)
            owner[candidate] = fmt
            order[candidate] = index
    # The report's numbers for a dense layer: the first format's largest block, as before.
    first = proposals[0][1] if proposals else []
    fallback = max(first, key=lambda c: c.blocksize or 0) if first else None
    if not timed_candidates:
        return LayerDecision.dense(_joined(reasons), fallback)
    timed = measure.time_candidates(weight, [DENSE, *timed_candidates], rows)
    dense, others = timed[0], timed[1:]
    timings = tuple((t.candidate.label, t.ms) for t in timed)
    from_cache = all(t.from_cache for t in timed)
    # A sparse candidate must beat dense by more than its tie band (its spread, min_saving_ms);
    # ties go to dense: no conversion, no extra op in the graph. Of those that do: the fastest,
    # then the preferred format, then the larger block.
    ranked = sorted(others, key=lambda t: (t.ms, order[t.candidate], -(t.candidate.blocksize or 0)))
    min_saving = options.min_saving_ms_for(weight.device.type)
    winners = [t for t in ranked if dense.ms - t.ms > tie_band_ms(dense.ms, t.spread, min_saving)]
    floor = dense.floor_ms(rows) if rows is not None else None
    timing = dict(dense_ms=dense.ms, dense_floor_ms=floor, from_cache=from_cache, timings=timings)
    if not winners:
        best = ranked[0]
        fmt = owner[best.candidate]
        if best.ms >= dense.ms:
            why = Reason(
                ReasonCode.MEASURED_FASTER,
                f"dense measured faster: {dense.ms:.3g} ms vs {best.ms:.3g} ms for {fmt.describe(best.candidate)}",
            )
        else:
            why = Reason(
                ReasonCode.MEASURED_TIE,
                f"a tie: {fmt.describe(best.candidate)} measured {best.ms:.3g} ms vs {dense.ms:.3g} ms dense, "
                f"{dense.ms - best.ms:.3g} ms faster, needed more than "
                f"{tie_band_ms(dense.ms, best.spread, min_saving):.3g} ms (spread {100 * best.spread:.0f}% of dense, "
                f"minimum {min_saving:.3g} ms)",
            )
        # The report's numbers: the first format's fastest candidate (BSR: its block size and density).
        first_timed = [t for t in others if order[t.candidate] == 0]
        shown = min(first_timed, key=lambda t: (t.ms, -(t.candidate.blocksize or 0))).candidate if first_timed else fallback
        return LayerDecision.dense(_joined(reasons, why), shown, time_ms=dense.ms, **timing)
    best = winners[0]
    fmt = owner[best.candidate]
    return _sparse(fmt, weight, best.candidate, time_ms=best.ms, **timing)
