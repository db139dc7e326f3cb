"""Inductor post-grad pass: linear layers with sparse constant weights -> ``sparse_compile::bsr_linear``.

Runs as ``post_grad_custom_pre_pass`` on the frozen inference graph. By then AOTAutograd has
lowered every ``nn.Linear``/``F.linear`` (and the projections inside ``nn.MultiheadAttention``)
to ``aten.mm(x2d, W^T)`` or ``aten.addmm(bias, x2d, W^T)``, and freezing has folded every weight
expression — parametrizations such as ``W * mask(scores)`` included — into one constant
``get_attr`` tensor. The pass works in three steps per node:

1. match: an ``mm``/``addmm`` whose second operand is a constant 2-D tensor (the transposed weight);
2. check: :func:`sparse_compile.analysis.decide` on the weight;
3. replace: convert the weight to BSR once, store the BSR tensors as new constants, and call
   ``torch.ops.sparse_compile.bsr_linear`` instead.

Everything else stays as it was, for Inductor.
"""

from __future__ import annotations

import hashlib
import re
from typing import Callable

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._subclasses.fake_tensor import FakeTensorMode

import sparse_compile.kernels  # noqa: F401  (registers torch.ops.sparse_compile.*)
from sparse_compile.analysis import decide
from sparse_compile.kernels import BsrWeight
from sparse_compile.measure import rows_hint
from sparse_compile.options import SparseOptions
from sparse_compile.report import GraphReport, LayerRecord

aten = torch.ops.aten

#: A Dynamo source prefix such as ``L['self']`` or ``L['fn']`` in front of a module path.
_SOURCE_PREFIX = re.compile(r"^L\['[^']*'\]\.?")


class BsrLinearPass(CustomGraphPass):
    """Rewrites sparse linear layers of a frozen graph to BSR; records every decision."""

    def __init__(self, options: SparseOptions, graph_report: GraphReport):
        self.options = options
        self.graph_report = graph_report

    def uuid(self) -> str:
        # Inductor keys its caches on this: same options -> same rewrite.
        return hashlib.sha256(f"BsrLinearPass-v1-{self.options}".encode()).hexdigest()

    def __call__(self, graph: torch.fx.Graph) -> None:
        gm = graph.owning_module
        names = _LayerNamer()
        constants = _ConstantEvaluator(gm)
        for node in list(graph.nodes):
            match = _match_linear(node)
            if match is None:
                continue
            x, weight_t_node, bias = match
            weight_t = constants(weight_t_node)
            if weight_t is None:
                self._record_runtime_weight(node, weight_t_node, names)
                continue
            weight = weight_t.t()
            decision = decide(weight, self.options, rows=rows_hint(_fake(x).shape[0]))
            self.graph_report.layers.append(
                LayerRecord(
                    name=names(node, *weight.shape),
                    out_features=weight.shape[0],
                    in_features=weight.shape[1],
                    dtype=str(weight.dtype).removeprefix("torch."),
                    format=decision.format,
                    blocksize=decision.blocksize,
                    density=decision.density,
                    reason=decision.reason,
                    device=weight.device.type,
                    time_ms=decision.time_ms,
                    dense_ms=decision.dense_ms,
                    from_cache=decision.from_cache,
                )
            )
            if decision.is_sparse:
                _replace_with_bsr(gm, node, x, weight, bias, decision.blocksize)
        graph.eliminate_dead_code()
        gm.recompile()

    def _record_runtime_weight(self, node, weight_t_node, names) -> None:
        """A linear whose weight is computed from graph inputs: say so rather than skip it silently."""
        if weight_t_node.target not in (aten.permute.default, aten.t.default):
            return  # a matmul of two activations, not a linear layer
        shape = weight_t_node.meta["val"].shape
        self.graph_report.layers.append(
            LayerRecord(
                name=names(node, shape[1], shape[0]),
                out_features=int(shape[1]),
                in_features=int(shape[0]),
                dtype=str(weight_t_node.meta["val"].dtype).removeprefix("torch."),
                format="dense",
                blocksize=None,
                density=None,
                reason="weight is not a constant of the graph (computed from a runtime input)",
                device=weight_t_node.meta["val"].device.type,
            )
        )


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
        if node not in self._values:
            self._values[node] = self._evaluate(node)
        value = self._values[node]
        return value if isinstance(value, torch.Tensor) and value.dim() == 2 else None

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


def _replace_with_bsr(gm, node, x, weight, bias, blocksize: int) -> None:
    bsr = BsrWeight.from_dense(weight.detach(), blocksize)
    graph = gm.graph
    with graph.inserting_before(node):
        values = _add_constant(gm, "_sparse_bsr_values", bsr.values.contiguous())
        crow = _add_constant(gm, "_sparse_bsr_crow", bsr.crow_indices)
        col = _add_constant(gm, "_sparse_bsr_col", bsr.col_indices)
        if bias is not None and bias.meta["val"].dim() == 2:
            bias = graph.call_function(aten.view.default, (bias, [bsr.out_features]))
            bias.meta["val"] = _fake(node).new_empty(bsr.out_features)
        new = graph.call_function(
            torch.ops.sparse_compile.bsr_linear.default,
            (x, values, crow, col, bias, bsr.out_features),
        )
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _add_constant(gm: torch.fx.GraphModule, prefix: str, tensor: torch.Tensor) -> torch.fx.Node:
    index = 0
    while hasattr(gm, f"{prefix}{index}"):
        index += 1
    name = f"{prefix}{index}"
    # Stored the way Inductor's freezing stores its own constants (_frozen_param*).
    gm.register_buffer(name, tensor)
    node = gm.graph.get_attr(name)
    node.meta["val"] = _fake_mode_of(gm).from_tensor(tensor, static_shapes=True)
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
    """Names a matmul node after the module that ran it (``encoder.layers.0.mlp.0``).

    ``nn.MultiheadAttention`` runs its projections itself, so its matmuls carry the attention
    module's name: the packed input projection (out = 3 x in features) is called
    ``<name>.in_proj`` and the projection after it ``<name>.out_proj``. Any other module with
    several matmuls gets ``name:1``, ``name:2``... in graph order.
    """

    def __init__(self):
        self._seen: dict[str, int] = {}

    def __call__(self, node: torch.fx.Node, out_features: int, in_features: int) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return self._unique(f"<{node.name}>")
        path, module_type = list(stack.values())[-1]
        name = _SOURCE_PREFIX.sub("", str(path)) or "<root>"
        if isinstance(module_type, type) and issubclass(module_type, torch.nn.MultiheadAttention):
            if out_features == 3 * in_features:
                return self._unique(f"{name}.in_proj")
            if f"{name}.in_proj" in self._seen and f"{name}.out_proj" not in self._seen:
                return self._unique(f"{name}.out_proj")
        return self._unique(name)

    def _unique(self, name: str) -> str:
        count = self._seen.get(name, 0)
        self._seen[name] = count + 1
        return name if count == 0 else f"{name}:{count}"


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
            parts = [p.uuid() if hasattr(p, "uuid") else repr(p) for p in present]
            return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()

    return _Chained()
