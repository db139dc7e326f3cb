"""Inductor post-grad pass: linear layers with sparse constant weights -> the op of their sparse format.

Runs as ``post_grad_custom_pre_pass`` on the frozen inference graph. By then AOTAutograd has
lowered every ``nn.Linear``/``F.linear`` (and the projections inside ``nn.MultiheadAttention``)
to ``aten.mm(x2d, W^T)`` or ``aten.addmm(bias, x2d, W^T)`` (or, for a non-contiguous 3-D input
and a weight that does not require grad, ``aten.bmm(x3d, expand(W^T))``), and freezing has folded every weight
expression — parametrizations such as ``W * mask(scores)`` included — into one constant
``get_attr`` tensor. The pass works in three steps per node:

1. match: an ``mm``/``addmm``/``bmm`` whose second operand is a constant matrix (the transposed
   weight; for ``bmm``, one matrix expanded over the batch);
2. check: :func:`sparse_compile.analysis.decide` on the weight, over the formats of the options
   (``sparse_compile.formats``: BSR, ...);
3. replace: the chosen format converts the weight once (``SparseFormat.convert``), its tensors
   become new constants, and its op (``torch.ops.sparse_compile.bsr_linear``, ...) is called
   instead as ``op(x, *constants, bias, *static_args)``. Linears that share one weight (tied
   weights) share one converted copy.

The pass knows no format: adding one touches ``sparse_compile/formats/`` and ``kernels/`` only.

PyTorch's fused inference fast paths (``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``
in eval mode under no_grad) hide their projections inside one native op. The backend decomposes
unmasked encoder layers before this pass runs (``fused_transformer.py``); for the fused ops that
remain, the pass records each weight with its block density and how to get the sparse path.

Everything else stays as it was, for Inductor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from typing import Callable, Mapping

import torch
import torch.fx
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._subclasses.fake_tensor import FakeTensorMode

import sparse_compile.kernels  # noqa: F401  (registers torch.ops.sparse_compile.*)
from sparse_compile import formats as _formats
from sparse_compile.analysis import decide
from sparse_compile.formats.base import LayerDecision, Reason, ReasonCode
from sparse_compile.measure import rows_hint
from sparse_compile.options import SparseOptions
from sparse_compile.passes import epilogues, sparse_conv
from sparse_compile.report import DENSE_KERNEL, GraphReport, LayerRecord

aten = torch.ops.aten

#: A Dynamo source prefix such as ``L['self']``, ``L['fn']`` or ``G['model']`` in front of a module path.
_SOURCE_PREFIX = re.compile(r"^[LG]\['[^']*'\]\.?")


class SparseLinearPass(CustomGraphPass):
    """Rewrites sparse linear layers of a frozen graph to their sparse format; records every decision.

    Args:
        options: the user's options.
        graph_report: where each layer's record goes.
        weight_names: ``{storage data_ptr: qualified parameter name}`` of the model's weights, to
            name a layer after its weight (see :class:`_LayerNamer`); empty when unknown.
    """

    def __init__(
        self, options: SparseOptions, graph_report: GraphReport, weight_names: Mapping[int, str] | None = None
    ):
        self.options = options
        self.graph_report = graph_report
        self.weight_names = dict(weight_names or {})
        self.formats = options.sparse_formats()
        # Converted copies made by the last run, per format name (tied weights share one).
        self.weights_converted: dict[str, int] = {}
        self.ran = False  # whether Inductor ran the pass (the backend says so when it did not)

    def uuid(self) -> None:
        """None: Inductor must not cache a graph this pass rewrote (it then bypasses its FX graph
        cache for the compile: torch 2.11 ``FxGraphCache._check_can_cache``).

        The rewrite depends on more than the graph and the options: on the weights' values
        (which blocks are zero: a frozen constant's value is not in Inductor's cache key) and,
        under ``density_threshold="auto"``, on timings taken on this machine. A key from the
        options alone would let a cached graph run another model's BSR copies. The backend also
        switches the cache off (``fx_graph_cache=False``), since a cached graph would skip the
        pass and so the report.
        """
        return None

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.ran = True
        _keep_our_constants_as_buffers()
        gm = graph.owning_module
        names = _LayerNamer(gm, self.weight_names)
        constants = _ConstantEvaluator(gm)
        converted: dict[tuple, _Constants] = {}  # one converted copy per weight, for tied weights
        calls: list[tuple[torch.fx.Node, int]] = []  # each new op call and its layer's record
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target in _FUSED_FAST_PATH_WEIGHTS:
                self._record_fused_fast_path(node, constants, names)
                continue
            if node.op == "call_function" and node.target in _PACKED_CONVS:
                self._record_packed_conv(node, names)
                continue
            conv = sparse_conv.match_conv(node)
            if conv is not None:
                recorded = len(self.graph_report.layers)
                try:
                    call = self._convolution(gm, node, conv, constants, names, converted)
                except Exception as error:  # noqa: BLE001 - a conv the pass cannot take stays dense
                    self._conv_failed(node, conv, recorded, error)
                    continue
                if call is not None:
                    calls.append((call, len(self.graph_report.layers) - 1))
                continue
            match = _match_linear(node)
            if match is None:
                continue
            x, weight_t_node, bias = match
            weight_t = constants(weight_t_node)
            if weight_t is None:
                self._record_runtime_weight(node, weight_t_node, names)
                continue
            weight = weight_t.t()
            name = names(node, weight_t_node, *weight.shape)
            decision = decide(weight, self.options, rows=rows_hint(math.prod(_fake(x).shape[:-1])), formats=self.formats)
            self.graph_report.layers.append(_record(name, weight, decision))
            if not decision.is_sparse:
                continue
            key = _weight_key(weight_t, decision.candidate)
            if key not in converted:
                converted[key] = _Constants.convert(gm, weight, decision)
            calls.append((_replace(gm, node, x, converted[key], bias, constants), len(self.graph_report.layers) - 1))
        self._fuse_activations(calls)
        self.weights_converted = {}
        for constants in converted.values():
            self.weights_converted[constants.format] = self.weights_converted.get(constants.format, 0) + 1
        if not self.graph_report.layers:
            why, hidden = why_no_linear(graph)
            self.graph_report.no_linear, self.graph_report.linears_hidden = why, hidden
        graph.eliminate_dead_code()
        gm.recompile()

    def _fuse_activations(self, calls: list[tuple[torch.fx.Node, int]]) -> None:
        """GELU / ReLU after a CPU tile kernel call run inside it (``epilogues.py``): the layer's
        kernel column says so ("tile kernel (cpu) + gelu"), ``counters["sparse_compile"]["fused_<name>"]`` counts."""
        for call, index in calls:
            activation = epilogues.fuse_activation(call)
            if activation is None:
                continue
            record = self.graph_report.layers[index]
            self.graph_report.layers[index] = dataclasses.replace(record, kernel=f"{record.kernel} + {activation}")
            counters["sparse_compile"][f"fused_{activation}"] += 1

    def _convolution(self, gm, node, conv: "sparse_conv.ConvMatch", constants, names, converted) -> torch.fx.Node | None:
        """A convolution: analysed as its ``[out, in*kh*kw]`` weight view with the linears'
        machinery; a 1x1 one that is a matmul over channels runs as its format's op
        (``passes/sparse_conv.py``; its call is returned), every other one stays dense with the reason."""
        weight = constants.tensor(conv.weight)
        fake_weight = _fake(conv.weight)
        kind = sparse_conv.conv_kind(fake_weight.shape)
        matrix_shape = (int(fake_weight.shape[0]), math.prod(int(d) for d in fake_weight.shape[1:]))
        name = names(node, conv.weight, *matrix_shape)
        why = conv.why_not_matmul(fake_weight.shape)
        if weight is None:
            why = Reason(ReasonCode.RUNTIME_WEIGHT, "weight is not a constant of the graph (computed from a runtime input)")
        if why is not None:
            record = _record(name, fake_weight.new_empty(matrix_shape), LayerDecision.dense(why))
            self.graph_report.layers.append(dataclasses.replace(record, kind=kind))
            return None
        matrix = sparse_conv.weight_matrix(weight)
        rows = rows_hint(sparse_conv.output_rows(node))
        decision = decide(matrix, self.options, rows=rows, formats=self.formats)
        self.graph_report.layers.append(dataclasses.replace(_record(name, matrix, decision), kind=kind))
        if not decision.is_sparse:
            return None
        key = _weight_key(weight, decision.candidate)
        if key not in converted:
            converted[key] = _Constants.convert(gm, matrix, decision)
        weights = converted[key]
        with gm.graph.inserting_before(node):
            tensors = [None if name is None else _get_constant(gm, name) for name in weights.names]
            bias = _bias_as_the_op_adds_it(gm, conv.bias, constants, weights.bias_dtype)
        return sparse_conv.replace_conv1x1(gm.graph, node, conv, weights.op, tensors, bias, weights.static_args)

    def _conv_failed(self, node, conv: "sparse_conv.ConvMatch", recorded: int, error: Exception) -> None:
        """The rewrite of a convolution raised: it stays dense (the node is still in the graph
        unless the replacement finished), and its record says why."""
        if node.graph is None or node not in node.graph.nodes:  # replaced: the error came after
            raise error
        previous = self.graph_report.layers[recorded:]
        del self.graph_report.layers[recorded:]
        why = Reason(ReasonCode.OTHER, f"the convolution rewrite failed ({type(error).__name__}: {error}), left dense")
        fake_weight = _fake(conv.weight)
        matrix_shape = (int(fake_weight.shape[0]), math.prod(int(d) for d in fake_weight.shape[1:]))
        name = previous[0].name if previous else f"<{node.name}>"
        record = _record(name, fake_weight.new_empty(matrix_shape), LayerDecision.dense(why))
        self.graph_report.layers.append(dataclasses.replace(record, kind=sparse_conv.conv_kind(fake_weight.shape)))

    def _record_packed_conv(self, node, names) -> None:
        """A convolution freezing packed for oneDNN (``mkldnn._convolution_pointwise``): the backend
        lets it pack only those the pass could not run sparse (``sparse_conv.may_run_sparse``)."""
        transposed = node.target is sparse_conv.PACKED_CONV_TRANSPOSE
        # (x, weight, bias, padding, [output_padding,] stride, dilation, groups, ...)
        weight_node, padding, groups = node.args[1], node.args[3], node.args[7 if transposed else 6]
        fake_weight = weight_node.meta.get("val") if isinstance(weight_node, torch.fx.Node) else None
        if not isinstance(fake_weight, torch.Tensor) or fake_weight.dim() < 3:
            return
        matrix_shape = (int(fake_weight.shape[0]), math.prod(int(d) for d in fake_weight.shape[1:]))
        reason = sparse_conv.packed_conv_reason(fake_weight.shape, int(groups), padding, transposed)
        record = _record(names(node, weight_node, *matrix_shape), fake_weight.new_empty(matrix_shape), LayerDecision.dense(reason))
        self.graph_report.layers.append(
            dataclasses.replace(record, kind=sparse_conv.conv_kind(fake_weight.shape), kernel="oneDNN convolution (packed)")
        )

    def _record_runtime_weight(self, node, weight_t_node, names) -> None:
        """A linear whose weight is computed from graph inputs: say so rather than skip it silently."""
        if weight_t_node.target not in (aten.permute.default, aten.t.default):
            return  # a matmul of two activations, not a linear layer
        shape = weight_t_node.meta["val"].shape
        self.graph_report.layers.append(
            LayerRecord(
                name=names(node, weight_t_node, shape[1], shape[0]),
                out_features=int(shape[1]),
                in_features=int(shape[0]),
                dtype=str(weight_t_node.meta["val"].dtype).removeprefix("torch."),
                format="dense",
                blocksize=None,
                density=None,
                reason="weight is not a constant of the graph (computed from a runtime input)",
                reason_code=ReasonCode.RUNTIME_WEIGHT,
                device=weight_t_node.meta["val"].device.type,
            )
        )

    def _record_fused_fast_path(self, node, constants, names) -> None:
        """Records the weights of a fused attention/encoder op, which run dense inside it."""
        op_name = f"aten.{node.target._opname}"
        for index, suffix in _FUSED_FAST_PATH_WEIGHTS[node.target]:
            weight_node = node.args[index]
            weight = constants(weight_node) if isinstance(weight_node, torch.fx.Node) else None
            if weight is None:
                continue
            decision = decide(weight, self.options, rows=None, formats=self.formats)
            inside = (
                f"runs inside PyTorch's fused {op_name} "
                "(the nn.MultiheadAttention/TransformerEncoderLayer inference fast path)"
            )
            if decision.is_sparse:
                could = (
                    f"its block density is {decision.density:.2f}" if decision.format == "bsr"
                    else f"it could run as {decision.format}"
                )
                reason = (
                    f"{inside}, dense although {could}: call torch.backends.mha.set_fastpath_enabled(False) "
                    f"before compiling to run it as {_formats.get(decision.format).display_name}"
                )
            else:
                reason = f"{inside}; {decision.reason}"
            dense = dataclasses.replace(
                decision, format="dense", reason=reason, reason_code=ReasonCode.FUSED_FAST_PATH, kernel=op_name
            )
            record = _record(names.for_fused_weight(node, weight_node, suffix), weight, dense)
            self.graph_report.layers.append(dataclasses.replace(record, fused_op=op_name))


#: oneDNN's packed convolutions (``passes/sparse_conv.py``), where this build of PyTorch has them.
_PACKED_CONVS = tuple(op for op in (sparse_conv.PACKED_CONV, sparse_conv.PACKED_CONV_TRANSPOSE) if op is not None)


# For each fused op of PyTorch's transformer inference fast path: (argument index, layer name
# suffix) of its linear weights, from the ops' schemas in native_functions.yaml.
_FUSED_FAST_PATH_WEIGHTS = {
    aten._native_multi_head_attention.default: ((5, "in_proj"), (7, "out_proj")),
    aten._transformer_encoder_layer_fwd.default: (
        (3, "self_attn.in_proj"),
        (5, "self_attn.out_proj"),
        (14, "linear1"),
        (16, "linear2"),
    ),
}


def why_no_linear(graph: torch.fx.Graph) -> tuple[str, bool]:
    """Why a graph in which the pass matched no linear has none, in the report's words, and
    whether linears were there but hidden from the pass (a bug, logged as a warning)."""
    packed = [node for node in graph.nodes if node.op == "call_function" and _is_packed_linear(node.target)]
    if packed:
        ops = sorted({str(node.target) for node in packed})
        return (
            f"{len(packed)} linear layer(s) reached the pass already packed by Inductor's freezing "
            f"for oneDNN/MKL ({', '.join(ops)}), so they run dense. This is a bug of the backend "
            "(it hides Inductor's weight packing from its pass): please report it",
            True,
        )
    matmuls = [node for node in graph.nodes if node.op == "call_function" and node.target in _MATMULS]
    if matmuls:
        return f"its {len(matmuls)} matmul(s) multiply activations, none a weight", False
    return "the graph has no matmul", False


_MATMULS = (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default)


def _is_packed_linear(target) -> bool:
    """oneDNN/MKL linear ops with a prepacked weight, as Inductor's freezing makes them on CPU."""
    name = str(target)
    return any(part in name for part in ("_mkl_linear", "_linear_pointwise", "qlinear"))


