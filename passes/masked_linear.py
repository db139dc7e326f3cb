"""Training-graph rewrite: linears whose weight is a Supermask tile mask -> ``sparse_compile::masked_linear``.

Runs on the graph Dynamo captured (torch-level IR), before AOTAutograd, when grad is enabled.
Why there and not as an Inductor post-grad pass like ``passes/sparse_linear.py``: the masked
layer changes three matmuls of the joint graph (forward, input gradient, weight gradient) and the STE gradient to the
scores, and after AOTAutograd they are scattered over the forward and the backward graph as
``mm``s of ``W * expand(mask)``, transposes and reductions whose exact shape depends on the
partitioner. Before AOTAutograd the layer is two calls:

    weight = torch.ops.sparse_compile.tile_masked_weight(W, tile_mask, tile_size)   # Supermask.forward
    y = torch._C._nn.linear(x, weight, bias)                                          # nn.Linear / F.linear

and replacing the second by ``masked_linear(x, W, tile_mask, bias, tile_size)`` is enough: the
op's registered autograd gives AOTAutograd the backward (masked input gradient, dense weight
gradient, eager Supermask's gradients to ``W`` and the mask), and the scores' STE upstream of
``tile_mask`` is untouched. Match -> check -> replace, one record per linear in the report.

Autocast: a linear captured under autocast computes in the autocast dtype (its traced output
says which) from fp32 master weights. The replacement, :func:`masked_linear_like_f_linear`,
casts the activations as autocast's ``F.linear`` would and hands the fp32 weight and bias to the
op, which rounds only the kept tiles.

Layers left as they are (with the reason in the report): weights not built by
``tile_masked_weight`` (dense layers, other parametrizations), matmuls in dtypes other than
float32/float16/bfloat16, weights neither in the matmul's dtype nor fp32 master weights of a
half matmul, tiles smaller than 16 (too many tiny matmuls to pay), on CUDA tiles that are not a
power of two (the Triton kernel's tile).

``nn.MultiheadAttention`` is one ``F.multi_head_attention_forward`` call in Dynamo's graph (the
function is on Dynamo's list of functions kept whole), so its projections are not ``linear``
nodes. For the common case — self-attention (one tensor as query, key and value), packed
``in_proj``, no attention or padding mask, no ``bias_k``/``bias_v``/``add_zero_attn``,
``need_weights=False``: what torchvision's ViT and ``nn.TransformerEncoderLayer`` run — the
pass replaces that call by :func:`masked_self_attention`, the same steps as
``F.multi_head_attention_forward`` (``in_proj``, heads, ``scaled_dot_product_attention``,
``out_proj``) with each tile-masked projection through the masked op. Other attention calls
stay whole and dense, with the reason.
"""

from __future__ import annotations

import inspect

import torch
import torch.fx
from torch._dynamo.utils import counters

import sparse_compile.kernels  # noqa: F401  (registers torch.ops.sparse_compile.*)
from sparse_compile.attention import multi_head_attention
from sparse_compile.formats.base import Reason, ReasonCode
from sparse_compile.kernels.masked_linear import SUPPORTED_DTYPES, cpu_kernel_name, triton_tile_size_ok
from sparse_compile.passes import sparse_conv
from sparse_compile.passes.sparse_linear import _LayerNamer
from sparse_compile.report import DENSE_KERNEL, GraphReport, LayerRecord

_LINEARS = (torch._C._nn.linear, torch.nn.functional.linear)
_TILE_MASKED_WEIGHT = (torch.ops.sparse_compile.tile_masked_weight, torch.ops.sparse_compile.tile_masked_weight.default)
_MHA = (torch.nn.functional.multi_head_attention_forward,)
_CONVS = (torch.conv1d, torch.conv2d, torch.conv3d)
_HALF = (torch.float16, torch.bfloat16)

_NOT_TILE_MASKED = Reason(
    ReasonCode.NOT_TILE_MASKED, "weight is not a Supermask tile mask (no sparse_compile::tile_masked_weight)"
)

