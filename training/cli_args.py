"""The sparsity flags shared by ``train`` and ``evaluate``, their checks, and applying them.

Supermask flags are the SuperBlock seed's, spelled exactly as there (``--sparsity-linear``,
``--sp-linear-tile-size``, ...). N:M (Bi-Mask) flags: ``--nm N:M``, ``--mask-mode``,
``--perm-every``, ``--perm-candidates``, ``--nm-decay``, ``--keep-ratio``, ``--nm-decay-per-sample``,
``--nm-patch-embedding``. The two families
are exclusive: a layer gets one mask parametrization.

``evaluate`` must be given the flags the checkpoint was trained with, so that the model it
builds has the same parametrizations (and so the same state-dict keys) as the saved one.
"""

from __future__ import annotations

import argparse
import json

import torch.nn as nn

from sparse_compile.training.nm_mask import check_nm

MASK_MODES = ("bidirectional", "forward", "post", "unstructured")

_SUPERMASK_SPARSITY_FLAGS = (
    ("sparsity_linear", "--sparsity-linear"),
    ("sparsity_conv1x1", "--sparsity-conv1x1"),
    ("sparsity_conv", "--sparsity-conv"),
)
_TILE_FLAGS = (
    ("sp_linear_tile_size", "--sp-linear-tile-size"),
    ("sp_conv1x1_tile_size", "--sp-conv1x1-tile-size"),
    ("sp_conv_tile_size", "--sp-conv-tile-size"),
)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        default="resnet18",
        help="torchvision classification model name (resnet18, vit_b_16, ...), or a torchvision.models "
        "class taking keyword arguments only (VisionTransformer) for small test models",
    )
    g.add_argument(
        "--model-kwargs",
        default="{}",
        type=_json_dict,
        help='JSON dict of extra constructor arguments, e.g. \'{"patch_size":4,"num_layers":1,"num_heads":2,'
        '"hidden_dim":32,"mlp_dim":64}\' with --model VisionTransformer',
    )
    g.add_argument("--image-size", default=224, type=int, help="crop size fed to the model (ViTs are built for it)")
    g.add_argument(
        "--val-resize-size", default=None, type=int, help="resize before the centre crop (default image-size / 0.875)"
    )
    g.add_argument("--num-classes", default=None, type=int, help="classifier outputs (default: classes in the data)")


def add_sparsity_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Supermask (tile-wise learned masks, SuperBlock flags)")
    g.add_argument("--sparsity-linear", type=float, default=0.0, help="fraction of each linear weight masked")
    g.add_argument("--sp-linear-tile-size", type=int, default=1, help="tile edge of linear masks")
    g.add_argument("--sparsity-conv1x1", type=float, default=0.0, help="fraction of each 1x1 conv weight masked")
    g.add_argument("--sp-conv1x1-tile-size", type=int, default=1, help="tile edge of 1x1 conv masks")
    g.add_argument("--sparsity-conv", type=float, default=0.0, help="fraction of each other conv weight masked")
    g.add_argument("--sp-conv-tile-size", type=int, default=1, help="tile edge of the other conv masks")
    g.add_argument("--skip-last-layer-sparsity", action="store_true", help="leave the classifier dense")
    g.add_argument(
        "--skip-first-transformer-sparsity", action="store_true", help="leave the first transformer block dense"
    )
    g.add_argument(
        "--attention-in-proj",
        action="store_true",
        help="also mask each nn.MultiheadAttention's packed q/k/v projection (in_proj_weight) with the linear "
        "settings or --nm (SuperBlock leaves it dense); evaluate needs it when the checkpoint was trained with it",
    )

    g = parser.add_argument_group("N:M masks (Bi-Mask)")
    g.add_argument("--nm", type=str, default=None, metavar="N:M", help="N:M mask on linear and conv layers, e.g. 2:4")
    g.add_argument(
        "--mask-mode",
        choices=MASK_MODES,
        default=None,
        help="bidirectional (Bi-Mask, default), forward (mask only in forward), post (project weights after each "
        "optimizer step), unstructured (magnitude top-k keeping --keep-ratio)",
    )
    g.add_argument("--perm-every", type=int, default=100, help="steps between permutation searches (bidirectional)")
    g.add_argument("--perm-candidates", type=int, default=100, help="random permutations tried per search")
    g.add_argument("--nm-decay", type=float, default=2e-4, help="SR-STE decay on pruned weights")
    g.add_argument(
        "--nm-decay-per-sample",
        action="store_true",
        help="add the SR-STE decay of linear layers once per sample, as the reference DeiT (effective decay: "
        "per-process batch x --nm-decay; bidirectional only)",
    )
    g.add_argument(
        "--nm-patch-embedding", action="store_true", help="also mask a transformer's patch embedding (dense by default, as the reference DeiT)"
    )
    g.add_argument("--keep-ratio", type=float, default=None, help="fraction kept by --mask-mode unstructured")


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"num_layers\": 1}'")
    return value


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; raises ``ValueError`` with the reason otherwise."""
    parts = text.split(":")
    if len(parts) != 2:
        raise ValueError(f"--nm {text!r}: expected N:M, e.g. 2:4")
    try:
        n, m = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"--nm {text!r}: N and M must be integers, e.g. 2:4") from None
    try:
        check_nm(n, m)  # the rule NMMask applies, so the flag and the class never disagree
    except ValueError as e:
        raise ValueError(f"--nm {text!r}: {e}") from None
    return n, m


def uses_supermask(args: argparse.Namespace) -> bool:
    return any(getattr(args, name) > 0 for name, _ in _SUPERMASK_SPARSITY_FLAGS)


def check_sparsity_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Reject contradictory or out-of-range flags through ``parser.error`` (exit status 2)."""
    for name, flag in _SUPERMASK_SPARSITY_FLAGS:
        value = getattr(args, name)
        if not 0.0 <= value < 1.0:
            parser.error(f"{flag} {value}: must be in [0, 1)")
    for name, flag in _TILE_FLAGS:
        if getattr(args, name) < 1:
            parser.error(f"{flag} {getattr(args, name)}: must be >= 1")

    if getattr(args, "attention_in_proj", False) and args.nm is None and args.sparsity_linear == 0:
        parser.error("--attention-in-proj masks in_proj with the linear settings: add --sparsity-linear or --nm N:M")

    if args.nm is None:
        given = [
            flag
            for flag, changed in (
                ("--mask-mode", args.mask_mode is not None),
                ("--keep-ratio", args.keep_ratio is not None),
            )
            if changed
        ]
        if given:
            parser.error(f"{', '.join(given)} only apply to N:M masks: add --nm N:M (e.g. --nm 2:4)")
        return

    try:
        args.nm_tuple = parse_nm(args.nm)
    except ValueError as e:
        parser.error(str(e))
    if uses_supermask(args):
        flags = [f"{flag} {getattr(args, n)}" for n, flag in _SUPERMASK_SPARSITY_FLAGS if getattr(args, n) > 0]
        parser.error(
            f"--nm {args.nm} cannot be combined with Supermask sparsity ({', '.join(flags)}): "
            "a layer gets one kind of mask; choose N:M or Supermask"
        )
    if args.mask_mode is None:
        args.mask_mode = "bidirectional"
    if args.keep_ratio is not None:
        if args.mask_mode != "unstructured":
            parser.error(f"--keep-ratio only applies to --mask-mode unstructured (got --mask-mode {args.mask_mode})")
        if not 0.0 < args.keep_ratio <= 1.0:
            parser.error(f"--keep-ratio {args.keep_ratio}: must be in (0, 1]")
    if args.perm_every < 1 or args.perm_candidates < 1:
        parser.error("--perm-every and --perm-candidates must be >= 1")
    if args.nm_decay < 0:
        parser.error(f"--nm-decay {args.nm_decay}: must be >= 0")


