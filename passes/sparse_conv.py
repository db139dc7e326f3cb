"""Convolutions in the frozen inference graph: a 1x1 convolution is a matmul over channels.

:class:`~sparse_compile.passes.sparse_linear.SparseLinearPass` calls this module for every
``aten.convolution`` node. By the time the pass runs (Inductor's ``post_grad_custom_pre_pass``),
freezing has folded every weight expression into one constant, and its binary folding has folded
the BatchNorm after a convolution (eval mode: a per-channel multiply and add) into the
convolution's weight and bias (``torch/_inductor/fx_passes/freezing_patterns.py``,
``freezing_passes``: ``constant_fold`` and ``binary_folding_pass``, all inside ``freeze()``,
before ``compile_fx_inner`` runs the post-grad passes). So the weight the pass analyses is the
folded one, and the folded bias (a conv without bias gets one from its BatchNorm) is the one the
rewrite adds. A per-output-channel scale keeps zero blocks zero: a block-pruned conv stays
block-sparse after folding.

A convolution with weight ``[out, in, kh, kw]`` is analysed as its ``[out, in*kh*kw]`` view,
by the same formats, ``decide`` and measurement as a linear (the rows a timing uses are the
output pixels, ``N * H_out * W_out``). A 1x1 convolution with groups 1, no padding and no
transposition is exactly a linear over the channel dim, so it is rewritten as::

    x [N, C, H, W] -> x[:, :, ::sh, ::sw] (stride > 1) -> permute to [N, H, W, C]
      -> op(x_nhwc, *constants, bias, *static_args)   (the format's op; it takes [..., in])
      -> permute back to [N, out, H_out, W_out]

(1-D and 3-D convolutions likewise, over their spatial dims). A channels-last input needs no
copy for the permute; the output comes back channels-last. Every other convolution (kxk,
grouped, padded or transposed 1x1) stays as Inductor compiles it, with
:attr:`ReasonCode.CONV_NOT_MATMUL` and the words in the report.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Sequence

import torch
import torch.fx

from sparse_compile.formats.base import Reason, ReasonCode
from sparse_compile.kernels.common import block_view
from sparse_compile.options import CANDIDATE_BLOCKSIZES

aten = torch.ops.aten

#: oneDNN's convolution with a packed weight, as Inductor's freezing makes it on CPU (None
#: without oneDNN). The backend lets freezing pack the convolutions the pass could not run
#: sparse anyway (:func:`may_run_sparse`), so dense ones keep Inductor's oneDNN path.
def _mkldnn_op(name: str):
    packet = getattr(getattr(torch.ops, "mkldnn", None), name, None)
    return getattr(packet, "default", None)


PACKED_CONV = _mkldnn_op("_convolution_pointwise")
PACKED_CONV_TRANSPOSE = _mkldnn_op("_convolution_transpose_pointwise")

CONV1X1 = "conv1x1"
CONV_KXK = "conv kxk"


@dataclasses.dataclass(frozen=True)
class ConvMatch:
    """The arguments of one ``aten.convolution`` node."""

    x: torch.fx.Node
    weight: torch.fx.Node
    bias: torch.fx.Node | None
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    transposed: bool
    groups: int

    def why_not_matmul(self, weight_shape: Sequence[int]) -> Reason | None:
        """None when the convolution is a matmul over channels (the rewrite takes it), else why not."""
        return why_not_matmul(weight_shape, self.transposed, self.groups, self.padding)


def why_not_matmul(
    weight_shape: Sequence[int], transposed: bool, groups: int, padding: Sequence[int] | str
) -> Reason | None:
    """None when a convolution is a matmul over channels: 1x1, not transposed, groups 1, no
    padding (``"same"`` pads a 1x1 convolution by nothing); else why not."""
    spatial = tuple(int(d) for d in weight_shape[2:])
    if not spatial:
        return Reason(ReasonCode.CONV_NOT_MATMUL, "convolution without spatial dims")
    if any(d != 1 for d in spatial):
        size = "x".join(map(str, spatial))
        return Reason(
            ReasonCode.CONV_NOT_MATMUL,
            f"{size} convolution: only 1x1 convolutions run sparse (a kxk one runs dense as Inductor compiles it)",
        )
    if transposed:
        return Reason(ReasonCode.CONV_NOT_MATMUL, "transposed convolution: only plain 1x1 convolutions run sparse")
    if groups != 1:
        return Reason(ReasonCode.CONV_NOT_MATMUL, f"grouped convolution (groups={groups}): only groups=1 runs sparse")
    padded = padding not in ("valid", "same") if isinstance(padding, str) else any(int(p) != 0 for p in padding)
    if padded:
        return Reason(ReasonCode.CONV_NOT_MATMUL, f"padded 1x1 convolution (padding={padding!r})")
    return None


def match_conv(node: torch.fx.Node) -> ConvMatch | None:
    """The node's arguments if it is an ``aten.convolution`` with node operands, else None."""
    if node.op != "call_function" or node.target is not aten.convolution.default:
        return None
    x, weight, bias, stride, padding, dilation, transposed, _output_padding, groups = node.args[:9]
    if not isinstance(x, torch.fx.Node) or not isinstance(weight, torch.fx.Node):
        return None
    return ConvMatch(
        x, weight, bias if isinstance(bias, torch.fx.Node) else None,
        tuple(int(s) for s in stride), tuple(int(p) for p in padding), tuple(int(d) for d in dilation),
        bool(transposed), int(groups),
    )  # fmt: skip


