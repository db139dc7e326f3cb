"""Activations fused into the CPU tile kernel's output: ``tile_linear`` followed by GELU or ReLU.

A transformer's MLP is ``fc2(gelu(fc1(x)))``; a CNN's convolutions are followed by ReLU. After the
sparse pass, the activation is a second kernel that reads and writes the whole output of the
sparse op again. On CPU that pass is not small: in timm's DeiT-tiny (bf16, 2 x 197 tokens, 90%
sparse), Inductor's GELU kernels took as long as all 49 sparse linears together. The tile
kernel can apply the activation to its fp32 sums before it rounds and stores them
(``tile_linear``'s ``activation`` argument), so this module moves it there:

    tile_linear(x, ...) -> [views] -> GELU or ReLU      becomes      tile_linear(x, ..., activation) -> [views]

What is matched, in the post-grad graph the sparse pass rewrites (Inductor has decomposed the
activations by then):

- GELU, exact (``approximate="none"``): ``0.5 * y * (1 + erf(y * 0.7071067811865476))`` over
  ``y`` (in fp32: a bf16 output is converted up first and the result converted back), or an
  undecomposed ``aten.gelu`` with ``approximate="none"``;
- ReLU: ``aten.relu``;

where ``y`` is the op's output through reshapes and permutes (elementwise functions commute with
them), and every node between the op and the activation's result has no other user (another
user would need the value before the activation). Anything else (the tanh approximation, a
result read twice) stays as it is, for Inductor.

Numerics: the activation sees the fp32 sum before it is rounded to the output dtype (eager
rounds first, then applies it): in bf16 the two differ by at most about one bf16 ulp of the
result. GELU's erf is ATen's vectorized one (Abramowitz & Stegun 7.1.26, absolute error <= 1.5e-7)
for an fp32 output; for a bf16 one, a cheaper rational erf good to bf16 (``kernels/cpu_tile_mm.cpp``:
``erf_rational``; within two bf16 ulps of the exact GELU where it is at least 1e-4 in magnitude).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx

aten = torch.ops.aten
prims = torch.ops.prims

#: Ops that change only how the same elements are viewed: an elementwise activation after them
#: is the same activation before them.
_VIEWS = frozenset(
    {aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.permute.default, aten.squeeze.dim,
     aten.unsqueeze.default}
)


def _tile_linear():
    return torch.ops.sparse_compile.tile_linear.default


def fuse_activation(node: torch.fx.Node) -> Optional[str]:
    """Fuses the activation that follows the ``tile_linear`` call ``node`` into it, if one does
    (see the module's docstring); returns its name ("gelu", "relu"), or None with the graph unchanged."""
    if node.target is not _tile_linear() or _activation_argument(node) != "none":
        return None
    last_view = node
    while len(last_view.users) == 1 and next(iter(last_view.users)).target in _VIEWS:
        last_view = next(iter(last_view.users))
    activation = _match(last_view)
    if activation is None:
        return None
    name, result = activation
    node.args = (*node.args[:9], name)
    result.replace_all_uses_with(last_view)
    return name


def _activation_argument(node: torch.fx.Node) -> str:
    if len(node.args) > 9:
        return node.args[9]
    return node.kwargs.get("activation", "none")


def _match(y: torch.fx.Node) -> Optional[tuple[str, torch.fx.Node]]:
    """``(name, the node holding the activation's result)`` for the activation applied to ``y``
    and nothing else, or None."""
    if len(y.users) == 2:  # fp32: both multiplications of the decomposed GELU read y itself
        return _match_decomposed_gelu(y, y)
    if len(y.users) != 1:
        return None
    user = next(iter(y.users))
    if user.target is aten.relu.default:
        return "relu", user
    if user.target is aten.gelu.default and user.kwargs.get("approximate", "none") == "none" and len(user.args) == 1:
        return "gelu", user
    if user.target is prims.convert_element_type.default and user.args[1] == torch.float32:
        return _match_decomposed_gelu(y, user)  # bf16 / fp16: computed in fp32, converted back
    return None


def _match_decomposed_gelu(y: torch.fx.Node, value: torch.fx.Node) -> Optional[tuple[str, torch.fx.Node]]:
    """``0.5 * value * (1 + erf(value * sqrt(0.5)))`` with ``value`` = ``y`` or ``y`` in fp32 (then
    converted back to ``y``'s dtype)."""
    dtype = _dtype(y)
    if len(value.users) != 2:
        return None
    half = scaled = None
    for user in value.users:
        factor = _scalar_factor(user, value)
        if factor is not None and math.isclose(factor, 0.5, rel_tol=0, abs_tol=1e-12):
            half = user
        elif factor is not None and math.isclose(factor, math.sqrt(0.5), rel_tol=0, abs_tol=1e-12):
            scaled = user
    if half is None or scaled is None or len(half.users) != 1 or len(scaled.users) != 1:
        return None
    erf = next(iter(scaled.users))
    if erf.target is not aten.erf.default or len(erf.users) != 1:
        return None
    one_plus = next(iter(erf.users))
    if one_plus.target is not aten.add.Tensor or _other_operand(one_plus, erf) != 1 or len(one_plus.users) != 1:
        return None
    product = next(iter(one_plus.users))
    if product.target is not aten.mul.Tensor or _other_operand(product, one_plus) is not half:
        return None
    result = product
    if dtype != _dtype(product):
        if len(product.users) != 1:
            return None
        result = next(iter(product.users))
        if result.target is not prims.convert_element_type.default or result.args[1] != dtype:
            return None
    return "gelu", result


def _scalar_factor(node: torch.fx.Node, value: torch.fx.Node) -> Optional[float]:
    """``c`` if ``node`` is ``value * c`` (or ``c * value``) for a Python number ``c``."""
    if node.target is not aten.mul.Tensor or len(node.args) != 2:
        return None
    other = _other_operand(node, value)
    return float(other) if isinstance(other, (int, float)) and not isinstance(other, bool) else None


def _other_operand(node: torch.fx.Node, operand) -> object:
    """The other argument of a two-argument ``node`` one of whose arguments is ``operand``."""
    if len(node.args) != 2:
        return None
    first, second = node.args
    if first is operand:
        return second
    if second is operand:
        return first
    return None


def _dtype(node: torch.fx.Node) -> Optional[torch.dtype]:
    value = node.meta.get("val")
    return value.dtype if isinstance(value, torch.Tensor) else None