def _record(name: str, weight: torch.Tensor, decision: LayerDecision) -> LayerRecord:
    return LayerRecord(
        name=name,
        out_features=weight.shape[0],
        in_features=weight.shape[1],
        dtype=str(weight.dtype).removeprefix("torch."),
        format=decision.format,
        blocksize=decision.blocksize,
        density=decision.density,
        reason=decision.reason,
        reason_code=decision.reason_code,
        device=weight.device.type,
        time_ms=decision.time_ms,
        dense_ms=decision.dense_ms,
        dense_floor_ms=decision.dense_floor_ms,
        from_cache=decision.from_cache,
        kernel=decision.kernel or DENSE_KERNEL,
    )


def _weight_key(weight_t: torch.Tensor, candidate) -> tuple:
    """Equal for two uses of one weight tensor (a tied weight), different otherwise.

    The constants stay alive during the pass, so a storage address is not reused under it.
    """
    storage = weight_t.untyped_storage()
    return (storage.data_ptr(), weight_t.storage_offset(), tuple(weight_t.shape), weight_t.stride(),
            weight_t.dtype, weight_t.device, candidate)


def _match_linear(node: torch.fx.Node):
    """``(x, transposed weight, bias or None)`` nodes if ``node`` is a linear's matmul."""
    if node.op != "call_function":
        return None
    if node.target is aten.mm.default:
        x, weight_t = node.args
        bias = None
    elif node.target is aten.addmm.default:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        bias, x, weight_t = node.args[:3]
        # The bias of a linear broadcasts over rows: shape [N] (or [1, N]).
        bias_val = bias.meta.get("val") if isinstance(bias, torch.fx.Node) else None
        if bias_val is None or bias_val.dim() > 2 or (bias_val.dim() == 2 and bias_val.shape[0] != 1):
            return None
    elif node.target is aten.bmm.default:
        # F.linear on a non-contiguous 3-D input whose weight does not require grad (a
        # parametrized weight under no_grad, e.g. nn.MultiheadAttention's in_proj with batch_first:
        # it transposes its input) decomposes to bmm(x, expand(W^T)); freezing folds the expanded
        # W^T into one 3-D constant. The pass takes it when every batch sees one matrix.
        x, weight_t = node.args
        bias = None
    else:
        return None
    if not isinstance(x, torch.fx.Node) or not isinstance(weight_t, torch.fx.Node):
        return None
    return x, weight_t, bias


