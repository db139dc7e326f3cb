"""What a sparse format is to the backend: one analysis rule, one op, one kernel file.

A format (BSR, 2:4, ...) is a :class:`SparseFormat` object. The rest of the backend only talks
to formats through it:

- ``analysis.decide`` asks every format for its :meth:`~SparseFormat.candidates` (the analysis
  rule: ways the format could run this weight, or why it cannot), then picks among them by
  timing (``density_threshold="auto"``) or by :meth:`~SparseFormat.pick_by_threshold`;
- ``measure`` asks the format for the call to time (:meth:`~SparseFormat.timing_run`);
- the pass asks it to :meth:`~SparseFormat.convert` the chosen weight once (the compressed
  tensors become graph constants) and calls its op as
  ``op(x, *constants, bias, *static_args)``.

The values that travel between these layers are defined here, below every module that uses them
(``formats`` imports nothing else of the backend; ``measure``, ``options``, ``analysis`` and the
pass import this): a :class:`Candidate` (one way to run a layer), a :class:`Reason` why a layer
stays dense (a :class:`ReasonCode` with its text) and the :class:`LayerDecision` made from them.

The dtypes and shapes a format takes are declared once, in its kernel file, and read from there.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import torch

if TYPE_CHECKING:  # options imports the formats (to check format names): for annotations only
    from sparse_compile.options import SparseOptions


class ReasonCode(enum.Enum):
    """Why a layer stays dense, as a stable code; its value names the layer's counter
    (``torch._dynamo.utils.counters["sparse_compile"]["dense_<value>"]``).

    Declared in order of precedence: a layer with several reasons (one per format) is counted
    under the first of them in this order, so what was tried and lost (a threshold, a
    measurement) comes before what could not be tried (no kernel for the device, nothing to skip).
    """

    FUSED_FAST_PATH = "fused_fast_path"  # inside PyTorch's fused transformer op
    WHOLE_GRAPH_SLOWER = "whole_graph_slower"  # sparse per layer, the whole graph measured no faster
    RUNTIME_WEIGHT = "runtime_weight"  # the weight is computed from a runtime input
    UNSUPPORTED_DTYPE = "unsupported_dtype"
    ABOVE_THRESHOLD = "above_threshold"  # numeric density_threshold
    MEASURED_FASTER = "measured_faster"  # dense measured faster than every sparse candidate
    MEASURED_TIE = "measured_tie"  # sparse measured faster, but not beyond the spread or the minimum saving
    NO_KERNEL_FOR_DEVICE = "no_kernel_for_device"
    NO_BLOCK_TO_SKIP = "no_block_to_skip"
    NOT_2_4 = "not_2_4"
    NOT_TILE_MASKED = "not_tile_masked"  # training graphs: the weight is no Supermask tile mask
    # A convolution that is not a matmul over channels (kxk, grouped, padded, dilated, transposed):
    # no sparse path yet (passes/sparse_conv.py)
    CONV_NOT_MATMUL = "conv_not_matmul"
    OTHER = "other"


@dataclasses.dataclass(frozen=True)
class Reason:
    """Why a layer (or one format, for one layer) stays dense: a code and the words for the report."""

    code: ReasonCode
    text: str

    def __str__(self) -> str:
        return self.text


def combine_reasons(reasons: Sequence[Reason | None]) -> Reason | None:
    """One reason from several (e.g. one per format, in order of preference): the texts joined
    with ``"; "`` in the order given, the code the first of theirs in :class:`ReasonCode` order."""
    present = [r for r in reasons if r is not None and r.text]
    if not present:
        return None
    order = list(ReasonCode)
    code = min((r.code for r in present), key=order.index)
    return Reason(code, "; ".join(r.text for r in present))


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to run a layer. ``kind`` is ``"dense"`` or a format's name (:attr:`SparseFormat.name`);
    ``blocksize`` and ``density`` are the BSR block size and block density (None for other kinds)."""

    kind: str
    blocksize: int | None = None
    density: float | None = None

    @property
    def label(self) -> str:
        return self.kind if self.blocksize is None else f"{self.kind}{self.blocksize}"


#: Dense (``x @ W.T + b`` as Inductor compiles it), the candidate every sparse one is timed against.
DENSE = Candidate("dense")