#: Smallest tile the rewrite takes: below it the per-tile work is too small to beat a dense matmul.
MIN_TILE_SIZE = 16


class MaskedLinearPass:
    """Rewrites Supermask linears of a Dynamo training graph to ``masked_linear``; records every linear."""

    def __init__(self, graph_report: GraphReport):
        self.graph_report = graph_report

    def __call__(self, gm: torch.fx.GraphModule) -> int:
        """Rewrites ``gm`` in place; returns how many linears and 1x1 convolutions now run masked."""
        # Weights are graph inputs here (no freezing): layers are named after their modules.
        names = _LayerNamer(gm, {})
        rewritten = convs = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target in _LINEARS:
                rewritten += self._linear(gm, node, names)
            elif node.target in _CONVS:
                convs += self._convolution(gm, node, names)
            elif node.target in _MHA:
                rewritten += self._attention(gm, node, names)
        gm.graph.lint()
        gm.recompile()
        counters["sparse_compile"]["masked_linear_rewrites"] += rewritten
        counters["sparse_compile"]["masked_conv1x1_rewrites"] += convs
        return rewritten + convs

    def _linear(self, gm: torch.fx.GraphModule, node: torch.fx.Node, names: _LayerNamer) -> int:
        x, weight, bias = _linear_args(node)
        weight_val = _value(weight)
        if weight_val is None or weight_val.dim() != 2:
            return 0  # not a layer we can describe (no example value)
        name = names(node, weight, *weight_val.shape)
        tile_masked = isinstance(weight, torch.fx.Node) and weight.target in _TILE_MASKED_WEIGHT
        tile_size = int(weight.args[2]) if tile_masked else None
        reason = self._why_dense(x, weight, bias, _value(node), tile_size) if tile_masked else _NOT_TILE_MASKED
        self._record(name, weight_val, tile_size, reason, _value(node))
        if reason:
            return 0
        masked_weight, tile_mask, _ = weight.args
        _replace_masked(gm, node, weight, masked_linear_like_f_linear, (x, masked_weight, tile_mask, bias, tile_size))
        return 1

    def _convolution(self, gm: torch.fx.GraphModule, node: torch.fx.Node, names: _LayerNamer) -> int:
        """A ``torch.conv1d/2d/3d`` call: a Supermask 1x1 convolution (groups 1, no padding) runs
        as the matmul over channels it is, through the masked op (:func:`masked_conv1x1`); every
        other convolution is recorded dense with the reason."""
        x, weight, bias, stride, padding, _dilation, groups = _conv_args(node)
        weight_val = _value(weight)
        if weight_val is None or weight_val.dim() < 3:
            return 0
        matrix = weight_val.flatten(1)
        kind = sparse_conv.conv_kind(weight_val.shape)
        name = names(node, weight, *matrix.shape)
        tile_masked = isinstance(weight, torch.fx.Node) and weight.target in _TILE_MASKED_WEIGHT
        tile_size = int(weight.args[2]) if tile_masked else None
        x_val = _value(x)
        if not tile_masked:
            reason = _NOT_TILE_MASKED
        elif (why := sparse_conv.why_not_matmul(weight_val.shape, False, groups, _padding(padding, weight_val))):
            reason = why
        elif x_val is None or x_val.dim() != weight_val.dim() or not isinstance(stride, (tuple, list, int)):
            reason = Reason(ReasonCode.OTHER, "unbatched input or a stride that is not a constant")
        else:
            reason = self._why_dense(x, weight, bias, _value(node), tile_size)
        self._record(name, matrix, tile_size, reason, _value(node), kind=kind)
        if reason:
            return 0
        spatial = weight_val.dim() - 2
        strides = (int(stride),) * spatial if isinstance(stride, int) else tuple(int(s) for s in stride)
        masked_weight, tile_mask, _ = weight.args
        _replace_masked(gm, node, weight, masked_conv1x1, (x, masked_weight, tile_mask, bias, tile_size, strides))
        return 1

    def _record(
        self,
        name: str,
        weight: torch.Tensor,
        tile_size: int | None,
        reason: Reason | None,
        result: torch.Tensor | None = None,
        kind: str = "linear",
    ) -> None:
        """One linear in the report: masked when ``reason`` is None, else dense with it. ``result``
        (the traced output) tells the matmul's dtype when autocast makes it differ from the weight's."""
        dtype = _name(weight.dtype)
        if result is not None and result.dtype != weight.dtype and weight.dtype == torch.float32:
            dtype = f"{_name(result.dtype)} (autocast, float32 weights)"
        self.graph_report.layers.append(
            LayerRecord(
                name=name,
                out_features=int(weight.shape[0]),
                in_features=int(weight.shape[1]),
                dtype=dtype,
                format="dense" if reason else "masked",
                blocksize=tile_size,
                density=None,  # the mask changes every step
                reason=reason.text if reason else "",
                reason_code=reason.code if reason else None,
                device=weight.device.type,
                kernel=DENSE_KERNEL if reason else _masked_kernel(weight.device.type),
                kind=kind,
            )
        )

    def _why_dense(self, x, weight, bias, result: torch.Tensor | None, tile_size: int) -> Reason | None:
        """None when the masked op can take the layer, else the reason it stays dense.

        ``result`` is the layer's output as traced: its dtype is the one the matmul runs in (the
        autocast dtype under autocast, where ``x`` may come in fp32 and the weights are fp32).
        """
        values = [_value(n) for n in (x, weight)] + ([_value(bias)] if bias is not None else [])
        if result is None or any(v is None for v in values):
            return Reason(ReasonCode.OTHER, "no example values to check the layer against (left to Inductor)")
        dtype = result.dtype
        if dtype not in SUPPORTED_DTYPES:
            return Reason(ReasonCode.UNSUPPORTED_DTYPE, f"dtype {_name(dtype)}: the masked op takes float32, float16, bfloat16")
        for what, value in zip(("weight", "bias"), values[1:]):
            if value.dtype != dtype and not (value.dtype == torch.float32 and dtype in _HALF):
                return Reason(
                    ReasonCode.UNSUPPORTED_DTYPE,
                    f"{what} {_name(value.dtype)} in a {_name(dtype)} matmul: the masked op takes weights in the "
                    "matmul's dtype, or float32 master weights of a float16/bfloat16 matmul (autocast)",
                )
        if not values[0].is_floating_point():
            return Reason(ReasonCode.UNSUPPORTED_DTYPE, f"input dtype {_name(values[0].dtype)} is not a float")
        if tile_size < MIN_TILE_SIZE:
            return Reason(ReasonCode.OTHER, f"tile {tile_size} < {MIN_TILE_SIZE}: too many tiny tiles for skipping them to pay")
        if values[1].device.type == "cuda" and not triton_tile_size_ok(tile_size):
            return Reason(ReasonCode.NO_KERNEL_FOR_DEVICE, f"tile {tile_size} is not a power of two (the Triton kernel's tile)")
        return None

    def _attention(self, gm: torch.fx.GraphModule, node: torch.fx.Node, names: _LayerNamer) -> int:
        """An ``F.multi_head_attention_forward`` call: rewritten to :func:`masked_self_attention`
        when a projection is tile-masked and the call is one that function reproduces; each
        projection recorded. Returns how many projections now run masked."""
        args = _bind_mha(node)
        projections = {}
        for key, suffix in (("in_proj_weight", "in_proj"), ("out_proj_weight", "out_proj")):
            weight = args.get(key)
            val = _value(weight)
            if val is None or val.dim() != 2:
                continue
            tile_masked = weight.target in _TILE_MASKED_WEIGHT
            projections[suffix] = (weight, val, int(weight.args[2]) if tile_masked else None)
        masked = {suffix for suffix, (_, _, tile) in projections.items() if tile is not None}
        why_whole = _why_attention_stays_whole(args, node) if masked else ""
        reasons = {}
        for suffix, (weight, val, tile) in projections.items():
            if tile is None:
                reasons[suffix] = _NOT_TILE_MASKED
            elif why_whole:
                reasons[suffix] = Reason(ReasonCode.OTHER, f"inside nn.MultiheadAttention, left whole: {why_whole}")
            else:
                # Both projections run in the attention output's dtype (autocast's, under autocast).
                query, bias = args["query"], args.get(f"{suffix}_bias")
                reasons[suffix] = self._why_dense(query, weight, bias, _attention_output(node), tile)
        rewrite = {suffix for suffix in masked if not reasons[suffix]}
        for suffix, (weight, val, tile) in projections.items():
            # Named by role (``<attention>.in_proj`` / ``.out_proj``): the namer's guess from the
            # shapes names an out_proj without an in_proj before it (kdim/vdim) after the module.
            name = names.for_fused_weight(node, weight, suffix)
            self._record(name, val, tile, reasons[suffix], _attention_output(node))
        if not rewrite:
            return 0

        def projection(suffix):
            weight = args[f"{suffix}_weight"]
            if suffix in rewrite:
                return weight.args[0], weight.args[1], weight.args[2]
            return weight, None, None

        in_weight, in_mask, in_tile = projection("in_proj")
        out_weight, out_mask, out_tile = projection("out_proj")
        dropout_p = args.get("dropout_p", 0.0) if args.get("training", True) else 0.0
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(
                masked_self_attention,
                (args["query"], int(args["num_heads"]), in_weight, in_mask, in_tile, args.get("in_proj_bias"),
                 out_weight, out_mask, out_tile, args.get("out_proj_bias"), dropout_p),
            )  # fmt: skip
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        for weight in (args["in_proj_weight"], args["out_proj_weight"]):
            if isinstance(weight, torch.fx.Node) and not weight.users:
                gm.graph.erase_node(weight)
        return len(rewrite)


