"""N:M masks and Bi-Mask (bidirectional N:M) as a ``torch.nn.utils.parametrize`` parametrization.

Usage (the only call a user needs)::

    import torch.nn.utils.parametrize as P
    P.register_parametrization(lin, "weight", NMMask(2, 4))          # Bi-Mask 2:4

Masks (ALGORITHMS.md, following zyxxmu/Bi-Mask and the fabfish/Bi-Mask fork):

- N:M means ``1 <= N < M`` (:func:`check_nm`, also used by the CLI's ``--nm``): ``N == M``
  would keep every weight, a mask that silently does nothing.
- Forward mask ``Mf``: the weight is viewed as ``W2 = W.reshape(out, -1)``. For a Linear that is
  ``[out, in]``; for a Conv2d ``[out, in*kh*kw]`` (the reference's choice: a group of M
  consecutive entries of the flattened ``in, kh, kw`` dims, so for a 3x3 kernel a group can span
  two input channels; 2:4 hardware would want groups along input channels only). In every group
  of M consecutive columns of each row keep the N largest ``|W|``. Recomputed from the current
  dense weight at every forward. The flattened in-dim must be divisible by M (else ValueError at
  registration: leave that layer dense with ``filter_fn``/``skip_last_layer``).
- Backward mask ``Mb`` (mode ``"bidirectional"``): rows (output channels) are reordered by the
  permutation buffer ``perm``; for each column, in every group of M consecutive permuted rows keep
  the N largest ``|W * Mf|``; intersect with ``Mf``; un-permute. ``Mb ⊆ Mf`` and ``Mb`` is N:M
  along the output dim within each permuted group. Needs ``out % M == 0``.
- Permutation search: once when the mask is registered, then on the weights of every
  ``perm_every``-th training step's forward (the reference searches at forwards 0, I, 2I, ... on
  the weights that forward uses). A post-accumulate-grad hook on ``original`` counts backward
  passes (one per training step, or per micro-batch with gradient accumulation); when the count
  reaches a multiple of ``perm_every`` a search is due, and it runs on the *updated* weights:
  right after the next ``optimizer.step()`` of any ``torch.optim`` optimizer (a global step
  post-hook), or, in a loop without one, at the start of the next eager training forward.
  Candidates = the current ``perm``, the identity and ``perm_candidates`` random
  permutations; the first with the most nonzeros in ``Mb`` wins (so a search never keeps fewer
  nonzeros than the identity or the permutation it replaces). ``Mb``'s nonzero count is computed
  without building ``Mb``: per (group, column) it is ``min(N, #nonzeros of W*Mf in the group)``.
  Random permutations come from a CPU generator seeded with ``(seed, search index)``, so every
  DDP rank draws the same ones. ``perm`` is a buffer and the counters are the module's extra
  state, so both are in the ``state_dict``. Doing the search outside the compiled forward keeps
  it free of data-dependent Python control flow: under ``torch.compile`` a Bi-Mask layer
  causes no graph break and no recompilation (a compiled model relies on the optimizer hook).

Gradients (``y = x W^T``; ``dW`` is the gradient of ``original``):

===============  ======================  ========================================================
mode             forward uses            backward
===============  ======================  ========================================================
bidirectional    ``W * Mf``              ``dx = dy (W * Mb)``; ``dW = dy^T x + λ (1 - Mf) * W``
forward (m3)     ``W * Mf``              ``dx = dy (W * Mf)``; ``dW = dy^T x + λ (1 - Mf) * W``
post (m4)        ``W * Mf``              as forward; then :func:`post_step_projection` sets the
                                         pruned weights to zero after each ``optimizer.step()``
unstructured     ``W * top-k |W|``       as forward with the top-k mask (``keep_ratio`` kept)
===============  ======================  ========================================================

``dW`` is SR-STE: the dense straight-through gradient plus the decay λ (``decay``) on pruned
weights. (The fork's m3 code uses the dense ``W`` for ``dx``; we follow ALGORITHMS.md,
``dx = dy (W * Mf)``, which is the exact gradient of the forward.)

SR-STE decay: once, or once per sample
--------------------------------------
The two reference layers differ. The CNN layer (``CnnModels/utils/conv_type.py``, ``MyConv2d``)
sums the per-sample weight gradients (``.sum(0)``) and then adds ``λ (1 - Mf) W`` once. The DeiT
layer (``DeiT/timm/models/vision_transformer.py``, ``MyConv2d_Lay``) adds it to the per-sample
gradient ``[B, in, out]`` (``x.transpose(1, 2).matmul(g)``) and autograd then sums the batch, so
its effective decay is ``B λ`` with ``B`` the per-GPU batch (DeiT-small, 256 a GPU: 0.0512).
Default (``decay_per_sample=False``): once per step, everywhere, as the CNN layer and
ALGORITHMS.md. ``decay_per_sample=True`` (mode ``"bidirectional"``) is the DeiT layer: a linear
layer (and an attention projection) adds ``λ (1 - Mf) W`` once per matrix of its batched matmul,
``prod(x.shape[:-2])`` times: the batch for a ``[B, tokens, features]`` input, once for a 2-D
input (which the reference layer cannot take). A Conv2d adds it once either way (the reference
CNN layer does).

How the bidirectional ``dx`` really uses ``Mb``
-----------------------------------------------
A parametrization returns one tensor, and ``F.linear``/``F.conv2d`` use that tensor for both the
forward and the input-gradient matmul; its backward only ever receives ``dL/dW_eff``. So Bi-Mask
must own the layer's op. ``register_parametrization`` swaps the module's class for a per-instance
subclass (``ParametrizedLinear``...); when an ``NMMask`` in bidirectional mode is registered on a
Linear/Conv2d ``weight``, we set ``forward`` on *that per-instance class* (found through a global
module-registration hook, see ``supermask.py``). The new forward calls one autograd.Function,
``_BiMaskLinear``/``_BiMaskConv2d``, with ``(x, W, Mf, Mb, bias)``, whose backward computes the
three formulas above (conv: ``aten.convolution_backward`` with ``W * Mb``, so ``dx`` is a
transposed conv with the backward mask). Nothing else changes: the parameter is still
``parametrizations.weight.original``; ``module.weight`` still reads ``W * Mf``; without grad
(eval, ``no_grad``) the module's own forward runs; ``remove_parametrizations``/``finalize``
restores the original class and with it the original forward. This works with plain loops, DDP
(the parameter is used normally) and ``torch.compile`` (a class-level forward and a traceable
autograd.Function).

``nn.MultiheadAttention.in_proj_weight`` (the packed ``[3E, E]`` q/k/v projection) has no Linear
to route: on registration there, the per-instance attention class gets ``_bimask_mha_forward``,
which (with grad enabled) computes the attention itself — projections through ``_BiMaskLinear``
on rows of ``W``/``Mf``/``Mb`` (all of them for self-attention; q rows and k/v rows for
cross-attention), then scaled dot-product attention, masks merged as
``F.multi_head_attention_forward`` merges them, dropout, ``out_proj``. ``Mb`` is computed on the
whole ``[3E, E]`` weight, so a permuted group of M rows may mix q, k and v rows. If ``out_proj``
also has a bidirectional mask, its ``dx`` uses its ``Mb`` there too. Without grad the module's own
forward (and torch's fused fast path) runs on ``in_proj_weight = W * Mf``.

Limits:

- An NMMask(mode="bidirectional") on anything but the ``weight`` of a Linear/Conv2d or
  ``nn.MultiheadAttention.in_proj_weight`` (or on an attention with separate q/k/v weights,
  ``add_bias_kv`` or ``add_zero_attn``) warns at registration and gets forward-mode gradients;
  ``apply_nm(..., attention_in_proj=True)`` refuses such attention modules instead.
- A module whose forward is not called sees only ``W * Mf`` and gets forward-mode (m3)
  gradients: ``out_proj`` of an ``nn.MultiheadAttention`` whose ``in_proj_weight`` is not masked
  bidirectionally (the attention reads ``out_proj.weight`` directly).
- A bidirectional NMMask registered on a module that was parametrized *before*
  ``sparse_compile.training`` was imported cannot be attached automatically; it warns at its
  first training forward and behaves as mode "forward" until :meth:`NMMask.attach` is called.
- ``copy.deepcopy`` does not copy tensor hooks: a copy re-registers its search hook at its first
  eager (not compiled) forward with grad enabled.
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.optim import optimizer as _optim

from sparse_compile.attention import multi_head_attention
from sparse_compile.training import supermask as _supermask  # noqa: F401  (installs the registration hook)

__all__ = [
    "NMMask", "check_nm", "top_n", "nm_keep", "nm_mask", "backward_keep", "bimask_backward_mask",
    "backward_kept_counts", "inverse_permutation", "unstructured_mask",
]

MODES = ("bidirectional", "forward", "post", "unstructured")


# --------------------------------------------------------------------------------------------
# Masks (no autograd; inputs are detached)
# --------------------------------------------------------------------------------------------


def check_nm(n, m) -> None:
    """The one rule for N:M: integers with ``1 <= N < M``; ``ValueError`` naming the fix otherwise."""
    for name, v in (("N", n), ("M", m)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"N:M: {name} must be an integer, got {v!r}")
    if not 1 <= n < m:
        hint = " (N == M keeps every weight: leave the layer without a mask instead)" if n == m else ""
        raise ValueError(f"N:M needs 1 <= N < M (keep N of every M weights), got N={n}, M={m}{hint}")


def top_n(a: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Bool mask of the ``n`` largest entries of ``a`` along ``dim`` (size ``m``); of equal entries
    the one with the lower index wins (the first ``n`` of a stable descending sort).

    Each entry counts the entries of its group that beat it, with comparisons instead of
    ``topk`` + ``scatter``; on entries without ties this is exactly the set ``topk`` keeps
    (``topk`` leaves the choice among ties unspecified). Two evaluation orders of the same integer
    counts (:func:`_top_n_pairwise`, :func:`_top_n_pointwise`): pairwise in eager (``m <= 16``) and
    under ``torch.compile`` along the last dim (the forward mask's groups), pointwise under
    ``torch.compile`` along another dim (the backward mask's groups of rows).
    """
    if a.shape[dim] > 16:
        return _top_n_pointwise(a, n, dim)
    if torch.compiler.is_compiling():
        if dim == a.dim() - 1:
            return _top_n_pairwise(a, n, dim, torch.int32)
        return _top_n_pointwise(a, n, dim)
    return _top_n_pairwise(a, n, dim)


