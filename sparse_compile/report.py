"""The compile report: what the ``sparse`` backend did to every linear layer, in plain words.

Every graph the backend compiles gets a :class:`GraphReport`; :func:`report` gathers the ones
that belong to a model. A compile that silently did nothing is a bug nobody can see, so the
backend also logs a one-line summary per graph on the ``sparse_compile`` logger.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import weakref
from typing import Iterable

import torch
from tabulate import tabulate

from sparse_compile.formats.base import ReasonCode

log = logging.getLogger("sparse_compile")

#: The kernel column of a layer left to Inductor.
DENSE_KERNEL = "inductor dense"


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """One linear layer as the pass saw it: what it decided, and why, as data."""

    name: str
    out_features: int
    in_features: int
    dtype: str
    format: str  # a sparse format ("bsr", "2:4"), "masked" (training graphs) or "dense"
    blocksize: int | None
    density: float | None
    reason: str = ""  # why the layer stays dense, in words (empty for sparse layers)
    device: str = "cpu"
    # The PyTorch op the layer runs inside (its fused transformer fast path), "" for a linear.
    fused_op: str = ""
    # Measured with density_threshold="auto" (None otherwise): ms of the way chosen and of dense
    # (as Inductor compiles it), and whether the times came from the cache (no timing ran for this layer).
    time_ms: float | None = None
    dense_ms: float | None = None
    from_cache: bool | None = None
    # A lower bound of dense's time at the traced rows (``LayerDecision.dense_floor_ms``), summed
    # by the whole-graph check's floor shortcut; None when unknown.
    dense_floor_ms: float | None = None
    # What runs the layer, named where it was decided (a sparse format's ``SparseFormat.kernel``,
    # e.g. "triton bsr"; the masked pass; the fused op) and shown as it is.
    kernel: str = DENSE_KERNEL
    # Why the layer stays dense, as a code (its counter: ``dense_<code value>``); None for sparse layers.
    reason_code: ReasonCode | None = None
    # What the layer is: "linear", "conv1x1" or "conv kxk" (a convolution's ``[out, in*kh*kw]``
    # weight view is its out x in; see ``passes/sparse_conv.py``).
    kind: str = "linear"


@dataclasses.dataclass
class GraphReport:
    """The layers of one compiled graph, plus a note when the graph was not analysed at all."""

    graph_id: int
    layers: list[LayerRecord] = dataclasses.field(default_factory=list)
    note: str = ""
    # Set when Inductor could not compile the graph and the backend worked around it.
    fallback: str = ""
    training: bool = False  # compiled with grad enabled: linears run masked, not BSR
    # Why the pass found no linear layer at all (set when it found none): a compile that does
    # nothing must say why.
    no_linear: str = ""
    # True when linears may have been there but the pass could not see them (logged as a warning).
    linears_hidden: bool = False
    # The whole-graph check (``sparse_compile.measure.GraphVerdict``), or why it did not run.
    graph_check: object | None = None
    graph_check_skipped: str = ""
    # Layers the per-layer measurement chose sparse, and how ("run as BSR"), when the whole graph
    # then measured slower and runs dense: their records say dense, with both verdicts.
    sparse_before_check: int = 0
    how_before_check: str = ""
    # Weak references to the parameters and buffers the graph read, to tell which model it
    # belongs to without keeping the model alive.
    _tensor_refs: list[weakref.ref] = dataclasses.field(default_factory=list, repr=False)

    def remember_tensors(self, tensors: Iterable[object]) -> None:
        self._tensor_refs = [weakref.ref(t) for t in tensors if isinstance(t, torch.Tensor)]

    def reads_any_of(self, tensor_ids: set[int]) -> bool:
        return any((t := ref()) is not None and id(t) in tensor_ids for ref in self._tensor_refs)

    def summary(self) -> str:
        if self.note:
            return f"sparse backend, graph {self.graph_id}: {self.note}"
        if not self.layers and self.no_linear:
            return (
                f"sparse backend, graph {self.graph_id}: no linear layer found: {self.no_linear}"
                + (f"; {self.fallback}" if self.fallback else "")
            )
        sparse = [layer for layer in self.layers if layer.format != "dense"]
        fused = [layer for layer in self.layers if layer.fused_op]
        how = "run masked (training graph)" if self.training else _how_sparse(sparse)
        verdict = self.graph_check
        if verdict is not None and not verdict.keep:
            return (
                f"sparse backend, graph {self.graph_id}: kept dense: the whole graph measured "
                f"{verdict.speedup:.2f}x with {self.sparse_before_check} of {_layers(self.layers)} "
                f"{self.how_before_check} ({_verdict_numbers(verdict)}; per layer"
                f"{_expected_speedup(self.layers).removeprefix(';')}), so it runs as Inductor alone "
                "compiles it (call sparse_compile.report(model) for details)"
                + (f"; {self.fallback}" if self.fallback else "")
            )
        return (
            f"sparse backend, graph {self.graph_id}: {len(sparse)} of {_layers(self.layers)} {how}"
            + _kxk_tail(self.layers) + _expected_speedup(self.layers) + self._graph_check_text()
            + (f", {len(fused)} inside PyTorch's fused transformer fast path" if fused else "")
            + (" (call sparse_compile.report(model) for details)" if self.layers else "")
            + (f"; {self.fallback}" if self.fallback else "")
        )


    def fall_back_to_dense(self, verdict) -> None:
        """The whole graph measured slower with the rewrite: it runs as Inductor alone compiles it,
        so every layer's record says dense, with the per-layer verdict in its reason."""
        sparse = [layer for layer in self.layers if layer.format != "dense"]
        self.graph_check = verdict
        self.sparse_before_check, self.how_before_check = len(sparse), _how_sparse(sparse)
        self.layers = [
            layer if layer.format == "dense" else dataclasses.replace(
                layer, format="dense", kernel=DENSE_KERNEL, reason_code=ReasonCode.WHOLE_GRAPH_SLOWER,
                reason=(
                    f"whole graph measured {verdict.speedup:.2f}x with the rewrite, so the graph runs "
                    f"dense; per layer {layer.format} measured {_ms(layer.time_ms)} ms vs "
                    f"{_ms(layer.dense_ms)} ms dense"
                ),
            )
            for layer in self.layers
        ]

    def _graph_check_text(self) -> str:
        if self.graph_check is None:
            return f"; whole-graph check skipped: {self.graph_check_skipped}" if self.graph_check_skipped else ""
        verdict = self.graph_check
        if verdict.floor:
            return (
                f"; whole graph at least {verdict.speedup:.2f}x over Inductor alone ({verdict.sparse_ms:.3g} ms "
                f"(median) vs {verdict.dense_ms:.3g} ms that its linear layers alone take dense (per layer), "
                f"{'cached' if verdict.from_cache else 'measured'}; the plain graph not compiled)"
            )
        return f"; whole graph {verdict.speedup:.2f}x over Inductor alone ({_verdict_numbers(verdict)})"


