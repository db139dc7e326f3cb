"""Supermask: a learned, tile-wise weight mask as a ``torch.nn.utils.parametrize`` parametrization.

Usage::

    import torch.nn.utils.parametrize as P
    P.register_parametrization(lin, "weight", Supermask(lin.weight.shape, sparsity=0.9, tile_size=32))

``lin.weight`` is then ``W * mask(scores)`` where ``W`` is stored as
``lin.parametrizations.weight.original`` and ``scores`` as ``lin.parametrizations.weight[0].scores``.

Definition (ALGORITHMS.md, following pytorch-labs/superblock ``SupermaskLinear``):

- ``scores`` has one entry per tile: shape ``ceil(d / tile_size)`` for *every* dim ``d`` of the
  weight (Conv ``[out, in, kh, kw]`` included: a 3x3 kernel with tile 8 has one score along
  each kernel dim). Initialised kaiming-uniform with ``a = sqrt(5)``.
- Threshold: the k-th smallest score, with SuperBlock's arithmetic to the last float rounding
  (:func:`threshold_rank`): ``k = 1 + round(0.01 * float(100 * sparsity) * (num_tiles - 1))``
  (Python's ``round``). The detour through percent is not a no-op: ``0.01 * 70.0 * 15`` is
  ``10.500000000000002``, so at sparsity 0.7 and 16 tiles SuperBlock keeps 5 tiles where
  ``round(0.7 * 15)`` would keep 6. ``mask = score >= threshold``, so exactly
  ``num_tiles - (k - 1)`` tiles are kept when scores are distinct.
- ``sparsity`` may change after construction (sparsity schedules; SuperBlock's ``set_sparsity``):
  assign ``mask.sparsity = s`` or call :meth:`Supermask.set_sparsity`; the next forward uses it. The tile mask is expanded to
  the weight's shape (each tile repeated ``tile_size`` times along each dim, then cut to size).
- Backward: straight-through; ``dL/dscores`` is the gradient w.r.t. the expanded mask summed
  over each tile. ``W`` gets its ordinary gradient through ``W * mask``.
- The threshold is a 0-dim tensor from ``kthvalue`` on the scores' device: no host sync.
- Sparsity above the highest reachable one, ``1 - 1/num_tiles``, is capped with a warning.
- ``fixed_mask=True`` creates ``scores`` with ``requires_grad=False``.
  ``fixed_weight=True``: the parametrization receives ``original`` and detaches it, so no
  gradient reaches ``W``; in addition ``original.requires_grad`` is set to ``False`` when the
  parametrization is registered, so optimizers and DDP see a frozen parameter.

The reference's ``scale``/``shift`` (effective weight ``(W * scale + shift) * mask``, both
one-element, frozen, 1 and 0 unless the reference quantizes weights) are not kept as state:
:func:`sparse_compile.training.load_superblock_checkpoint` folds them into ``original``.

This module also installs a global module-registration hook (:func:`_registration_hook`)
that tells our parametrizations which module and tensor they were registered on; see
``nm_mask.py`` for why Bi-Mask needs it.
"""

from __future__ import annotations

import math
import warnings
import weakref

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

# expand_tiles lives beside tile_masked_weight (the kernels do not import training); the
# parametrizations and the masked op must expand a tile mask the same way.
from sparse_compile.kernels.masked_linear import expand_tiles, tile_masked_weight

__all__ = ["Supermask", "StackedSupermask"]


# --------------------------------------------------------------------------------------------
# Registration hook shared by Supermask and NMMask.
#
# ``register_parametrization(module, name, p)`` never tells ``p`` which module it belongs to.
# It does, however, assign ``module.parametrizations = ModuleDict()`` (first parametrization of
# that module) and then ``module.parametrizations[name] = ParametrizationList([p], ...)``; both
# assignments run the global module-registration hooks. The first tells us the owner of the
# ModuleDict, the second which tensor and which parametrization.
# --------------------------------------------------------------------------------------------