def _replace_masked(gm: torch.fx.GraphModule, node: torch.fx.Node, weight: torch.fx.Node, fn, args: tuple) -> None:
    """``node`` (a linear or convolution on a tile-masked weight) replaced by ``fn(*args)``; the
    masked-weight node goes too once nothing else reads it."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(fn, args)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    if not weight.users:
        gm.graph.erase_node(weight)


def _masked_kernel(device_type: str) -> str:
    """What runs a masked layer on ``device_type``, in the report's words."""
    return "triton masked" if device_type == "cuda" else cpu_kernel_name()


def _why_attention_stays_whole(args: dict, node: torch.fx.Node) -> str:
    """Empty when :func:`masked_self_attention` computes exactly this attention call, else why not."""
    if not args:
        return "its arguments could not be read"
    query = args.get("query")
    if not (query is args.get("key") is args.get("value")):
        return "not self-attention (query, key and value differ)"
    val = _value(query)
    if val is None or val.dim() != 3:
        return "input is not a batched [L, N, E] tensor"
    checks = (
        ("use_separate_proj_weight", False, "separate q/k/v projection weights"),
        ("need_weights", False, "need_weights=True (attention weights requested)"),
        ("add_zero_attn", False, "add_zero_attn=True"),
        ("is_causal", False, "is_causal=True"),
    )
    for key, expected, why in checks:
        if bool(args.get(key, expected)) != expected:
            return why
    for key in ("attn_mask", "key_padding_mask", "bias_k", "bias_v", "static_k", "static_v"):
        if args.get(key) is not None:
            return f"{key} is given"
    if not isinstance(args.get("dropout_p", 0.0), (int, float)) or not isinstance(args.get("training", True), bool):
        return "dropout is not a constant of the graph"
    return ""