@dataclasses.dataclass(frozen=True)
class LayerDecision:
    """What the pass does with one linear weight, and why (made by ``sparse_compile.analysis.decide``).

    Attributes:
        format: a format's name (``"bsr"``, ...) or ``"dense"``.
        blocksize: the BSR block size measured (and used, for BSR); ``None`` when none was.
        density: stored blocks / all blocks at ``blocksize`` (``None`` when not measured).
        reason: for dense layers, why (every format's reason, in words); empty for sparse layers.
        reason_code: for dense layers, the :class:`ReasonCode` of ``reason``; None for sparse ones.
        time_ms: measured time of the chosen way (``None`` with a numeric threshold).
        dense_ms: measured time of dense for the same layer (as the compiled graph runs it:
            ``sparse_compile.measure.inductor_dense``).
        dense_floor_ms: a lower bound of dense's time at the traced rows (``dense_ms`` scaled down
            when it was timed with more rows, ``measure.Timed.floor_ms``); ``None`` when the rows
            are not known. The whole-graph check sums it (``measure.GRAPH_FLOOR_MARGIN``).
        from_cache: True when no timing ran for this layer (cache hit, or a layer of the same
            shape and density measured before); ``None`` when nothing was timed.
        timings: ``(candidate label, ms)`` of every candidate timed, e.g. ``("bsr32", 0.41)``.
        candidate: the chosen :class:`Candidate` (sparse layers).
        kernel: what runs the layer when sparse (:meth:`SparseFormat.kernel` on the weight's
            device); the report's kernel column shows it as it is.
    """

    format: str
    blocksize: int | None
    density: float | None
    reason: str = ""
    time_ms: float | None = None
    dense_ms: float | None = None
    dense_floor_ms: float | None = None
    from_cache: bool | None = None
    timings: tuple[tuple[str, float], ...] = ()
    candidate: Candidate | None = None
    kernel: str = ""
    reason_code: ReasonCode | None = None

    @property
    def is_sparse(self) -> bool:
        return self.format != "dense"

    @classmethod
    def dense(cls, reason: Reason | None, candidate: Candidate | None = None, **timing) -> "LayerDecision":
        """A dense decision for ``reason``, with ``candidate``'s block size and density as the numbers
        the report shows (None: no numbers)."""
        blocksize = candidate.blocksize if candidate is not None else None
        density = candidate.density if candidate is not None else None
        reason = reason or Reason(ReasonCode.OTHER, "")
        return cls("dense", blocksize, density, reason.text, reason_code=reason.code, **timing)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class ConvertedWeight:
    """A weight in a format's storage, ready to become graph constants.

    The op is called as ``op(x, *constants, bias, *static_args)``; a ``None`` constant is passed
    as ``None`` (an optional tensor of the op's schema).

    Attributes:
        op: the ``torch.ops.sparse_compile.*`` overload that computes the layer.
        constants: ``(name prefix, tensor or None)`` per tensor argument after ``x``.
        static_args: the int/str arguments after ``bias``.
        out_features: rows of the weight (the op's output features).
        bias_dtype: the dtype the op adds its bias in, or None (the layer's own): a constant bias
            of another dtype is stored converted once, not converted by the op on every call.
    """

    op: torch._ops.OpOverload
    constants: tuple[tuple[str, Optional[torch.Tensor]], ...]
    static_args: tuple
    out_features: int
    bias_dtype: Optional[torch.dtype] = None


@dataclasses.dataclass(frozen=True)
class ThresholdChoice:
    """What a format makes of a weight without timing (a numeric ``density_threshold``).

    ``chosen`` is the candidate to run, or None with ``reason`` saying why not; ``considered`` is
    the candidate the numbers in the report describe (the best one, chosen or not).
    """

    chosen: Candidate | None
    considered: Candidate | None
    reason: Reason | None = None


class SparseFormat:
    """Base class of a sparse format. Subclasses set the class attributes and the methods.

    Attributes:
        name: the format's name in the report's format column and in ``options={"formats": ...}``.
        display_name: its name in sentences ("run as BSR").
        counter: its name in ``counters["sparse_compile"]`` (``<counter>_layers``, ``<counter>_weights``).
        dtypes: the weight dtypes some device of this format takes (from its kernel file).
    """

    name: str = ""
    display_name: str = ""
    counter: str = ""
    dtypes: tuple[torch.dtype, ...] = ()

    def unavailable_reason(self, device_type: str) -> str:
        """Why this format cannot run on ``device_type`` in this process, or ``""`` (the decision
        counts it as :attr:`ReasonCode.NO_KERNEL_FOR_DEVICE`)."""
        raise NotImplementedError

    def candidates(self, weight: torch.Tensor, options: "SparseOptions") -> Union[list[Candidate], Reason]:
        """The analysis rule: the ways this format could run ``weight`` ``[out, in]``, or why none.

        Called with a 2-D, non-empty weight of a dtype in :attr:`dtypes`, on a device the format
        is available on. An empty list means "nothing to gain" and needs a reason: return a :class:`Reason`.
        """
        raise NotImplementedError

    def pick_by_threshold(
        self, weight: torch.Tensor, candidates: Sequence[Candidate], options: "SparseOptions"
    ) -> ThresholdChoice:
        """The choice under a numeric ``density_threshold`` (no timing)."""
        raise NotImplementedError

    def timed_candidates(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        """The candidates worth timing under ``density_threshold="auto"`` (default: all)."""
        return list(candidates)

    def nothing_to_time_reason(self, candidates: Sequence[Candidate]) -> Reason:
        """Why none of ``candidates`` was worth timing (when :meth:`timed_candidates` kept none)."""
        return Reason(ReasonCode.OTHER, f"no {self.name} candidate worth timing")

    def describe(self, candidate: Candidate) -> str:
        """``"BSR at block 32 (density 0.40)"``: the candidate in a reason's words."""
        return candidate.label

    def kernel(self, device_type: str, dtype: torch.dtype) -> str:
        """What runs a converted layer on ``device_type``, in the report's words (its kernel
        column): the one place a format's kernel is named; the decision and the layer's record
        store the name."""
        raise NotImplementedError

    def convert(self, weight: torch.Tensor, candidate: Candidate) -> ConvertedWeight:
        """Compresses ``weight`` once, for the graph's constants."""
        raise NotImplementedError

    def timing_run(
        self, weight: torch.Tensor, candidate: Candidate, x: torch.Tensor, bias: torch.Tensor
    ) -> Callable[[], object]:
        """A call computing the layer on ``x`` as the converted layer would (timed by ``measure``)."""
        converted = self.convert(weight, candidate)
        tensors = [t for _, t in converted.constants]
        if bias is not None and converted.bias_dtype is not None:
            bias = bias.to(converted.bias_dtype)  # as the pass stores a constant bias

        def run():
            with torch.no_grad():
                return converted.op(x, *tensors, bias, *converted.static_args)

        return run

    def __repr__(self) -> str:
        return f"<sparse format {self.name}>"