#: The report's kinds of layer (``LayerRecord.kind``).
LAYER_KINDS = ("linear", "conv1x1", "conv kxk")


def _layers(layers: list[LayerRecord]) -> str:
    """The layers that can run sparse, counted: ``"9 linear layers"``, or where 1x1 convolutions
    are among them ``"37 layers (1 linear, 36 conv1x1)"``. kxk convolutions, which have no sparse
    path, are left to :func:`_kxk_tail`: a ViT's patch embedding does not change its line."""
    counted = [layer for layer in layers if layer.kind != "conv kxk"]
    counts = {kind: sum(layer.kind == kind for layer in counted) for kind in LAYER_KINDS[:2]}
    if counts["linear"] == len(counted):
        return f"{len(counted)} linear layers"
    return f"{len(counted)} layers (" + ", ".join(f"{n} {kind}" for kind, n in counts.items() if n) + ")"


def _kxk_tail(layers: list[LayerRecord]) -> str:
    """``"; 16 conv kxk dense (only 1x1 convolutions run sparse)"``, or nothing without any."""
    kxk = sum(layer.kind == "conv kxk" for layer in layers)
    return f"; {kxk} conv kxk dense (only 1x1 convolutions run sparse)" if kxk else ""


def _verdict_numbers(verdict) -> str:
    """``"2.2 ms vs 1.71 ms for Inductor alone (medians), measured, needed 3% faster"``."""
    source = "cached" if verdict.from_cache else "measured"
    return (
        f"{verdict.sparse_ms:.3g} ms vs {verdict.dense_ms:.3g} ms for Inductor alone (medians), {source}, "
        f"needed {verdict.band:.0%} faster"
    )