def masked_self_attention(
    x: torch.Tensor,
    num_heads: int,
    in_weight: torch.Tensor,
    in_mask: torch.Tensor | None,
    in_tile: int | None,
    in_bias: torch.Tensor | None,
    out_weight: torch.Tensor,
    out_mask: torch.Tensor | None,
    out_tile: int | None,
    out_bias: torch.Tensor | None,
    dropout_p: float,
) -> tuple[torch.Tensor, None]:
    """``F.multi_head_attention_forward`` for self-attention without masks and ``need_weights=False``
    on ``x [L, N, E]``, with each projection whose mask is given through ``masked_linear``: the
    attention's steps are :func:`sparse_compile.attention.multi_head_attention`'s. Returns
    ``(output, None)`` like it (no attention weights).
    """

    def project(inputs, weight, mask, tile, bias):
        if mask is None:
            return torch.nn.functional.linear(inputs, weight, bias)
        return masked_linear_like_f_linear(inputs, weight, mask, bias, tile)

    def in_projection(inputs, rows):
        # Self-attention projects q, k and v at once: rows is the whole packed weight.
        assert (rows.start, rows.stop) == (0, in_weight.shape[0]), rows
        return project(inputs, in_weight, in_mask, in_tile, in_bias)

    def out_projection(inputs):
        return project(inputs, out_weight, out_mask, out_tile, out_bias)

    return multi_head_attention(x, x, x, num_heads, in_projection, out_projection, batch_first=False, dropout_p=dropout_p)


