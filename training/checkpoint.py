"""Checkpoints: our own round trip, and import of pytorch-labs/superblock checkpoints.

Our parametrized models round-trip through the ordinary ``model.state_dict()`` /
``model.load_state_dict()`` once the same masks have been applied to the new model (same
``apply_supermask``/``apply_nm`` call). Keys per masked layer ``L``:

- ``L.parametrizations.weight.original``: the dense weight ``W``;
- Supermask: ``L.parametrizations.weight.0.scores`` (sparsity and tile size are configuration);
- NMMask bidirectional: ``L.parametrizations.weight.0.perm`` (the permutation buffer) and
  ``L.parametrizations.weight.0._extra_state`` (forward-pass and search counters, seed).
  The forward mask is recomputed from ``W``, so it needs no key.

SuperBlock's ``SupermaskLinear``/``SupermaskConv2d`` replace the module and store, per layer
``L``: ``L.weight``, ``L.bias``, ``L.scores``, ``L.scale``, ``L.shift``. Its effective weight is
``(weight * scale + shift) * mask(scores)`` with one-element ``scale``/``shift`` (1 and 0 unless it
quantized the weights). :func:`load_superblock_checkpoint` maps:

- ``L.weight * L.scale + L.shift`` -> ``L.parametrizations.weight.original`` (folded once: the
  same effective weight, ``scale``/``shift`` are frozen in the reference);
- ``L.scores`` -> ``L.parametrizations.weight.0.scores`` (shapes must agree: the model must have
  been given the same tile sizes; the sparsity is taken from the model, the checkpoint has none);
- every other key unchanged (``L.bias``, norms, dense layers...).

One behavioural difference to know for ViT checkpoints: SuperBlock also replaced
``self_attention.out_proj`` by a ``SupermaskLinear``, but ``nn.MultiheadAttention`` reads
``out_proj.weight`` directly and never calls that module's forward, so SuperBlock trained and
evaluated ``out_proj`` *dense* (its ``scores`` are in the checkpoint but were never used). Our
parametrization does mask ``out_proj``. To reproduce SuperBlock's numbers exactly, leave those
layers dense: ``apply_supermask(..., filter_fn=lambda name, m: not name.endswith("out_proj"))`` and
load with ``strict=False`` (their ``scores``/``scale``/``shift`` are then unused).

SuperBlock never masked ``nn.MultiheadAttention.in_proj_weight``, so its checkpoints have no
scores for it. A model built with ``apply_supermask(..., attention_in_proj=True)`` still loads
one: each such in_proj Supermask is removed (the attention's ``in_proj_weight`` becomes the dense
checkpoint weight), with a warning naming the layers.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from sparse_compile.training.supermask import Supermask

__all__ = ["load_superblock_checkpoint"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _unwrap(obj) -> dict:
    """The model state dict inside a checkpoint file/dict (torchvision-references layout or bare)."""
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise TypeError(f"expected a state dict or a checkpoint dict with a 'model' entry, got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def _leave_in_proj_dense(model: nn.Module) -> None:
    """Drop the Supermask of every attention in_proj: SuperBlock has no scores for it (module docstring)."""
    dropped = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention) and parametrize.is_parametrized(mod, "in_proj_weight"):
            if any(isinstance(p, Supermask) for p in mod.parametrizations["in_proj_weight"]):
                parametrize.remove_parametrizations(mod, "in_proj_weight", leave_parametrized=False)
                dropped.append(f"{name}.in_proj")
    if dropped:
        warnings.warn(
            f"SuperBlock checkpoints have no scores for attention input projections: {len(dropped)} in_proj "
            f"layers ({dropped[0]}, ...) are left dense (apply_supermask without attention_in_proj, or the "
            "CLIs without --attention-in-proj, to silence this)",
            stacklevel=3,
        )


def load_superblock_checkpoint(model: nn.Module, state_dict_or_path, strict: bool = True) -> nn.Module:
    """Load a SuperBlock checkpoint (path, checkpoint dict or state dict) into our parametrized ``model``.

    ``model`` must already carry Supermasks where the checkpoint has ``scores`` (apply the same
    ``apply_supermask`` settings first). With ``strict`` every model key must be filled and every
    checkpoint key used. Returns ``model``.
    """
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        obj = torch.load(state_dict_or_path, map_location="cpu", weights_only=True)
    else:
        obj = state_dict_or_path
    sd = _unwrap(obj)
    _leave_in_proj_dense(model)
    used: set[str] = set()
    new_sd: dict[str, torch.Tensor] = {}
    target = model.state_dict()
    supermask_layers = {}
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            for tname, plist in mod.parametrizations.items():
                supermask_layers[(name, tname)] = plist
    for key, ours in target.items():
        src = key
        parts = key.split(".")
        if "parametrizations" in parts:
            i = parts.index("parametrizations")
            layer, tname, rest = ".".join(parts[:i]), parts[i + 1], parts[i + 2 :]
            pre = f"{layer}." if layer else ""
            plist = supermask_layers.get((layer, tname))
            if rest == ["original"]:
                src = f"{pre}{tname}"
                if src not in sd:
                    continue
                w = sd[src]
                if isinstance(plist[0], Supermask) and f"{pre}scale" in sd:
                    w = w * sd[f"{pre}scale"] + sd[f"{pre}shift"]
                    used.update({f"{pre}scale", f"{pre}shift"})
                new_sd[key] = w.to(ours.dtype)
                used.add(src)
                continue
            if rest == ["0", "scores"]:
                src = f"{pre}scores"
                if src not in sd:
                    continue
                if tuple(sd[src].shape) != tuple(ours.shape):
                    raise ValueError(
                        f"{layer}: checkpoint scores have shape {tuple(sd[src].shape)}, the model's Supermask "
                        f"{tuple(ours.shape)}: apply_supermask with the tile size the checkpoint was trained with"
                    )
                new_sd[key] = sd[src].to(ours.dtype)
                used.add(src)
                continue
            # our own state with no SuperBlock counterpart (NMMask perm/counters): keep it
            new_sd[key] = ours
            continue
        if src in sd:
            new_sd[key] = sd[src]
            used.add(src)
    if strict:
        missing = [k for k in target if k not in new_sd]
        unused = [k for k in sd if k not in used]
        if missing or unused:
            hint = ""
            if any(k.endswith(".scores") for k in unused):
                hint = " (checkpoint layers with 'scores' need a Supermask in the model: call apply_supermask first)"
            raise KeyError(f"SuperBlock checkpoint does not match the model: missing {missing}, unused {unused}{hint}")
    model.load_state_dict(new_sd, strict=False)
    return model
