"""Checkpoints: saving safely, reading them back, and import of pytorch-labs/superblock checkpoints.

- :func:`atomic_save`: ``torch.save`` to a temporary file in the same folder, then ``os.replace``:
  a crash mid-save leaves the previous checkpoint whole. The train program saves plain data only
  (tensors, numbers, strings, lists, dicts: its ``args`` as a dict), so every checkpoint loads
  with ``torch.load(..., weights_only=True)``, which is how this package loads them.
- :func:`load_checkpoint_file`: ``torch.load(path, weights_only=True)``; SuperBlock's and
  torchvision-reference checkpoints store ``args`` as an ``argparse.Namespace``, the one class
  allowed beyond plain data.
- :func:`model_state_dict`: the model's state dict inside a checkpoint, without the ``module.``
  (DDP) and ``_orig_mod.`` (``torch.compile``) prefixes that wrapped models add to every key.

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

import argparse
import contextlib
import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn as nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present
from torch.nn.utils import parametrize

from sparse_compile.training.supermask import Supermask

__all__ = ["load_superblock_checkpoint", "atomic_save", "load_checkpoint_file", "model_state_dict"]

# DDP / DataParallel, torch.compile. Wrappers nest (DDP around a compiled model gives
# "module._orig_mod."), so they are stripped until no key starts with one.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def atomic_save(obj, path) -> None:
    """``torch.save(obj, path)`` that never leaves a half-written ``path``: temp file, fsync, ``os.replace``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows when both are on one file system
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_checkpoint_file(path) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)``, allowing SuperBlock's ``argparse.Namespace`` args."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def model_state_dict(obj) -> "OrderedDict[str, torch.Tensor]":
    """The model state dict in a checkpoint (train's ``{"model": ...}`` layout) or a bare state
    dict, as a new dict without wrapper prefixes (``module.``, ``_orig_mod.``, nested)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state dict or a checkpoint dict with a 'model' entry, got {type(obj).__name__}")
    state = OrderedDict(obj)
    while any(key.startswith(_WRAPPER_PREFIXES) for key in state):
        for prefix in _WRAPPER_PREFIXES:
            consume_prefix_in_state_dict_if_present(state, prefix)
    return state


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
        obj = load_checkpoint_file(state_dict_or_path)
    else:
        obj = state_dict_or_path
    sd = model_state_dict(obj)
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
