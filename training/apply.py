"""Model-wide helpers: put masks on a model, project, finalize, summarize.

Which layers (both :func:`apply_supermask` and :func:`apply_nm`):

- ``nn.Linear`` (subclasses included, e.g. ``nn.MultiheadAttention.out_proj``) -> the
  ``linear_*`` settings; ``nn.Conv2d`` with a 1x1 kernel -> ``conv1x1_*``; other ``nn.Conv2d``
  -> ``conv_*``. A kind whose sparsity is 0 stays dense. :func:`apply_nm` masks every Linear and
  Conv2d.
- ``nn.MultiheadAttention.in_proj_weight`` is a raw Parameter of the attention module, not a
  Linear: by default it is *not* masked, as in SuperBlock, which only replaces ``nn.Linear``
  modules (the inference backend then runs those projections dense). With
  ``attention_in_proj=True`` it is masked with the ``linear_*`` settings (:func:`apply_nm`: the
  same N:M) and named ``<attention>.in_proj``, as the compile report names that matmul; see
  "Attention input projections" below. The
  ``out_proj`` Linear is masked; note that MultiheadAttention reads ``out_proj.weight`` directly,
  so with a parametrization the mask is applied — SuperBlock's module replacement never ran
  ``SupermaskLinear.forward`` there, so its ``out_proj`` trained dense.
- ``skip_last_layer``: the last ``nn.Linear`` in ``model.named_modules()`` order (the
  classifier: ``heads.head`` in torchvision ViT, ``fc`` in ResNet) stays dense.
- ``skip_first_transformer``: every layer under the first transformer block stays dense. The
  block is found generically: the first ``nn.Sequential``/``nn.ModuleList`` (in
  ``named_modules()`` order) with at least two children, all of which contain an attention module
  (``nn.MultiheadAttention`` or a module whose class name ends in ``Attention``); its first child
  is the first block (torchvision ViT: ``encoder.layers.encoder_layer_0``; ``nn.TransformerEncoder``:
  ``layers.0``). A container with a single such child is used when there is no larger one.
  No block found -> ValueError.
- ``filter_fn(name, module) -> bool``: when given, only layers for which it returns True are
  masked (on top of the rules above).
- :func:`apply_nm` only: a transformer's patch embedding stays dense unless
  ``patch_embedding=True``, as in the reference DeiT (``zyxxmu/Bi-Mask``, whose ``PatchEmbed.proj``
  is a plain ``nn.Conv2d``; only the blocks' qkv, proj, fc1, fc2 are its ``NMConv``). A patch
  embedding is an ``nn.Conv2d`` with ``kernel_size == stride`` (non-overlapping patches) larger
  than 1x1, in a model that has an attention module (torchvision ViT: ``conv_proj``, 3x16x16 = 768
  holds 2:4 but is not masked by default; timm: ``patch_embed.proj``). :func:`sparsity_summary`
  lists it as dense with the reason.
- :func:`apply_nm` only: a layer whose weight cannot hold the N:M pattern (a reduction dim not
  divisible by M, such as a ResNet stem's ``3 * 7 * 7 = 147``; or, for the bidirectional
  backward mask, an output dim not divisible by M, such as a 1000- or 3-class head with M = 8
  or 4) stays dense, as the reference keeps a ResNet's stem dense: one warning
  names every such layer, and :func:`sparsity_summary` lists it with the reason.
  ``on_incompatible="error"`` raises instead, before the model is changed.
- ``filter_fn`` for an input projection gets ``"<attention>.in_proj"`` and the attention module.

Attention input projections (``attention_in_proj=True``)
--------------------------------------------------------
The packed ``[3E, E]`` weight (q, k and v rows stacked) gets a :class:`StackedSupermask`: one
``scores`` tensor with tiles over the whole weight, but **one sparsity target for each of q, k
and v** — each keeps the same number of tiles, its own top-scoring ones (so ``E`` must be a
multiple of the tile size). The alternative, one shared target over all ``3E`` rows, lets q, k
and v compete for the tiles. Measured with ``train_digits_transformer`` in
``tests/test_in_proj.py`` (the 8x8 digits as 8 tokens, two encoder blocks of width 32,
Supermask tile 4 on every encoder linear, 20 epochs; test accuracy, mean of seeds 0-7):

==========  ===============  ==============  ===========================================
sparsity    one per q/k/v    one shared      note
==========  ===============  ==============  ===========================================
80%         0.946            0.941           per seed: per q/k/v ahead by -0.4 to +1.8 points
90%         0.923            0.917           per seed: -4.2 to +4.2 points, both ways
==========  ===============  ==============  ===========================================

The accuracy difference is within the seed-to-seed noise; what decides is that a shared target
can starve one projection (at 90%, seed 0, the first block's v kept 2 of its 64 tiles, its k 10,
where one target each keeps 7): with one target each no projection collapses, and q/k/v get what they would get as three
separate Linears (HF-style attention, per-layer targets). BSR cost (kept blocks) is the same.
N:M needs no such choice: groups run along the input dim within each row.
Bi-Mask on in_proj: the bidirectional gradient holds (see ``nm_mask.py``); attention modules
with separate q/k/v weights, ``add_bias_kv`` or ``add_zero_attn`` are refused with a ValueError.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from sparse_compile.training.nm_mask import NMMask, _post_project, mha_bimask_unsupported
from sparse_compile.training.supermask import StackedSupermask, Supermask

__all__ = [
    "apply_supermask",
    "apply_nm",
    "finalize",
    "sparsity_summary",
    "format_sparsity_summary",
    "post_step_projection",
    "layer_kind",
    "first_transformer_block",
    "patch_embeddings",
]

OURS = (Supermask, NMMask)

# Attribute on a layer apply_nm left dense: why (shown by sparsity_summary).
_LEFT_DENSE = "_sparse_compile_left_dense"


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1x1"``, ``"conv"`` or None for layers we do not mask."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv"
    return None


def _contains_attention(module: nn.Module) -> bool:
    return any(
        isinstance(m, nn.MultiheadAttention) or type(m).__name__.endswith("Attention") for m in module.modules()
    )


def first_transformer_block(model: nn.Module) -> str:
    """Qualified name of the first transformer block (rule in the module docstring)."""
    single = None
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Sequential, nn.ModuleList)):
            children = list(mod.named_children())
            if children and all(_contains_attention(c) for _, c in children):
                first = f"{name}.{children[0][0]}" if name else children[0][0]
                if len(children) >= 2:
                    return first
                if single is None:
                    single = first
    if single is not None:
        return single
    raise ValueError(
        "skip_first_transformer: no transformer block found (looked for an nn.Sequential/nn.ModuleList whose "
        "children all contain an attention module); use filter_fn to choose the layers instead"
    )


def _in_proj_candidates(model, skip_first_transformer, filter_fn):
    """(``"<attention>.in_proj"``, attention) for every nn.MultiheadAttention the rules allow."""
    prefix = first_transformer_block(model) if skip_first_transformer else None
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.MultiheadAttention):
            continue
        if prefix is not None and (name == prefix or name.startswith(prefix + ".")):
            continue
        layer = f"{name}.in_proj" if name else "in_proj"
        if filter_fn is not None and not filter_fn(layer, mod):
            continue
        if mod.in_proj_weight is None:
            raise ValueError(
                f"attention_in_proj=True: {name!r} has separate q/k/v weights (kdim/vdim != embed_dim), no "
                "packed in_proj_weight to mask; leave it out with filter_fn (it gets the layer name "
                f"{layer!r})"
            )
        if parametrize.is_parametrized(mod, "in_proj_weight"):
            raise ValueError(f"layer {layer!r} already has a parametrization on in_proj_weight; finalize() it first")
        out.append((layer, mod))
    return out


def patch_embeddings(model: nn.Module) -> list[str]:
    """Names of the patch embeddings :func:`apply_nm` leaves dense by default (rule in the module docstring)."""
    if not _contains_attention(model):
        return []
    return [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Conv2d)
        and tuple(mod.kernel_size) == tuple(mod.stride)
        and tuple(mod.kernel_size) != (1, 1)
    ]


def _candidates(model, skip_first_transformer, skip_last_layer, filter_fn):
    """(name, module, kind) of the layers the rules allow, in named_modules order."""
    layers = [(n, m, layer_kind(m)) for n, m in model.named_modules()]
    layers = [t for t in layers if t[2] is not None]
    skip = set()
    if skip_last_layer:
        linears = [n for n, _, k in layers if k == "linear"]
        if linears:
            skip.add(linears[-1])
    prefix = None
    if skip_first_transformer:
        prefix = first_transformer_block(model)
    out = []
    for name, mod, kind in layers:
        if name in skip:
            continue
        if prefix is not None and (name == prefix or name.startswith(prefix + ".")):
            continue
        if filter_fn is not None and not filter_fn(name, mod):
            continue
        if parametrize.is_parametrized(mod, "weight"):
            raise ValueError(f"layer {name!r} already has a parametrization on its weight; finalize() it first")
        out.append((name, mod, kind))
    return out


def apply_supermask(
    model: nn.Module,
    linear_sparsity: float = 0.0,
    linear_tile_size: int = 1,
    conv1x1_sparsity: float = 0.0,
    conv1x1_tile_size: int = 1,
    conv_sparsity: float = 0.0,
    conv_tile_size: int = 1,
    skip_first_transformer: bool = False,
    skip_last_layer: bool = False,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    attention_in_proj: bool = False,
) -> list[str]:
    """Register a :class:`Supermask` on the weight of every selected layer; returns their names.

    ``attention_in_proj=True`` also masks every ``nn.MultiheadAttention.in_proj_weight`` with the
    ``linear_*`` settings, one sparsity target for each of q, k and v (:class:`StackedSupermask`;
    module docstring); the embedding dim must be a multiple of ``linear_tile_size``.
    """
    settings = {
        "linear": (linear_sparsity, linear_tile_size),
        "conv1x1": (conv1x1_sparsity, conv1x1_tile_size),
        "conv": (conv_sparsity, conv_tile_size),
    }
    for kind, (s, t) in settings.items():  # validate all, even unused kinds, before touching the model
        if not 0.0 <= float(s) < 1.0:
            raise ValueError(f"{kind}_sparsity must be in [0, 1), got {s}")
        if not isinstance(t, int) or isinstance(t, bool) or t < 1:
            raise ValueError(f"{kind}_tile_size must be an integer >= 1, got {t!r}")
    in_projs = []  # chosen (and checked) before the model is changed
    if attention_in_proj and linear_sparsity > 0.0:
        in_projs = _in_proj_candidates(model, skip_first_transformer, filter_fn)
        for layer, attn in in_projs:
            if attn.embed_dim % linear_tile_size:
                raise ValueError(
                    f"attention_in_proj=True: {layer!r} has embed_dim {attn.embed_dim}, not a multiple of "
                    f"linear_tile_size {linear_tile_size}; q, k and v get one sparsity target each, so a tile may "
                    f"not straddle two of them: choose a tile size dividing {attn.embed_dim}, or leave the layer "
                    "out with filter_fn"
                )
    names = []
    for name, mod, kind in _candidates(model, skip_first_transformer, skip_last_layer, filter_fn):
        sparsity, tile = settings[kind]
        if sparsity == 0.0:
            continue
        w = mod.weight
        p = Supermask(w.shape, sparsity, tile).to(device=w.device)
        parametrize.register_parametrization(mod, "weight", p)
        names.append(name)
    for layer, attn in in_projs:
        w = attn.in_proj_weight
        p = StackedSupermask(w.shape, linear_sparsity, linear_tile_size, parts=3).to(device=w.device)
        parametrize.register_parametrization(attn, "in_proj_weight", p)
        names.append(layer)
    return names


def apply_nm(
    model: nn.Module,
    n: int,
    m: int,
    mode: str = "bidirectional",
    perm_every: int = 100,
    perm_candidates: int = 100,
    decay: float = 2e-4,
    keep_ratio: float | None = None,
    skip_first_transformer: bool = False,
    skip_last_layer: bool = False,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    on_incompatible: str = "dense",
    attention_in_proj: bool = False,
    patch_embedding: bool = False,
    decay_per_sample: bool = False,
) -> list[str]:
    """Register an :class:`NMMask` on the weight of every selected Linear/Conv2d; returns their names.

    ``patch_embedding=True`` also masks a transformer's patch embedding (a ViT's ``conv_proj``),
    which stays dense by default as in the reference DeiT (module docstring).
    ``decay_per_sample=True``: the SR-STE decay of linear layers scales with the batch, as the
    reference DeiT's layer does it (:class:`NMMask`; mode "bidirectional" only).

    ``on_incompatible``: ``"dense"`` (default) leaves layers whose shape cannot hold N:M dense,
    with a warning and a line in :func:`sparsity_summary`; ``"error"`` raises ValueError before
    the model is changed.
    ``attention_in_proj=True`` also masks every ``nn.MultiheadAttention.in_proj_weight``; in mode
    "bidirectional" the attention's input gradient then uses the backward mask (``nm_mask.py``).
    An input projection that cannot hold N:M raises ValueError (it was asked for explicitly).
    """
    if on_incompatible not in ("dense", "error"):
        raise ValueError(f"on_incompatible must be 'dense' or 'error', got {on_incompatible!r}")
    kw = dict(
        mode=mode, perm_every=perm_every, perm_candidates=perm_candidates, decay=decay, keep_ratio=keep_ratio,
        decay_per_sample=decay_per_sample,
    )
    NMMask(n, m, **kw, seed=0)  # validate the arguments
    # Input projections were asked for explicitly: checked first, so an error leaves the model untouched.
    in_projs = _in_proj_candidates(model, skip_first_transformer, filter_fn) if attention_in_proj else []
    for layer, attn in in_projs:
        why = mha_bimask_unsupported(attn) if mode == "bidirectional" else None
        if why is not None:
            raise ValueError(
                f"layer {layer!r}: bidirectional N:M cannot run here: {why}; use mode 'forward', 'post' or "
                "'unstructured', or leave it out with filter_fn"
            )
        try:
            NMMask(n, m, **kw, seed=0).right_inverse(attn.in_proj_weight.detach())
        except ValueError as e:
            raise ValueError(f"layer {layer!r}: {e}") from None
    chosen, misfits, embeddings = [], [], []
    patches = set() if patch_embedding else set(patch_embeddings(model))
    for name, mod, _ in _candidates(model, skip_first_transformer, skip_last_layer, filter_fn):
        if name in patches:
            embeddings.append(mod)
            continue
        reason = _nm_misfit(tuple(mod.weight.shape), m, mode)
        if reason is None:
            chosen.append((name, mod))
        elif on_incompatible == "error":
            raise ValueError(
                f"layer {name!r}: {n}:{m} does not fit: {reason}; leave it dense (on_incompatible='dense', "
                f"filter_fn, skip_last_layer=True) or choose an M that divides it"
            )
        else:
            misfits.append((name, mod, reason))
    if misfits:
        listed = "; ".join(f"{name} ({reason})" for name, _, reason in misfits)
        warnings.warn(
            f"apply_nm {n}:{m}: {len(misfits)} layer(s) cannot hold N:M and stay dense: {listed}. "
            "on_incompatible='error' makes this an error; filter_fn chooses the layers yourself",
            stacklevel=2,
        )
    for name, mod, reason in misfits:
        setattr(mod, _LEFT_DENSE, f"{n}:{m} does not fit: {reason}")
    for mod in embeddings:
        setattr(mod, _LEFT_DENSE, "patch embedding (as the reference DeiT; apply_nm(..., patch_embedding=True) masks it)")
    names = []
    for name, mod in chosen:
        parametrize.register_parametrization(mod, "weight", NMMask(n, m, **kw))
        names.append(name)
    for layer, attn in in_projs:
        parametrize.register_parametrization(attn, "in_proj_weight", NMMask(n, m, **kw))
        names.append(layer)
    return names


def _nm_misfit(shape: tuple[int, ...], m: int, mode: str) -> str | None:
    """Why a weight of ``shape`` cannot hold an N:M mask (None when it can); the checks of ``NMMask.right_inverse``."""
    if len(shape) < 2:
        return f"weight of shape {shape} has fewer than 2 dims"
    if mode == "unstructured":
        return None
    reduction = math.prod(shape[1:])
    if reduction % m:
        return f"reduction dim {reduction} not divisible by M={m}"
    if mode == "bidirectional" and shape[0] % m:
        return f"output dim {shape[0]} not divisible by M={m} (the bidirectional backward mask groups outputs)"
    return None


def _our_plists(model: nn.Module):
    """(name, module, tensor_name, ParametrizationList) for every parametrization list holding one of ours."""
    for name, mod in model.named_modules():
        if not parametrize.is_parametrized(mod):
            continue
        for tname, plist in mod.parametrizations.items():
            if any(isinstance(p, OURS) for p in plist):
                yield name, mod, tname, plist


def post_step_projection(model: nn.Module) -> None:
    """Set pruned weights to zero for every ``NMMask(mode="post")`` (Bi-Mask fork's m4).

    Call it after every ``optimizer.step()``::

        loss.backward(); optimizer.step(); post_step_projection(model)

    Layers in other modes are left alone.
    """
    for _, _, _, plist in list(_our_plists(model)):
        for p in plist:
            if isinstance(p, NMMask) and p.mode == "post":
                _post_project(p, plist.original)


def finalize(model: nn.Module) -> nn.Module:
    """Remove every parametrization list that holds a Supermask/NMMask, leaving ``W * mask`` in the tensor.

    In place (``remove_parametrizations(..., leave_parametrized=True)``); returns ``model``. The
    module gets its original class (and forward) back once it has no parametrization left.
    """
    with torch.no_grad():
        for _, mod, tname, plist in list(_our_plists(model)):
            for p in plist:
                if isinstance(p, NMMask):
                    p._hooked = None  # its grad hook on the (kept) tensor stops counting
            parametrize.remove_parametrizations(mod, tname, leave_parametrized=True)
    return model


def _describe(plist) -> tuple[str, float]:
    p = plist[0]
    if isinstance(p, StackedSupermask):
        return f"supermask tile={p.tile_size} per q/k/v", p.sparsity
    if isinstance(p, Supermask):
        return f"supermask tile={p.tile_size}", p.sparsity
    if isinstance(p, NMMask):
        if p.mode == "unstructured":
            return f"unstructured keep={p.keep_ratio:g}", p.target_sparsity
        return f"{p.n}:{p.m} {p.mode}", p.target_sparsity
    return type(p).__name__, float("nan")


@torch.no_grad()
def sparsity_summary(model: nn.Module, include_dense: bool = False) -> list[dict]:
    """One dict per masked layer: name, kind, shape, method, target_sparsity, sparsity.

    ``sparsity`` is the measured fraction of zeros of the effective weight (``W * mask``).
    Layers :func:`apply_nm` had to leave dense are listed too, with method ``"dense: <why>"``.
    ``include_dense=True`` also lists the other Linear/Conv2d layers without a mask (method "dense").
    """
    rows = []
    for name, mod in model.named_modules():
        in_proj = _in_proj_row(name, mod, include_dense)
        if in_proj is not None:
            rows.append(in_proj)
        kind = layer_kind(mod)
        if kind is None:
            continue
        ours = parametrize.is_parametrized(mod, "weight") and any(
            isinstance(p, OURS) for p in mod.parametrizations["weight"]
        )
        left_dense = getattr(mod, _LEFT_DENSE, None)
        if not ours and left_dense is None and not include_dense:
            continue
        w = mod.weight
        if ours:
            method, target = _describe(mod.parametrizations["weight"])
        else:
            method, target = ("dense" if left_dense is None else f"dense: {left_dense}"), 0.0
        rows.append(
            {
                "name": name,
                "kind": kind,
                "shape": tuple(w.shape),
                "method": method,
                "target_sparsity": float(target),
                "sparsity": float((w == 0).sum().item() / max(1, w.numel())),
            }
        )
    return rows


def _in_proj_row(name: str, mod: nn.Module, include_dense: bool) -> dict | None:
    """The :func:`sparsity_summary` row of an attention's packed input projection, ``<name>.in_proj``."""
    if not isinstance(mod, nn.MultiheadAttention) or mod.in_proj_weight is None:
        return None
    ours = parametrize.is_parametrized(mod, "in_proj_weight") and any(
        isinstance(p, OURS) for p in mod.parametrizations["in_proj_weight"]
    )
    if not ours and not include_dense:
        return None
    w = mod.in_proj_weight
    method, target = _describe(mod.parametrizations["in_proj_weight"]) if ours else ("dense", 0.0)
    return {
        "name": f"{name}.in_proj" if name else "in_proj",
        "kind": "linear",
        "shape": tuple(w.shape),
        "method": method,
        "target_sparsity": float(target),
        "sparsity": float((w == 0).sum().item() / max(1, w.numel())),
    }


def format_sparsity_summary(model_or_rows, include_dense: bool = False) -> str:
    """:func:`sparsity_summary` as a text table (tabulate); accepts a model or the rows.

    The one table of the project: the train/evaluate programs print it too.
    """
    from tabulate import tabulate

    rows = model_or_rows
    if isinstance(model_or_rows, nn.Module):
        rows = sparsity_summary(model_or_rows, include_dense=include_dense)
    if not rows:
        return "(no masked layers)"
    # Column 0 (the name) is not parsed as a number: nn.Sequential names such as "0" or "1.0" stay
    # text instead of becoming 0.0000 / 1.0000.
    return tabulate(rows, headers="keys", floatfmt=".4f", disable_numparse=[0])