def _top_n_pairwise(a: torch.Tensor, n: int, dim: int, count_dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """:func:`top_n` from the ``m (m - 1) / 2`` comparisons of ``a``'s slices along ``dim``.

    Eager, ``[1536, 384]`` weight, one CPU thread, vs ``topk`` + ``scatter``: 2:4 2.4 ms vs 16 ms,
    2:8 4.6 vs 14, 1:16 (120 pairs) 10 vs 13; the pointwise form takes 27-75 ms there (copies).

    Under ``torch.compile`` along the last dim (``count_dtype`` int32): Inductor makes one loop over
    the groups (each pair compared once) that writes the ``m`` slices of the mask (a concat), instead
    of the pointwise form's loop over entries that compares every entry with its whole group and
    reads it through ``4 * (k // 4) + j`` indices, which Inductor's CPU code does not vectorize
    (``Mf`` of ``[1536, 384]`` with ``W * Mf``, one thread: 2:4 1.3 ms vs 3.2, 2:8 2.2 vs 4.0, 1:16
    4.0 vs 47). Neither loop is vectorized (strided loads); uint8 counts there took 4.7-6.6 ms.
    """
    cols = a.unbind(dim)
    m = len(cols)
    beaten: list = [None] * m  # per entry: how many entries of its group beat it
    for i in range(m):
        for j in range(i + 1, m):
            later = cols[j] > cols[i]  # j beats i; on a tie the lower index i beats j
            earlier = ~later
            beaten[i] = later.to(count_dtype) if beaten[i] is None else beaten[i] + later
            beaten[j] = earlier.to(count_dtype) if beaten[j] is None else beaten[j] + earlier
    return torch.stack([b < n for b in beaten], dim)


def _top_n_pointwise(a: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """:func:`top_n` as ``m`` comparisons of every entry with the ``j``-th entry of its group.

    Pure pointwise ops: under ``torch.compile`` Inductor fuses them with the mask's consumer
    (``W * Mf``) into one loop over the weight (``topk`` was an external call, then a scatter).
    When ``dim`` is the last dim, the loop runs over the flattened last two dims: a loop whose
    innermost dim is the group (``m`` = 4) ran 11x slower (masked 16-lane vectors on 4 lanes).
    Counts are int32: Inductor's CPU code for uint8 counts (partial 64-lane vectors) made the
    backward mask of a ``[1536, 384]`` weight 13x slower (12 ms vs 0.9 ms, one thread).
    """
    m = a.shape[dim]
    last = dim == a.dim() - 1 and a.dim() >= 2
    flat = a.flatten(-2) if last else a
    if last:
        pos = torch.arange(flat.shape[-1], device=a.device) % m
    else:
        shape = [1] * a.dim()
        shape[dim] = m
        pos = torch.arange(m, device=a.device).reshape(shape)
    beaten = None  # per entry: how many entries j of its group beat it
    for j in range(m):
        aj = a.narrow(dim, j, 1).expand(a.shape).reshape(flat.shape)
        beats = torch.where(pos > j, aj >= flat, aj > flat).to(torch.int32)  # a tie goes to the lower index
        beaten = beats if beaten is None else beaten + beats
    return (beaten < n).reshape(a.shape)


def nm_keep(w2: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool ``Mf`` of ``w2`` (``[rows, K]``, ``K % m == 0``): top-``n`` ``|w2|`` in each group of ``m`` columns."""
    rows, k = w2.shape
    return top_n(w2.detach().abs().reshape(rows, k // m, m), n, 2).reshape(rows, k)


def nm_mask(w2: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """0/1 mask of ``w2`` in its dtype (:func:`nm_keep`)."""
    return nm_keep(w2, n, m).to(w2.dtype)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``argsort(perm)`` of a permutation, without a sort: one scatter."""
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


def backward_keep(w2: torch.Tensor, mf: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool ``Mb`` of ``w2`` (``[out, K]``) given its bool forward mask ``mf`` and permutation ``perm``."""
    out, k = w2.shape
    a = (w2.detach() * mf).abs()[perm].reshape(out // m, m, k)
    keep_p = top_n(a, n, 1).reshape(out, k)  # in permuted row order
    return keep_p[inverse_permutation(perm)] & mf


def bimask_backward_mask(w2: torch.Tensor, mf: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """0/1 backward mask ``Mb`` of ``w2`` (``[out, K]``) in its dtype, given its forward mask ``mf`` and ``perm``."""
    return backward_keep(w2, mf.bool(), perm, n, m).to(w2.dtype)


def backward_kept_counts(nonzero: torch.Tensor, perms: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Nonzeros ``Mb`` keeps under each permutation (``perms``: ``[C, out]``), given ``nonzero = (W*Mf != 0)``.

    Per group of ``m`` permuted rows and per column, ``Mb`` keeps ``min(n, #nonzeros)``. The
    candidates are batched; per group the ``m`` rows are gathered and added one at a time, in
    uint8: a seventh of the time of gathering all rows in int32 (102 candidates on a
    ``[1536, 384]`` weight: 70 ms vs 470 ms, one CPU thread).
    """
    out, k = nonzero.shape
    nz = nonzero.to(torch.uint8)
    chunk = max(1, (m << 24) // max(1, out * k))  # [chunk, out / m, k] uint8: 16 MiB
    counts = []
    for start in range(0, perms.shape[0], chunk):
        rows = perms[start : start + chunk].reshape(-1, out // m, m)
        kept = nz[rows[:, :, 0]]
        for j in range(1, m):
            kept += nz[rows[:, :, j]]
        counts.append(kept.clamp_(max=n).sum((1, 2)))
    return torch.cat(counts)


def unstructured_keep_count(numel: int, keep_ratio: float) -> int:
    """Weights the unstructured mask keeps: ``int(numel * keep_ratio)`` as the fork's top-k mask
    (512 at 0.3: 153, not round's 154); at least one, so a tiny layer is never all zeros."""
    return max(1, min(numel, int(numel * keep_ratio)))


def unstructured_mask(w: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """0/1 mask keeping the :func:`unstructured_keep_count` largest ``|w|``."""
    flat = w.detach().abs().reshape(-1)
    k = unstructured_keep_count(flat.numel(), keep_ratio)
    idx = flat.topk(k).indices
    return torch.zeros_like(flat).scatter_(0, idx, 1.0).reshape(w.shape)


# --------------------------------------------------------------------------------------------
# autograd Functions
# --------------------------------------------------------------------------------------------


class _SRSTE(torch.autograd.Function):
    """``W * mask`` forward; backward ``g + decay * (1 - mask) * W`` (dense STE + SR-STE decay)."""

    @staticmethod
    def forward(ctx, weight, mask, decay: float):
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        weight, mask = ctx.saved_tensors
        gw = grad
        if ctx.decay != 0.0:
            gw = grad + ctx.decay * (1 - mask) * weight
        return gw, None, None


def _decay_term(weight: torch.Tensor, mf: torch.Tensor, decay: float) -> torch.Tensor:
    """SR-STE's ``decay * (1 - Mf) * W`` for a bool ``mf``: the same values in one where."""
    return torch.where(mf, 0.0, weight * decay)


class _BiMaskLinear(torch.autograd.Function):
    """``y = x (W*Mf)^T + b``; ``dx = dy (W*Mb)``; ``dW = dy^T x + decay (1-Mf) W``; ``db = sum dy``.

    The backward computes in ``dy``'s dtype (under autocast the forward ran in half precision)
    and returns each gradient in its input's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, mf, mb, bias, decay: float):
        ctx.save_for_backward(x, weight, mf, mb)
        ctx.decay = decay
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, weight * mf, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mf, mb = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = dy.matmul((weight * mb).to(dy.dtype)).to(x.dtype)
        dy2 = dy.reshape(-1, dy.shape[-1])
        if ctx.needs_input_grad[1]:
            dw = dy2.t().matmul(x.reshape(-1, x.shape[-1]).to(dy.dtype)).to(weight.dtype)
            if ctx.decay != 0.0:
                dw = dw + _decay_term(weight, mf, ctx.decay)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
            db = dy2.sum(0).to(ctx.bias_dtype)
        return dx, dw, None, None, db, None


class _BiMaskConv2d(torch.autograd.Function):
    """Conv2d with ``W*Mf`` forward, ``W*Mb`` in the input gradient, SR-STE weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, mf, mb, bias, stride, padding, dilation, groups, decay: float):
        ctx.save_for_backward(x, weight, mf, mb)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.decay = decay
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.conv2d(x, weight * mf, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mf, mb = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        want_b = ctx.bias_dtype is not None and ctx.needs_input_grad[4]
        # The weight gradient of a conv does not depend on the weight's values; the input
        # gradient is the transposed conv with W * Mb.
        dx, dw, db = torch.ops.aten.convolution_backward(
            dy, x.to(dy.dtype), (weight * mb).to(dy.dtype), [weight.shape[0]] if want_b else None,
            list(stride), list(padding), list(dilation), False, [0, 0], groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], want_b],
        )
        if dx is not None:
            dx = dx.to(x.dtype)
        if dw is not None:
            dw = dw.to(weight.dtype)
            if ctx.decay != 0.0:
                dw = dw + _decay_term(weight, mf, ctx.decay)
        if db is not None:
            db = db.to(ctx.bias_dtype)
        return dx, dw, None, None, db, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# The forward installed on the per-instance parametrized class of a bidirectional layer
# --------------------------------------------------------------------------------------------


def _bimask_forward(self, input):
    cls = type(self)
    nm = None
    plists = getattr(self, "parametrizations", None)
    if plists is not None and "weight" in plists:
        plist = plists["weight"]
        if len(plist) == 1 and isinstance(plist[0], NMMask) and plist[0].mode == "bidirectional":
            nm = plist[0]
    if nm is None or not torch.is_grad_enabled():
        return cls._sc_base_forward(self, input)
    weight = plist.original
    if not torch.compiler.is_compiling():
        nm._ensure_hook(self, weight)
        nm.run_due_search()  # a loop without a torch.optim optimizer: search on this forward's weights
    mf, mb = nm.keep_masks(weight)
    if isinstance(self, nn.Linear):
        return _BiMaskLinear.apply(input, weight, mf, mb, self.bias, nm.linear_decay(input))
    # Conv2d (checked at registration)
    padding = self.padding
    if self.padding_mode != "zeros":
        input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        padding = (0, 0)
    elif padding == "valid":
        padding = (0, 0)
    elif padding == "same":  # as F.conv2d does it: the odd extra pixel goes right/bottom
        pads = []
        for d, k in zip(reversed(self.dilation), reversed(self.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        input = F.pad(input, pads)
        padding = (0, 0)
    return _BiMaskConv2d.apply(
        input, weight, mf, mb, self.bias, tuple(self.stride), tuple(padding), tuple(self.dilation), self.groups, nm.decay
    )


# --------------------------------------------------------------------------------------------
# Bi-Mask on nn.MultiheadAttention.in_proj_weight
#
# nn.MultiheadAttention never calls a Linear for its input projection: F.multi_head_attention_forward
# multiplies by ``in_proj_weight`` itself, so the only way to give that matmul its own backward is
# to own the attention forward. The forward below is installed on the per-instance parametrized
# class (as ``_bimask_forward`` is for a Linear) and runs only with grad enabled; it computes the
# same attention as F.multi_head_attention_forward for the configurations it accepts
# (:func:`mha_bimask_unsupported` names the others), with both projections through _BiMaskLinear.
# --------------------------------------------------------------------------------------------


def mha_bimask_unsupported(mha: nn.MultiheadAttention) -> str | None:
    """Why a bidirectional in_proj mask cannot run on ``mha`` (None when it can)."""
    # (not reading mha.in_proj_weight: during registration the parametrized attribute is half set up)
    if not mha._qkv_same_embed_dim:
        return "it has separate q/k/v weights (kdim/vdim != embed_dim), no packed in_proj_weight"
    if mha.bias_k is not None or mha.add_zero_attn:
        return "add_bias_kv/add_zero_attn are not supported by the Bi-Mask attention forward"
    return None


def _bidirectional_nm(module: nn.Module, tensor_name: str) -> "NMMask | None":
    plists = getattr(module, "parametrizations", None)
    if plists is None or tensor_name not in plists:
        return None
    plist = plists[tensor_name]
    if len(plist) == 1 and isinstance(plist[0], NMMask) and plist[0].mode == "bidirectional" and plist[0]._attached:
        return plist[0]
    return None


def _projection(x, weight, mf, mb, bias, rows: slice, decay: float):
    """``x (W*Mf)[rows]^T + b[rows]`` with the Bi-Mask backward (``Mb[rows]`` in ``dx``)."""
    b = None if bias is None else bias[rows]
    return _BiMaskLinear.apply(x, weight[rows], mf[rows], mb[rows], b, decay)


def _out_projection(out_proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # The attention reads out_proj.weight itself; a bidirectional mask there gets its dx here.
    nm = _bidirectional_nm(out_proj, "weight")
    if nm is None:
        return F.linear(x, out_proj.weight, out_proj.bias)
    weight = out_proj.parametrizations.weight.original
    if not torch.compiler.is_compiling():
        nm._ensure_hook(out_proj, weight)
        nm.run_due_search()  # as in _bimask_forward: search on the weights this forward uses
    mf, mb = nm.keep_masks(weight)
    return _BiMaskLinear.apply(x, weight, mf, mb, out_proj.bias, nm.linear_decay(x))


def _bimask_mha_forward(
    self,
    query,
    key,
    value,
    key_padding_mask=None,
    need_weights=True,
    attn_mask=None,
    average_attn_weights=True,
    is_causal=False,
):
    nm = _bidirectional_nm(self, "in_proj_weight")
    if nm is None or not torch.is_grad_enabled():
        return type(self)._sc_base_forward(
            self, query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
        )
    if is_causal and attn_mask is None:
        raise RuntimeError("MultiheadAttention: is_causal needs attn_mask (as torch's own forward does)")
    weight = self.parametrizations.in_proj_weight.original
    if not torch.compiler.is_compiling():
        nm._ensure_hook(self, weight)
        nm.run_due_search()  # as in _bimask_forward: search on the weights this forward uses
    mf, mb = nm.keep_masks(weight)

    proj = lambda x, rows: _projection(x, weight, mf, mb, self.in_proj_bias, rows, nm.linear_decay(x))  # noqa: E731
    return multi_head_attention(
        query, key, value, self.num_heads, proj, lambda x: _out_projection(self.out_proj, x),
        batch_first=self.batch_first, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
        dropout_p=self.dropout if self.training else 0.0, need_weights=need_weights,
        average_attn_weights=average_attn_weights,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# The parametrization
# --------------------------------------------------------------------------------------------


class NMMask(nn.Module):
    """N:M weight mask; ``mode`` is ``"bidirectional"`` (Bi-Mask), ``"forward"``, ``"post"`` or ``"unstructured"``.

    Args:
        n, m: keep ``n`` of every ``m`` consecutive weights along the reduction dim (``1 <= n < m``).
        mode: see the module docstring.
        perm_every: permutation search after every this many backward passes, i.e. training steps (bidirectional).
        perm_candidates: random permutations tried per search (bidirectional).
        decay: SR-STE decay λ on pruned weights (``dW += λ (1 - Mf) W``).
        keep_ratio: fraction of weights kept, mode ``"unstructured"`` only (default 0.5, the fork's).
        seed: seed of the permutation candidates (default: drawn from torch's global RNG, so it
            follows ``torch.manual_seed``).
        decay_per_sample: mode ``"bidirectional"`` only; the reference DeiT's decay (see "SR-STE
            decay: once, or once per sample" in the module docstring). Default False: once per step.
    """

    def __init__(
        self,
        n: int,
        m: int,
        mode: str = "bidirectional",
        perm_every: int = 100,
        perm_candidates: int = 100,
        decay: float = 2e-4,
        keep_ratio: float | None = None,
        seed: int | None = None,
        decay_per_sample: bool = False,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown NMMask mode {mode!r}; choose one of {', '.join(MODES)}")
        check_nm(n, m)
        if keep_ratio is not None and mode != "unstructured":
            raise ValueError(f"keep_ratio only applies to mode 'unstructured' (got mode {mode!r})")
        if mode == "unstructured":
            keep_ratio = 0.5 if keep_ratio is None else float(keep_ratio)
            if not 0.0 < keep_ratio <= 1.0:
                raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        if int(perm_every) < 1 or int(perm_candidates) < 1:
            raise ValueError(f"perm_every and perm_candidates must be >= 1, got {perm_every}, {perm_candidates}")
        if decay < 0:
            raise ValueError(f"decay must be >= 0, got {decay}")
        if decay_per_sample and mode != "bidirectional":
            raise ValueError(
                f"decay_per_sample applies to mode 'bidirectional' (the reference DeiT's layer), not {mode!r}"
            )
        self.decay_per_sample = bool(decay_per_sample)
        self.n, self.m, self.mode = n, m, mode
        self.perm_every = int(perm_every)
        self.perm_candidates = int(perm_candidates)
        self.decay = float(decay)
        self.keep_ratio = keep_ratio
        self.seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else int(seed)
        self._calls = 0  # backward passes that reached the weight (bidirectional)
        self._hooked = None  # weakref to the tensor whose grad hook counts them
        self._owner = None  # weakref to the module
        self._tensor_name = "weight"  # the tensor it parametrizes ("in_proj_weight" on attention)
        self._searches = 0
        self._search_due = False  # a search waits for the weights of the next forward
        self._attached = False
        self._warned = False
        self._registering = False
        self.register_buffer("perm", None)

    # -- masks --------------------------------------------------------------------------------

    @property
    def target_sparsity(self) -> float:
        return 1.0 - (self.keep_ratio if self.mode == "unstructured" else self.n / self.m)

    def forward_keep(self, weight: torch.Tensor) -> torch.Tensor:
        """Bool ``Mf`` (or the unstructured mask) in ``weight``'s shape."""
        if self.mode == "unstructured":
            return unstructured_mask(weight, self.keep_ratio).bool()
        return nm_keep(weight.reshape(weight.shape[0], -1), self.n, self.m).reshape(weight.shape)

    def forward_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """``Mf`` (or the unstructured mask) in ``weight``'s shape and dtype."""
        if self.mode == "unstructured":
            return unstructured_mask(weight, self.keep_ratio)
        return self.forward_keep(weight).to(weight.dtype)

    def keep_masks(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bool ``(Mf, Mb)`` in ``weight``'s shape (``Mb`` uses the current ``perm``; ``Mb = Mf`` unless bidirectional)."""
        mf = self.forward_keep(weight)
        if self.mode != "bidirectional":
            return mf, mf
        w2 = weight.reshape(weight.shape[0], -1)
        mb = backward_keep(w2, mf.reshape(w2.shape), self.perm, self.n, self.m)
        return mf, mb.reshape(weight.shape)

    def masks(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`keep_masks` as 0/1 tensors in ``weight``'s dtype."""
        mf, mb = self.keep_masks(weight)
        return mf.to(weight.dtype), mb.to(weight.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if (
            self.mode == "bidirectional"
            and not self._attached
            and not self._warned
            and not self._registering
            and torch.is_grad_enabled()
            and weight.requires_grad
            and self.training
        ):
            self._warned = True
            warnings.warn(
                "NMMask(mode='bidirectional') is not attached to its module, so the input gradient uses "
                "the forward mask (mode 'forward'). Call NMMask.attach(module) once.",
                stacklevel=2,
            )
        self._registering = False  # the first call after right_inverse is parametrize's own check
        return _SRSTE.apply(weight, self.forward_mask(weight).to(weight.dtype), self.decay)

    def linear_decay(self, x: torch.Tensor) -> float:
        """The decay of a linear layer's weight gradient on input ``x`` (``decay_per_sample``: times
        the number of matrices in the batched matmul, ``prod(x.shape[:-2])``)."""
        if not self.decay_per_sample:
            return self.decay
        return self.decay * x.shape[:-2].numel()

    # -- permutation search -------------------------------------------------------------------

    def _ensure_hook(self, module: nn.Module, weight: torch.Tensor) -> None:
        """Count backward passes on ``weight`` (re-registered after e.g. ``copy.deepcopy``, which drops tensor hooks)."""
        if self._owner is None or self._owner() is not module:
            self._owner = weakref.ref(module)
        if weight.requires_grad and (self._hooked is None or self._hooked() is not weight):
            weight.register_post_accumulate_grad_hook(self._after_backward)
            self._hooked = weakref.ref(weight)

    def _after_backward(self, weight: torch.Tensor) -> None:
        """Post-accumulate-grad hook of ``original``: one more training step; search every ``perm_every``."""
        owner = self._owner() if self._owner is not None else None
        plists = getattr(owner, "parametrizations", None)
        if (
            self._hooked is None
            or self._hooked() is not weight
            or plists is None
            or self._tensor_name not in plists
            or plists[self._tensor_name][0] is not self
        ):
            return  # stale hook: the parametrization was removed, or this is a copy's old tensor
        self._calls += 1
        if self._calls % self.perm_every == 0:
            # Not now: the optimizer has not updated the weights yet, and the reference searches on
            # the weights the next forward uses.
            self._search_due = True
            _SEARCH_DUE.add(self)

    def run_due_search(self) -> None:
        """Run the search that a completed ``perm_every``-th step made due (no-op when none is)."""
        if not self._search_due:
            return
        weight = self._hooked() if self._hooked is not None else None
        if weight is None:  # no weight known yet (e.g. just loaded): the next eager forward runs it
            return
        self._search_due = False
        _SEARCH_DUE.discard(self)
        self.search_permutation(weight)

    @torch.no_grad()
    def search_permutation(self, weight: torch.Tensor) -> torch.Tensor:
        """Set ``perm`` to the best of (current, identity, ``perm_candidates`` random); returns the kept counts."""
        w2 = weight.detach().reshape(weight.shape[0], -1)
        out = w2.shape[0]
        nonzero = (w2 * nm_keep(w2, self.n, self.m)) != 0
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._searches)
        rand = torch.rand(self.perm_candidates, out, generator=gen).argsort(dim=1).to(w2.device)
        ident = torch.arange(out, device=w2.device)
        cands = torch.cat([self.perm[None].to(w2.device), ident[None], rand])
        counts = backward_kept_counts(nonzero, cands, self.n, self.m)
        self.perm.copy_(cands[counts.argmax()])
        self._searches += 1
        return counts

    # -- registration ---------------------------------------------------------------------------

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """Identity (``module.weight = X`` stores ``X``); validates the shape and creates ``perm``."""
        if weight.dim() < 2:
            raise ValueError(f"NMMask needs a weight with at least 2 dims, got shape {tuple(weight.shape)}")
        out, k = weight.shape[0], weight[0].numel()
        if self.mode != "unstructured" and k % self.m != 0:
            raise ValueError(
                f"NMMask {self.n}:{self.m}: the reduction dim of weight {tuple(weight.shape)} has {k} entries, "
                f"not divisible by M={self.m}; leave this layer dense (apply_nm(..., filter_fn=...) or "
                f"skip_last_layer=True) or choose an M that divides {k}"
            )
        self._registering = True
        if self.mode == "bidirectional":
            if out % self.m != 0:
                raise ValueError(
                    f"NMMask {self.n}:{self.m} bidirectional: the output dim of weight {tuple(weight.shape)} is {out}, "
                    f"not divisible by M={self.m} (the backward mask groups output channels); leave this layer "
                    f"dense (filter_fn / skip_last_layer=True) or use mode='forward' for it"
                )
            if self.perm is None or self.perm.shape != (out,):
                self.perm = torch.arange(out, device=weight.device)
        return weight

    def _on_registered(self, owner: nn.Module, tensor_name: str, plist: parametrize.ParametrizationList) -> None:
        if self.mode != "bidirectional":
            return
        if _bimask_target_error(owner, tensor_name) is not None:
            # Raising here would leave the module half-registered; warn and act as mode "forward".
            self._warned = True
            warnings.warn(
                f"NMMask(mode='bidirectional') on {type(owner).__bases__[0].__name__}.{tensor_name}: "
                f"{_bimask_target_error(owner, tensor_name)}; this tensor gets forward-mode gradients (dx uses Mf)",
                stacklevel=4,
            )
            return
        self.attach(owner, tensor_name)
        self.search_permutation(plist.original)
        self._ensure_hook(owner, plist.original)

    def attach(self, module: nn.Module, tensor_name: str = "weight") -> None:
        """Route ``module``'s forward through the Bi-Mask op (done automatically on registration)."""
        why = _bimask_target_error(module, tensor_name)
        if why is not None:
            raise ValueError(f"NMMask(mode='bidirectional') on {type(module).__name__}.{tensor_name}: {why}")
        cls = type(module)
        if not isinstance(getattr(module, "parametrizations", None), nn.ModuleDict) or cls.__name__ != (
            f"Parametrized{cls.__bases__[0].__name__}"
        ):
            raise ValueError("attach: register the NMMask with torch.nn.utils.parametrize.register_parametrization first")
        if "_sc_base_forward" not in cls.__dict__:
            cls._sc_base_forward = cls.__bases__[0].forward
            cls.forward = _bimask_mha_forward if isinstance(module, nn.MultiheadAttention) else _bimask_forward
        self._tensor_name = tensor_name
        self._attached = True

    # -- state ----------------------------------------------------------------------------------

    def get_extra_state(self):
        return {"calls": self._calls, "searches": self._searches, "seed": self.seed, "search_due": self._search_due}

    def set_extra_state(self, state) -> None:
        self._calls = int(state["calls"])
        self._searches = int(state["searches"])
        self.seed = int(state["seed"])
        self._search_due = bool(state.get("search_due", False))
        if self._search_due:
            _SEARCH_DUE.add(self)

    def extra_repr(self) -> str:
        s = f"n={self.n}, m={self.m}, mode={self.mode!r}, decay={self.decay:g}"
        if self.decay_per_sample:
            s += ", decay_per_sample=True"
        if self.mode == "bidirectional":
            s += f", perm_every={self.perm_every}, perm_candidates={self.perm_candidates}"
        if self.mode == "unstructured":
            s += f", keep_ratio={self.keep_ratio:g}"
        return s


# Searches made due by a backward pass, run after the optimizer step that follows it.
_SEARCH_DUE: "weakref.WeakSet[NMMask]" = weakref.WeakSet()


def _run_due_searches(optimizer, args, kwargs) -> None:
    """Global ``torch.optim`` step post-hook: the weights the next forward uses are now in place.

    Only searches whose weight this optimizer updates: another optimizer's step (a second
    model, a separate optimizer for the scores) has not moved them.
    """
    if not _SEARCH_DUE:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for nm in list(_SEARCH_DUE):
        weight = nm._hooked() if nm._hooked is not None else None
        if weight is not None and id(weight) in stepped:
            nm.run_due_search()


if not getattr(_optim, "_sparse_compile_search_hook", False):
    _optim.register_optimizer_step_post_hook(_run_due_searches)
    _optim._sparse_compile_search_hook = True


def _bimask_target_error(module: nn.Module, tensor_name: str) -> str | None:
    """Why a bidirectional NMMask cannot own the backward of ``module.<tensor_name>`` (None when it can)."""
    if isinstance(module, nn.MultiheadAttention) and tensor_name == "in_proj_weight":
        return mha_bimask_unsupported(module)
    if tensor_name == "weight" and isinstance(module, (nn.Linear, nn.Conv2d)):
        return None
    return (
        "the backward mask applies only to the 'weight' of nn.Linear/nn.Conv2d and to "
        "nn.MultiheadAttention.in_proj_weight; use mode='forward', 'post' or 'unstructured' here"
    )


def _post_project(module: NMMask, original: torch.Tensor) -> None:
    with torch.no_grad():
        original.mul_(module.forward_mask(original).to(original.dtype))