_DICT_OWNER: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def _registration_hook(parent: nn.Module, name: str, child: nn.Module | None):
    if child is None:
        return None
    if name == "parametrizations" and isinstance(child, nn.ModuleDict):
        _DICT_OWNER[child] = weakref.ref(parent)
    elif isinstance(child, parametrize.ParametrizationList) and isinstance(parent, nn.ModuleDict):
        ref = _DICT_OWNER.get(parent)
        owner = ref() if ref is not None else None
        if owner is not None:
            for p in child:
                cb = getattr(p, "_on_registered", None)
                if cb is not None:
                    cb(owner, name, child)
    return None


if not getattr(torch.nn.modules.module, "_sparse_compile_registration_hook", False):
    torch.nn.modules.module.register_module_module_registration_hook(_registration_hook)
    torch.nn.modules.module._sparse_compile_registration_hook = True


# --------------------------------------------------------------------------------------------
# Supermask
# --------------------------------------------------------------------------------------------


def threshold_rank(sparsity: float, num_tiles: int) -> int:
    """Rank ``k`` of the threshold score (the k-th smallest is kept), as SuperBlock computes it.

    SuperBlock's ``percentile(scores, sparsity * 100)`` does
    ``1 + round(.01 * float(q) * (numel - 1))``; the same float operations in the same order
    give the same ``k`` at every sparsity (``1 + round(sparsity * (n - 1))`` differs at e.g. 0.7).
    """
    return 1 + round(0.01 * float(100 * sparsity) * (num_tiles - 1))


class _STEThreshold(torch.autograd.Function):
    """``scores >= kth-smallest(scores)`` as a 0/1 tensor; straight-through backward."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int) -> torch.Tensor:
        threshold = scores.detach().reshape(-1).kthvalue(k).values
        return (scores >= threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None




class Supermask(nn.Module):
    """Tile-wise learned mask: ``forward(W) = W * expand(scores >= kth-smallest(scores))``.

    Args:
        weight_shape: shape of the weight it will parametrize (Linear ``[out, in]``,
            Conv2d ``[out, in, kh, kw]``).
        sparsity: fraction of tiles to prune, in ``[0, 1)``; capped at ``1 - 1/num_tiles``.
        tile_size: side of the square (hyper-cubic) tile, ``>= 1``.
        fixed_mask: freeze the scores (``requires_grad=False``).
        fixed_weight: freeze the weight (no gradient reaches ``original``).
    """

    def __init__(
        self,
        weight_shape,
        sparsity: float,
        tile_size: int,
        fixed_mask: bool = False,
        fixed_weight: bool = False,
    ):
        super().__init__()
        weight_shape = tuple(int(d) for d in weight_shape)
        if len(weight_shape) < 2:
            raise ValueError(f"Supermask needs a weight with at least 2 dims, got shape {weight_shape}")
        if not isinstance(tile_size, int) or isinstance(tile_size, bool) or tile_size < 1:
            raise ValueError(f"tile_size must be an integer >= 1, got {tile_size!r}")
        score_shape = [max(1, math.ceil(d / tile_size)) for d in weight_shape]
        self.weight_shape = weight_shape
        self.tile_size = tile_size
        self.fixed_mask = bool(fixed_mask)
        self.fixed_weight = bool(fixed_weight)
        self.num_tiles = math.prod(score_shape)
        self.set_sparsity(sparsity, _stacklevel=3)
        self.scores = nn.Parameter(torch.empty(score_shape), requires_grad=not fixed_mask)
        nn.init.kaiming_uniform_(self.scores, a=math.sqrt(5))

    def set_sparsity(self, sparsity: float, _stacklevel: int = 2) -> None:
        """Prune this fraction of the tiles from the next forward on (capped at ``1 - 1/num_tiles``)."""
        sparsity = float(sparsity)
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        max_sparsity = 1.0 - 1.0 / self.num_tiles
        if sparsity > max_sparsity:
            warnings.warn(
                f"Supermask: sparsity {sparsity} is not reachable for weight shape {self.weight_shape} with "
                f"tile size {self.tile_size} ({self.num_tiles} tiles); capped at {max_sparsity:.6g}",
                stacklevel=_stacklevel + 1,
            )
            sparsity = max_sparsity
        # Plain attributes, not properties computed per forward: torch.compile guards on them, so a
        # new sparsity recompiles instead of reusing a graph built with the old k.
        self._sparsity = sparsity
        self.k = threshold_rank(sparsity, self.num_tiles)

    @property
    def sparsity(self) -> float:
        """Fraction of tiles pruned; assigning it is :meth:`set_sparsity`."""
        return self._sparsity

    @sparsity.setter
    def sparsity(self, value: float) -> None:
        self.set_sparsity(value, _stacklevel=3)

    @property
    def kept_tiles(self) -> int:
        """Tiles the mask keeps (when scores are distinct)."""
        return self.num_tiles - (self.k - 1)

    def tile_mask(self) -> torch.Tensor:
        """The 0/1 mask over tiles, shape of ``scores``, differentiable (STE) w.r.t. scores."""
        return _STEThreshold.apply(self.scores, self.k)

    def mask(self) -> torch.Tensor:
        """The 0/1 mask expanded to the weight's shape."""
        return expand_tiles(self.tile_mask(), self.weight_shape, self.tile_size)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"Supermask built for weight shape {self.weight_shape}, got {tuple(weight.shape)}")
        if self.fixed_weight:
            weight = weight.detach()
        # weight * expand(tile_mask), through our op so that the sparse backend can find, in a
        # compiled training graph, the linears to run with the masked kernel (same aten ops).
        return tile_masked_weight(weight, self.tile_mask(), self.tile_size)

    def _on_registered(self, owner: nn.Module, tensor_name: str, plist: parametrize.ParametrizationList) -> None:
        if self.fixed_weight:
            plist.original.requires_grad_(False)

    def extra_repr(self) -> str:
        return (
            f"weight_shape={self.weight_shape}, sparsity={self.sparsity:.4g}, tile_size={self.tile_size}, "
            f"fixed_mask={self.fixed_mask}, fixed_weight={self.fixed_weight}"
        )