def _how_sparse(sparse: list[LayerRecord]) -> str:
    """``"run as BSR"``, or with several formats ``"run sparse (2 bsr, 1 2:4)"``."""
    counts: dict[str, int] = {}
    for layer in sparse:
        counts[layer.format] = counts.get(layer.format, 0) + 1
    if len(counts) > 1:
        return "run sparse (" + ", ".join(f"{n} {name}" for name, n in counts.items()) + ")"
    name = next(iter(counts), "bsr")
    return "run as BSR" if name == "bsr" else f"run as {name}"


def _expected_speedup(layers: list[LayerRecord]) -> str:
    """``"; expected speedup of the linears 1.84x over dense (measured)"``: the summed dense
    time of the timed layers / their summed chosen time (nothing when no layer was timed)."""
    timed = [layer for layer in layers if layer.time_ms is not None and layer.dense_ms is not None]
    chosen = sum(layer.time_ms for layer in timed)
    if not timed or chosen <= 0:
        return ""
    untimed = len(layers) - len(timed)
    return (
        f"; expected speedup of the linears {sum(layer.dense_ms for layer in timed) / chosen:.2f}x "
        f"over dense (measured" + (f", {untimed} layer(s) not timed)" if untimed else ")")
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _timing_source(layer: LayerRecord) -> str:
    if layer.from_cache is None:
        return "-"
    return "cache" if layer.from_cache else "measured"


@dataclasses.dataclass
class CompileReport:
    """All graphs compiled for one model (or for everything, when no model is given)."""

    graphs: list[GraphReport]

    @property
    def layers(self) -> list[LayerRecord]:
        return [layer for graph in self.graphs for layer in graph.layers]

    @property
    def sparse_layers(self) -> list[LayerRecord]:
        return [layer for layer in self.layers if layer.format != "dense"]

    @property
    def convertible_layers(self) -> list[LayerRecord]:
        """The layers that have a sparse path, run sparse or not: linears and 1x1 convolutions (a
        kxk convolution is listed, but always dense). What "N of M" counts in the summary."""
        return [layer for layer in self.layers if layer.kind != "conv kxk"]

    @property
    def dense_layers(self) -> list[LayerRecord]:
        return [layer for layer in self.layers if layer.format == "dense"]

    def __str__(self) -> str:
        if not self.graphs:
            return (
                "sparse backend: nothing compiled yet. torch.compile is lazy: call the compiled "
                "model once, then ask for the report."
            )
        rows = [
            [
                layer.name,
                layer.kind,
                f"{layer.out_features}x{layer.in_features}",
                layer.dtype,
                layer.format,
                layer.kernel,
                layer.blocksize if layer.blocksize is not None else "-",
                f"{layer.density:.3f}" if layer.density is not None else "-",
                _ms(layer.time_ms),
                _ms(layer.dense_ms),
                _timing_source(layer),
                layer.reason,
            ]
            for layer in self.layers
        ]
        lines = [graph.summary() for graph in self.graphs]
        if rows:
            headers = [
                "layer", "kind", "out x in", "dtype", "format", "kernel", "block/tile", "block density",
                "ms", "dense ms", "timing", "why dense",
            ]
            lines.append(tabulate(rows, headers=headers, disable_numparse=True))
        return "\n".join(lines)


_graph_ids = itertools.count()
_reports: list[GraphReport] = []


def new_graph_report() -> GraphReport:
    graph_report = GraphReport(graph_id=next(_graph_ids))
    _reports.append(graph_report)
    return graph_report


def report(model: torch.nn.Module | None = None) -> CompileReport:
    """What the ``sparse`` backend did to the linear layers of ``model``.

    Args:
        model: the module returned by ``torch.compile(..., backend="sparse")`` or the module it
            wraps. ``None`` gives every graph compiled by the backend in this process (e.g. for
            a compiled function).

    Returns:
        a :class:`CompileReport`; ``print`` it for a table with, per layer, name, shape, dtype,
        format, block size, block density, the measured times of the chosen way and of dense
        (``density_threshold="auto"``) and, for dense layers, why.
    """
    if model is None:
        return CompileReport(list(_reports))
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"sparse_compile.report takes the compiled nn.Module (or None for every graph), "
            f"got {type(model).__name__}"
        )
    module = getattr(model, "_orig_mod", model)
    tensor_ids = {id(t) for t in itertools.chain(module.parameters(), module.buffers())}
    return CompileReport([graph for graph in _reports if graph.reads_any_of(tensor_ids)])


def clear_reports() -> None:
    """Forgets every recorded graph (the counter of graph ids keeps running)."""
    _reports.clear()
