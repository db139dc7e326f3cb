"""Training-graph rewrite: linears whose weight is a Supermask tile mask -> ``sparse_compile::masked_linear``.

Runs on the graph Dynamo captured (torch-level IR), before AOTAutograd, when grad is enabled.
Why there and not as an Inductor post-grad pass like the BSR one: the masked layer changes three
matmuls of the joint graph (forward, input gradient, weight gradient) and the STE gradient to the
scores, and after AOTAutograd they are scattered over the forward and the backward graph as
``mm``s of ``W * expand(mask)``, transposes and reductions whose exact shape depends on the
partitioner. Before AOTAutograd the layer is two calls:

    weight = torch.ops.sparse_compile.tile_masked_weight(W, tile_mask, tile_size)   # Supermask.forward
    y = torch._C._nn.linear(x, weight, bias)                                          # nn.Linear / F.linear

and replacing the second by ``masked_linear(x, W, tile_mask, bias, tile_size)`` is enough: the
op's registered autograd gives AOTAutograd the backward (masked input gradient, dense weight
gradient, eager Supermask's gradients to ``W`` and the mask), and the scores' STE upstream of
``tile_mask`` is untouched. Match -> check -> replace, one record per linear in the report.

Layers left as they are (with the reason in the report): weights not built by
``tile_masked_weight`` (dense layers, other parametrizations), dtypes other than
float32/float16/bfloat16 or mixed dtypes (autocast), tiles smaller than 16 (too many tiny
matmuls to pay), on CUDA tiles that are not a power of two (the Triton kernel's tile), and
linears Dynamo does not show: ``nn.MultiheadAttention`` stays one
``F.multi_head_attention_forward`` call in Dynamo's graph, so its projections stay dense.
"""

from __future__ import annotations

import inspect

import torch
import torch.fx
from torch._dynamo.utils import counters

import sparse_compile.kernels  # noqa: F401  (registers torch.ops.sparse_compile.*)
from sparse_compile.kernels.masked_linear import SUPPORTED_DTYPES, triton_tile_size_ok
from sparse_compile.passes.bsr_linear import _LayerNamer
from sparse_compile.report import GraphReport, LayerRecord

_LINEARS = (torch._C._nn.linear, torch.nn.functional.linear)
_TILE_MASKED_WEIGHT = (torch.ops.sparse_compile.tile_masked_weight, torch.ops.sparse_compile.tile_masked_weight.default)
_MHA = (torch.nn.functional.multi_head_attention_forward,)

#: Smallest tile the rewrite takes: below it the per-tile work is too small to beat a dense matmul.
MIN_TILE_SIZE = 16