def may_run_sparse(node: torch.fx.Node) -> bool:
    """Whether the pass could run this ``aten.convolution`` sparse: a matmul over channels whose
    constant weight has an all-zero block at the smallest candidate block size.

    Called while Inductor's freezing patterns run (before the pass): every other convolution is
    left to freezing's oneDNN weight packing, as ``backend="inductor"`` with freezing would
    pack it, so a CNN with dense convolutions runs as fast as Inductor alone makes it.
    """
    match = match_conv(node)
    if match is None or match.weight.op != "get_attr":
        return False
    weight = node.graph.owning_module
    for part in str(match.weight.target).split("."):
        weight = getattr(weight, part, None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 3:
        return False
    if why_not_matmul(weight.shape, match.transposed, match.groups, match.padding) is not None:
        return False
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.no_grad():  # freezing's patterns run under a fake mode
        blocks = block_view(weight_matrix(weight.detach()), min(CANDIDATE_BLOCKSIZES))
        return bool((blocks.abs().amax(dim=(1, 3)) == 0).any())


def packed_conv_reason(weight_shape: Sequence[int], groups: int, padding: Sequence[int], transposed: bool) -> Reason:
    """Why a convolution that reached the pass packed for oneDNN runs dense."""
    why = why_not_matmul(weight_shape, transposed, groups, padding)
    if why is not None:
        return why
    size = min(CANDIDATE_BLOCKSIZES)
    return Reason(
        ReasonCode.NO_BLOCK_TO_SKIP,
        f"no all-zero {size}x{size} block in its [out, in] weight: left to Inductor's oneDNN convolution (packed at freezing)",
    )


def conv_kind(weight_shape: Sequence[int]) -> str:
    """``"conv1x1"`` when every kernel dim is 1, else ``"conv kxk"`` (the report's kind column)."""
    return CONV1X1 if all(int(d) == 1 for d in weight_shape[2:]) else CONV_KXK


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A conv weight ``[out, in, *kernel]`` as the matrix ``[out, in * prod(kernel)]`` it multiplies by."""
    return weight.reshape(weight.shape[0], -1)


def output_rows(node: torch.fx.Node) -> int | None:
    """Rows of the convolution as a matmul: output pixels over the batch (``N * H_out * W_out``)."""
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.shape[1] == 0:
        return None
    return math.prod(out.shape) // out.shape[1]


def replace_conv1x1(
    graph: torch.fx.Graph, node: torch.fx.Node, match: ConvMatch, op, tensors, bias, static_args
) -> torch.fx.Node:
    """Replaces the 1x1 ``node`` by ``op`` over its channels (module docstring); returns the op's
    call. ``tensors`` are the converted weight's constant nodes, made by the caller before ``node``."""
    x_val = match.x.meta["val"]
    spatial = x_val.dim() - 2
    with graph.inserting_before(node):
        current = match.x
        for dim, step in enumerate(match.stride, start=2):
            if step != 1:
                current = _call(graph, aten.slice.Tensor, current, dim, 0, sys.maxsize, step)
        channels_last = [0, *range(2, 2 + spatial), 1]
        current = _call(graph, aten.permute.default, current, channels_last)
        call = _call(graph, op, current, *tensors, bias, *static_args)
        current = _call(graph, aten.permute.default, call, [0, 1 + spatial, *range(1, 1 + spatial)])
    for key, value in node.meta.items():
        if key != "val":
            current.meta.setdefault(key, value)
    node.replace_all_uses_with(current)
    graph.erase_node(node)
    return call


def _call(graph: torch.fx.Graph, target, *args) -> torch.fx.Node:
    """A new node with its fake value (computed on the fake values of its arguments)."""
    new = graph.call_function(target, args)
    fake_args = torch.fx.node.map_arg(args, lambda n: n.meta["val"])
    new.meta["val"] = target(*fake_args)
    return new