def masked_linear_like_f_linear(
    x: torch.Tensor, weight: torch.Tensor, tile_mask: torch.Tensor, bias: torch.Tensor | None, tile_size: int
) -> torch.Tensor:
    """``F.linear(x, tile_masked_weight(weight, tile_mask, tile_size), bias)`` through the masked op,
    autocast included.

    This is what the pass puts in the graph; it runs while AOTAutograd traces it, in the autocast
    state of the region the linear was captured in. Where autocast is on, ``F.linear`` would cast
    its inputs to the autocast dtype; here only ``x`` is cast, and fp32 weights and bias reach the
    op as they are (autocast's master weights): the op rounds just the kept tiles to ``x``'s dtype
    and returns what eager autocast's linear returns. The op itself has no autocast rule (custom
    ops pass through autocast untouched), so this cast is the only one.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point() and x.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device)
        x = x.to(dtype)
        # Weights in another half dtype than autocast's (the pass declines those; a direct call may not).
        if weight.dtype not in (dtype, torch.float32):
            weight = weight.to(dtype)
        if bias is not None and bias.dtype not in (dtype, torch.float32):
            bias = bias.to(dtype)
    return torch.ops.sparse_compile.masked_linear(x, weight, tile_mask, bias, tile_size)


def masked_conv1x1(
    x: torch.Tensor,
    weight: torch.Tensor,
    tile_mask: torch.Tensor,
    bias: torch.Tensor | None,
    tile_size: int,
    stride: tuple[int, ...],
) -> torch.Tensor:
    """``conv(x, tile_masked_weight(weight, tile_mask, tile_size), bias, stride)`` for a 1x1
    convolution (groups 1, no padding), as the masked matmul over channels it is.

    ``x [N, C, *spatial]`` is subsampled by the stride, its channels moved last, multiplied by the
    ``[out, in]`` view of the weight through :func:`masked_linear_like_f_linear` (autocast
    included) and moved back: ``[N, out, *spatial_out]``, channels-last in memory. The weight's
    and the mask's trailing 1x1 dims are views, so their gradients come back in their shapes.
    """
    if any(step != 1 for step in stride):
        x = x[(slice(None), slice(None), *(slice(None, None, step) for step in stride))]
    out = masked_linear_like_f_linear(x.movedim(1, -1), weight.flatten(1), tile_mask.flatten(1), bias, tile_size)
    return out.movedim(-1, 1)


def _conv_args(node: torch.fx.Node):
    """``(x, weight, bias, stride, padding, dilation, groups)`` of a ``torch.convNd`` call, defaults filled in."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = (None, None, None, 1, 0, 1, 1)
    args = list(node.args) + list(defaults[len(node.args):])
    return tuple(node.kwargs.get(key, value) for key, value in zip(names, args))


def _padding(padding, weight: torch.Tensor):
    """A ``torch.convNd`` padding argument as a tuple per spatial dim (or its string)."""
    if isinstance(padding, int):
        return (padding,) * (weight.dim() - 2)
    return padding


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _attention_output(node: torch.fx.Node) -> torch.Tensor | None:
    """The attention output of an ``F.multi_head_attention_forward`` node, as traced."""
    value = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


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