class MaskedLinearPass:
    """Rewrites Supermask linears of a Dynamo training graph to ``masked_linear``; records every linear."""

    def __init__(self, graph_report: GraphReport):
        self.graph_report = graph_report

    def __call__(self, gm: torch.fx.GraphModule) -> int:
        """Rewrites ``gm`` in place; returns how many linears now run masked."""
        # Weights are graph inputs here (no freezing): layers are named after their modules.
        names = _LayerNamer(gm, {})
        rewritten = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target in _LINEARS:
                rewritten += self._linear(gm, node, names)
            elif node.target in _MHA:
                self._attention(node, names)
        gm.graph.lint()
        gm.recompile()
        counters["sparse_compile"]["masked_linear_rewrites"] += rewritten
        return rewritten

    def _linear(self, gm: torch.fx.GraphModule, node: torch.fx.Node, names: _LayerNamer) -> int:
        x, weight, bias = _linear_args(node)
        weight_val = _value(weight)
        if weight_val is None or weight_val.dim() != 2:
            return 0  # not a layer we can describe (no example value)
        out_features, in_features = weight_val.shape
        name = names(node, weight, out_features, in_features)
        tile_masked = isinstance(weight, torch.fx.Node) and weight.target in _TILE_MASKED_WEIGHT
        tile_size = int(weight.args[2]) if tile_masked else None
        reason = self._why_dense(node, x, weight, bias, tile_size) if tile_masked else (
            "weight is not a Supermask tile mask (no sparse_compile::tile_masked_weight)"
        )
        self.graph_report.layers.append(
            LayerRecord(
                name=name,
                out_features=int(out_features),
                in_features=int(in_features),
                dtype=str(weight_val.dtype).removeprefix("torch."),
                format="dense" if reason else "masked",
                blocksize=tile_size,
                density=None,  # the mask changes every step
                reason=reason,
                device=weight_val.device.type,
            )
        )
        if reason:
            return 0
        masked_weight, tile_mask, _ = weight.args
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(
                torch.ops.sparse_compile.masked_linear.default, (x, masked_weight, tile_mask, bias, tile_size)
            )
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        if not weight.users:
            gm.graph.erase_node(weight)
        return 1

    def _why_dense(self, node, x, weight, bias, tile_size: int) -> str:
        """Empty when the masked op can take the layer, else the reason it stays dense."""
        values = [_value(n) for n in (x, weight, node)] + ([_value(bias)] if bias is not None else [])
        if any(v is None for v in values):
            return "no example values to check the layer against (left to Inductor)"
        dtypes = {v.dtype for v in values}
        if len(dtypes) > 1:
            return f"mixed dtypes {sorted(map(str, dtypes))} (autocast?): the masked op takes one dtype"
        dtype = dtypes.pop()
        if dtype not in SUPPORTED_DTYPES:
            return f"dtype {str(dtype).removeprefix('torch.')}: the masked op takes float32, float16, bfloat16"
        if tile_size < MIN_TILE_SIZE:
            return f"tile {tile_size} < {MIN_TILE_SIZE}: too many tiny tiles for skipping them to pay"
        if values[1].device.type == "cuda" and not triton_tile_size_ok(tile_size):
            return f"tile {tile_size} is not a power of two (the Triton kernel's tile)"
        return ""

    def _attention(self, node: torch.fx.Node, names: _LayerNamer) -> None:
        """``nn.MultiheadAttention`` is one call in Dynamo's graph: say that its projections stay dense."""
        args = _bind_mha(node)
        masked = [
            key for key in ("in_proj_weight", "out_proj_weight")
            if isinstance(args.get(key), torch.fx.Node) and args[key].target in _TILE_MASKED_WEIGHT
        ]  # fmt: skip
        for key in ("in_proj_weight", "out_proj_weight"):
            val = _value(args.get(key))
            if val is None or val.dim() != 2:
                continue
            tile_size = int(args[key].args[2]) if key in masked else None
            reason = "inside nn.MultiheadAttention (one F.multi_head_attention_forward call for Dynamo)"
            if key not in masked:
                reason = "weight is not a Supermask tile mask; " + reason
            self.graph_report.layers.append(
                LayerRecord(
                    name=names(node, args[key], *val.shape),
                    out_features=int(val.shape[0]),
                    in_features=int(val.shape[1]),
                    dtype=str(val.dtype).removeprefix("torch."),
                    format="dense",
                    blocksize=tile_size,
                    density=None,
                    reason=reason,
                    device=val.device.type,
                )
            )


def _linear_args(node: torch.fx.Node):
    args = list(node.args) + [None] * (3 - len(node.args))
    x = node.kwargs.get("input", args[0])
    weight = node.kwargs.get("weight", args[1])
    bias = node.kwargs.get("bias", args[2])
    return x, weight, bias


def _bind_mha(node: torch.fx.Node) -> dict:
    try:
        bound = inspect.signature(torch.nn.functional.multi_head_attention_forward).bind(*node.args, **node.kwargs)
    except TypeError:
        return {}
    return dict(bound.arguments)


def _value(node) -> torch.Tensor | None:
    if not isinstance(node, torch.fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None