class _ConstantEvaluator:
    """Values of nodes computed only from constants, evaluated once with real tensors.

    Freezing folds most weight expressions into one ``get_attr`` constant, but Inductor's
    constant folder deliberately leaves some ops for run time (``full``, and everything after
    it: an N:M mask built by ``scatter`` into a ``full`` tensor stays unfolded). The pass needs
    the final weight, so it evaluates what is left. Nodes fed by a graph input, impure nodes
    and random ops are not constants.
    """

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self._values: dict[torch.fx.Node, torch.Tensor | None] = {}

    def __call__(self, node: torch.fx.Node) -> torch.Tensor | None:
        """The node's constant value as a matrix, or None.

        A 3-D constant counts when it is one matrix expanded over its batch dim (stride 0, as
        ``expand`` makes it: the weight operand of a linear lowered to ``bmm``).
        """
        if node not in self._values:
            self._values[node] = self._evaluate(node)
        value = self._values[node]
        if not isinstance(value, torch.Tensor):
            return None
        if value.dim() == 3 and value.shape[0] > 0 and value.stride(0) == 0:
            return value[0]
        return value if value.dim() == 2 else None

    def tensor(self, node: torch.fx.Node) -> torch.Tensor | None:
        """The node's constant value as it is (any number of dims: a conv weight), or None."""
        if node not in self._values:
            self._values[node] = self._evaluate(node)
        value = self._values[node]
        return value if isinstance(value, torch.Tensor) else None

    def _evaluate(self, node: torch.fx.Node):
        if node.op == "get_attr":
            value = self.gm
            for part in str(node.target).split("."):
                value = getattr(value, part, None)
            return value
        if node.op != "call_function" or node.is_impure() or _is_random(node.target):
            return None
        inputs = node.all_input_nodes
        for input_node in inputs:
            if input_node not in self._values:
                self._values[input_node] = self._evaluate(input_node)
            if self._values[input_node] is None:
                return None
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: self._values[n])
        with torch.no_grad():
            return node.target(*args, **kwargs)