def apply_sparsity(model: nn.Module, args: argparse.Namespace) -> list[str]:
    """Parametrize ``model`` as the flags say; returns the names of the masked layers."""
    from sparse_compile.training import apply_nm, apply_supermask

    if args.nm is not None:
        n, m = parse_nm(args.nm)
        return apply_nm(
            model,
            n,
            m,
            mode=args.mask_mode or "bidirectional",
            perm_every=args.perm_every,
            perm_candidates=args.perm_candidates,
            decay=args.nm_decay,
            keep_ratio=args.keep_ratio,
            skip_first_transformer=args.skip_first_transformer_sparsity,
            skip_last_layer=args.skip_last_layer_sparsity,
            attention_in_proj=getattr(args, "attention_in_proj", False),
            patch_embedding=getattr(args, "nm_patch_embedding", False),
            decay_per_sample=getattr(args, "nm_decay_per_sample", False),
        )
    if uses_supermask(args):
        return apply_supermask(
            model,
            linear_sparsity=args.sparsity_linear,
            linear_tile_size=args.sp_linear_tile_size,
            conv1x1_sparsity=args.sparsity_conv1x1,
            conv1x1_tile_size=args.sp_conv1x1_tile_size,
            conv_sparsity=args.sparsity_conv,
            conv_tile_size=args.sp_conv_tile_size,
            skip_first_transformer=args.skip_first_transformer_sparsity,
            skip_last_layer=args.skip_last_layer_sparsity,
            attention_in_proj=getattr(args, "attention_in_proj", False),
        )
    return []


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """A randomly initialised torchvision classifier for ``num_classes`` classes.

    ``--model`` is a registered name (``torchvision.models.get_model``) or, for tiny test
    models, a ``torchvision.models`` class built from ``--model-kwargs`` alone.
    """
    import torchvision.models as tvm

    kwargs = dict(args.model_kwargs)
    kwargs.setdefault("num_classes", num_classes)
    is_vit = args.model.startswith("vit_") or args.model == "VisionTransformer"
    if is_vit:
        kwargs.setdefault("image_size", args.image_size)
    if args.model in tvm.list_models(module=tvm):
        return tvm.get_model(args.model, weights=None, **kwargs)
    cls = getattr(tvm, args.model, None)
    if isinstance(cls, type) and issubclass(cls, nn.Module):
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ValueError(f"--model {args.model} with --model-kwargs {json.dumps(args.model_kwargs)}: {e}") from None
    raise ValueError(
        f"--model {args.model!r} is not a torchvision classification model; "
        f"choose one of: {', '.join(tvm.list_models(module=tvm))}"
    )


def sparsity_table(model: nn.Module) -> str:
    """The per-layer sparsity summary (:func:`~sparse_compile.training.format_sparsity_summary`), or "" when nothing is masked."""
    from sparse_compile.training import format_sparsity_summary, sparsity_summary

    rows = sparsity_summary(model)
    return format_sparsity_summary(rows) if rows else ""