class StackedSupermask(Supermask):
    """A :class:`Supermask` over ``parts`` weights stacked along dim 0, with one sparsity target each.

    Made for ``nn.MultiheadAttention.in_proj_weight``, the q, k and v projections stacked as
    ``[3E, E]``: each of them keeps the same number of tiles, the top-scoring ones of its own
    rows (``apply.py`` says why, with the measurement). ``scores`` is one tensor, as for a
    Supermask (same state-dict key); its rows split into ``parts`` equal chunks, so a tile may
    not straddle two parts: ``weight_shape[0] / parts`` must be a multiple of ``tile_size``.
    Sparsity is capped per part (``1 - 1/tiles_per_part``).
    """

    def __init__(self, weight_shape, sparsity: float, tile_size: int, parts: int = 3, **kwargs):
        weight_shape = tuple(int(d) for d in weight_shape)
        rows = weight_shape[0] if weight_shape else 0
        if not isinstance(parts, int) or parts < 1 or rows % parts or (rows // parts) % max(1, int(tile_size)):
            raise ValueError(
                f"StackedSupermask: weight rows {rows} do not split into {parts} parts that are each a multiple "
                f"of tile_size {tile_size} (a tile may not straddle two parts); choose a tile size that divides "
                f"{rows // max(1, parts) if parts else rows}"
            )
        # One part's threshold arithmetic (and its cap warning) is Supermask's own; its throwaway
        # scores must not draw from the global RNG (same init as a Supermask of the full shape).
        with torch.random.fork_rng(devices=[]):
            part = Supermask((rows // parts, *weight_shape[1:]), sparsity, tile_size)
        super().__init__(weight_shape, part.sparsity, tile_size, **kwargs)
        self.parts = parts
        self.part_k = part.k
        self.part_tiles = part.num_tiles

    @property
    def kept_tiles(self) -> int:
        return self.parts * (self.part_tiles - (self.part_k - 1))

    def tile_mask(self) -> torch.Tensor:
        chunks = self.scores.chunk(self.parts, dim=0)
        return torch.cat([_STEThreshold.apply(chunk, self.part_k) for chunk in chunks])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", parts={self.parts}"