def _is_random(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags


@dataclasses.dataclass(frozen=True)
class _Constants:
    """A converted weight as the graph holds it: the names of its constants (None for an absent
    optional tensor) and how to call its format's op."""

    format: str
    op: torch._ops.OpOverload
    names: tuple[str | None, ...]
    static_args: tuple
    out_features: int
    bias_dtype: torch.dtype | None = None

    @classmethod
    def convert(cls, gm: torch.fx.GraphModule, weight: torch.Tensor, decision: LayerDecision) -> "_Constants":
        converted = _formats.get(decision.format).convert(weight.detach(), decision.candidate)
        names = tuple(
            None if tensor is None else _add_constant(gm, prefix, tensor) for prefix, tensor in converted.constants
        )
        return cls(
            decision.format, converted.op, names, converted.static_args, converted.out_features, converted.bias_dtype
        )


def _replace(gm, node, x, constants: _Constants, bias, values: "_ConstantEvaluator") -> torch.fx.Node:
    graph = gm.graph
    with graph.inserting_before(node):
        tensors = [None if name is None else _get_constant(gm, name) for name in constants.names]
        bias = _bias_as_the_op_adds_it(gm, bias, values, constants.bias_dtype)
        if bias is not None and bias.meta["val"].dim() == 2:
            bias = graph.call_function(aten.view.default, (bias, [constants.out_features]))
            bias.meta["val"] = _fake(node).new_empty(constants.out_features)
        new = graph.call_function(constants.op, (x, *tensors, bias, *constants.static_args))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def _bias_as_the_op_adds_it(
    gm: torch.fx.GraphModule, bias: torch.fx.Node | None, values: "_ConstantEvaluator", dtype: torch.dtype | None
) -> torch.fx.Node | None:
    """``bias`` as the op adds it: a constant bias (frozen, or computed from constants) of another
    dtype than ``dtype`` (``ConvertedWeight.bias_dtype``) becomes a new constant in that dtype (a
    ``get_attr`` at the insert point), converted once here rather than by the op on every call. A
    bias computed at run time, already of that dtype, or with no ``dtype`` asked, stays as it is."""
    if bias is None or dtype is None:
        return bias
    value = values.tensor(bias)
    if value is None or value.dtype == dtype:
        return bias
    return _get_constant(gm, _add_constant(gm, "_sparse_bias", value.detach().to(dtype).contiguous()))


def _add_constant(gm: torch.fx.GraphModule, prefix: str, tensor: torch.Tensor) -> str:
    """Stores ``tensor`` on ``gm`` under a new name (as freezing stores its ``_frozen_param*``),
    marked as ours (see :func:`_keep_our_constants_as_buffers`)."""
    index = 0
    while hasattr(gm, f"{prefix}{index}"):
        index += 1
    name = f"{prefix}{index}"
    setattr(tensor, _OURS, True)
    gm.register_buffer(name, tensor)
    return name


#: The attribute that marks a tensor as a constant this pass added to the graph.
_OURS = "_sparse_compile_constant"


def _keep_our_constants_as_buffers() -> None:
    """Keeps Inductor from inlining the constants this pass adds.

    Inductor inlines a 1-D constant of up to 8 elements as code that rebuilds it on every call
    (``GraphLowering.can_inline_constant``). A converted weight's index arrays often are that
    small (DeiT-tiny's 192x192 layers at 90% / 32: 7 block-row pointers, 4 column indices), and
    each one's values went into a C++ kernel of its own, fused with its neighbours: timm
    DeiT-tiny's rewritten graph had 32 distinct kernels to compile instead of 9, 15 s of a 57 s
    cold compile. Our marked tensors are kept as buffers (as every larger constant is); every
    other constant is inlined as before. Installed once per process; where Inductor's hook is
    not the static method this was written for, nothing is changed (the compile is slower, not
    different).
    """
    from torch._inductor.graph import GraphLowering

    current = GraphLowering.__dict__.get("can_inline_constant")
    if not isinstance(current, staticmethod) or getattr(current.__func__, _OURS, False):
        return
    inline = current.__func__

    def can_inline_constant(t: torch.Tensor) -> bool:
        return not getattr(t, _OURS, False) and inline(t)

    setattr(can_inline_constant, _OURS, True)
    GraphLowering.can_inline_constant = staticmethod(can_inline_constant)


def _get_constant(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    """A ``get_attr`` node for a constant stored by :func:`_add_constant`, at the insert point."""
    node = gm.graph.get_attr(name)
    node.meta["val"] = _fake_mode_of(gm).from_tensor(getattr(gm, name), static_shapes=True)
    return node


def _fake(node: torch.fx.Node) -> torch.Tensor:
    return node.meta["val"]


def _fake_mode_of(gm: torch.fx.GraphModule) -> FakeTensorMode:
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and hasattr(val, "fake_mode"):
            return val.fake_mode
    return FakeTensorMode()


class _LayerNamer:
    """Names a matmul node after its weight's parameter, or else after the module that ran it.

    The parameter's name (``features.1.0.attn.qkv`` for ``features.1.0.attn.qkv.weight``,
    ``...self_attention.in_proj`` for an ``in_proj_weight``) is used when the parameter belongs to
    the module that ran the matmul or to one inside it: that covers ``F.linear(x, self.qkv.weight)``
    in a parent module (torchvision swin, timm eva02), and leaves a tied weight used by another
    module named after that module.

    Otherwise the module stack names it: ``nn.MultiheadAttention`` runs its projections itself,
    so its matmuls carry the attention module's name: the packed input projection (out = 3 x in
    features) is called ``<name>.in_proj`` and the projection after it ``<name>.out_proj``. Any
    other module with several matmuls gets ``name:1``, ``name:2``... in graph order.
    """

    def __init__(self, gm: torch.fx.GraphModule, weight_names: Mapping[int, str]):
        self._gm = gm
        self._weight_names = weight_names
        self._seen: dict[str, int] = {}

    def __call__(self, node: torch.fx.Node, weight_node: torch.fx.Node, out_features: int, in_features: int) -> str:
        module_name, module_type = self._module_of(node)
        parameter = self._parameter_name(weight_node)
        if parameter is not None and _is_inside(parameter, module_name):
            return self._unique(parameter)
        if module_name is None:
            return self._unique(f"<{node.name}>")
        if isinstance(module_type, type) and issubclass(module_type, torch.nn.MultiheadAttention):
            if out_features == 3 * in_features:
                return self._unique(f"{module_name}.in_proj")
            if f"{module_name}.in_proj" in self._seen and f"{module_name}.out_proj" not in self._seen:
                return self._unique(f"{module_name}.out_proj")
        return self._unique(module_name)

    def for_fused_weight(self, node: torch.fx.Node, weight_node: torch.fx.Node, suffix: str) -> str:
        """A weight of a fused fast-path op: its parameter's name, or ``<module>.<suffix>``."""
        parameter = self._parameter_name(weight_node)
        if parameter is not None:
            return self._unique(parameter)
        module_name, _ = self._module_of(node)
        return self._unique(f"{module_name or '<' + node.name + '>'}.{suffix}")

    @staticmethod
    def _module_of(node: torch.fx.Node):
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return None, None
        path, module_type = list(stack.values())[-1]
        return _SOURCE_PREFIX.sub("", str(path)) or "<root>", module_type

    def _parameter_name(self, weight_node: torch.fx.Node) -> str | None:
        """The layer name of the whole parameter ``weight_node`` reads (through views), if any."""
        node = weight_node
        while node.op == "call_function" and node.target in _VIEW_OPS:
            node = node.args[0]
        if node.op != "get_attr":
            return None
        tensor = getattr(self._gm, str(node.target), None)
        if not isinstance(tensor, torch.Tensor) or tensor.is_mkldnn:  # oneDNN-packed: no storage
            return None
        parameter = self._weight_names.get(tensor.untyped_storage().data_ptr())
        if parameter is None or tensor.storage_offset() != 0:
            return None
        return layer_name_of_parameter(parameter)

    def _unique(self, name: str) -> str:
        count = self._seen.get(name, 0)
        self._seen[name] = count + 1
        return name if count == 0 else f"{name}:{count}"


def _is_inside(parameter: str, module_name: str | None) -> bool:
    """Whether the layer ``parameter`` names belongs to ``module_name`` or to a module inside it."""
    return module_name in (None, "<root>") or parameter.startswith(module_name + ".")


# Ops that only reinterpret a weight (AOTAutograd's transpose of a linear weight, reshapes).
_VIEW_OPS = (aten.permute.default, aten.t.default, aten.transpose.int, aten.view.default, aten._unsafe_view.default)


def layer_name_of_parameter(parameter: str) -> str:
    """``a.qkv.weight`` -> ``a.qkv``; ``attn.in_proj_weight`` -> ``attn.in_proj``; else unchanged."""
    if parameter.endswith(".weight"):
        return parameter.removesuffix(".weight")
    if parameter.endswith("_weight"):
        return parameter.removesuffix("_weight")
    return parameter


def chain_passes(*passes: Callable[[torch.fx.Graph], None] | None):
    """One post-grad pass that runs several, so a user's own custom pass is kept."""
    present = [p for p in passes if p is not None]
    if len(present) == 1:
        return present[0]

    class _Chained(CustomGraphPass):
        def __call__(self, graph):
            for p in present:
                p(graph)

        def uuid(self):
            # Cacheable only when every pass is: a None (or a pass without uuid) means "do not cache".
            parts = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in present]
            if any(part is None for part in parts):
                return None
            return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()

    return _Chained()
