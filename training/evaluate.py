"""Evaluate a (sparse) torchvision classifier on ``<data-path>/val``.

Give the sparsity flags the checkpoint was trained with, so the model gets the same mask
parametrizations and the checkpoint loads::

    # online sparsification: masks recomputed every forward
    python -m sparse_compile.training.evaluate --model vit_b_16 --data-path /data/imagenet \\
        --sparsity-linear 0.9 --sp-linear-tile-size 32 --weights-path runs/vit90/checkpoint.pth
    # offline sparsification (W * mask folded into W once), then the sparse backend with BSR 32
    ... --sparsify-weights --bsr 32

``torchrun --nproc_per_node=N -m sparse_compile.training.evaluate ...`` splits the validation
images over N processes; every image is counted once.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn as nn

from sparse_compile.training import cli_args, data
from sparse_compile.training import distributed as D


def accuracy_counts(output: torch.Tensor, target: torch.Tensor, topk=(1, 5)) -> list[int]:
    """Number of samples whose target is among the top-k outputs, for each k (k capped at #classes)."""
    maxk = min(max(topk), output.shape[1])
    pred = output.topk(maxk, dim=1).indices  # [B, maxk]
    hit = pred.eq(target[:, None])
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in topk]


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, device: torch.device, print_freq: int = 100, amp: bool = False, header: str = "Test: "
) -> tuple[float, float]:
    """Acc@1 and Acc@5 in percent over the whole loader (summed over processes)."""
    model.eval()
    logger = D.MetricLogger()
    correct1 = correct5 = total = 0
    for image, target in logger.log_every(loader, print_freq, header):
        image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            output = model(image)
        c1, c5 = accuracy_counts(output.float(), target)
        correct1, correct5, total = correct1 + c1, correct5 + c5, total + image.shape[0]
        logger.update(n=image.shape[0], acc1=100.0 * c1 / image.shape[0], acc5=100.0 * c5 / image.shape[0])
    correct1, correct5, total = D.all_reduce_sum([correct1, correct5, total], device)
    if total == 0:
        raise ValueError("the validation set is empty")
    acc1, acc5 = 100.0 * correct1 / total, 100.0 * correct5 / total
    D.print_main(f"{header} Acc@1 {acc1:.3f} Acc@5 {acc5:.3f}")
    return acc1, acc5


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-compile-evaluate", description="Evaluate a sparse torchvision classifier", add_help=add_help
    )
    parser.add_argument("--data-path", required=True, help="ImageFolder root; val/ is used")
    parser.add_argument("--weights-path", default=None, help="checkpoint.pth from train, or a plain state_dict")
    cli_args.add_model_args(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("-b", "--batch-size", default=256, type=int)
    parser.add_argument("-j", "--workers", default=4, type=int)
    parser.add_argument("--print-freq", default=100, type=int)
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument(
        "--sparsify-weights", action="store_true", help="offline sparsification: fold W * mask into W (finalize)"
    )
    parser.add_argument(
        "--bsr",
        default=None,
        type=int,
        metavar="N",
        help="compile with the sparse backend, block size N (implies --sparsify-weights); best equal to the tile size",
    )
    cli_args.add_sparsity_args(parser)
    return parser


def load_weights(model: nn.Module, path: str) -> None:
    """Load into ``model``: a train checkpoint (``{"model": ...}``), a plain state_dict, or a
    pytorch-labs/superblock checkpoint (its ``L.scores``/``L.scale``/``L.shift`` layout)."""
    from sparse_compile.training import load_superblock_checkpoint

    obj = torch.load(path, map_location="cpu", weights_only=False)
    state = obj["model"] if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(state, dict):
        raise ValueError(f"--weights-path {path}: expected a state_dict or a checkpoint with a 'model' entry")
    state = {_strip_wrappers(k): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
        return
    except RuntimeError as e:
        ours = e
    try:  # SuperBlock's own layout, mapped onto our parametrizations
        load_superblock_checkpoint(model, state, strict=True)
        D.print_main(f"Loaded {path} as a SuperBlock checkpoint")
        return
    except Exception:  # noqa: BLE001 - the first error is the informative one
        pass
    hint = (
        "the model's parametrizations do not match the checkpoint: pass the sparsity flags "
        "(--sparsity-linear, --sp-linear-tile-size, --nm, ...) it was trained with"
    )
    raise RuntimeError(f"--weights-path {path}: {hint}\n{ours}") from None


def _strip_wrappers(key: str) -> str:
    """Drop ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return key


def compile_sparse(model: nn.Module, blocksize: int) -> tuple[nn.Module, bool]:
    """``torch.compile(model, backend="sparse")``; falls back to the dense model if the backend is missing."""
    try:
        from torch._dynamo.backends.registry import lookup_backend

        lookup_backend("sparse")
    except Exception as e:  # not registered, or its entry point does not import
        warnings.warn(
            f"the 'sparse' torch.compile backend is not available ({type(e).__name__}: {e}); "
            "--bsr is ignored and the model runs DENSE (eager)",
            stacklevel=2,
        )
        D.print_main("WARNING: 'sparse' backend not found: evaluating the dense (eager) model, no BSR")
        return model, False
    return torch.compile(model, backend="sparse", options={"blocksize": blocksize}), True


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (console script, ``python -m``, ``torchrun -m``)."""
    run(argv)


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` and run; returns ``{"acc1", "acc5", "time_s", "compiled"}`` (for tests and scripts)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    cli_args.check_sparsity_args(args, parser)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.bsr is not None and args.bsr < 1:
        parser.error(f"--bsr {args.bsr}: block size must be >= 1")
    info = D.init_distributed(args.device)
    try:
        return _run(args, info)
    finally:
        D.cleanup(info)


def _run(args: argparse.Namespace, info: D.DistInfo) -> dict:
    from sparse_compile.training import finalize

    device = info.device
    D.print_main(f"sparse-compile-evaluate: world_size={info.world_size} device={device}")
    D.print_main(args)
    val_set = data.image_folder(args.data_path, "val", data.val_transform(args.image_size, args.val_resize_size))
    loader = data.make_loader(val_set, args.batch_size, D.ShardSampler(val_set), args.workers, device)

    model = cli_args.build_model(args, args.num_classes or len(val_set.classes))
    cli_args.apply_sparsity(model, args)
    if args.weights_path:
        load_weights(model, args.weights_path)
    else:
        D.print_main("WARNING: no --weights-path: evaluating random weights")
    model.to(device).eval()
    table = cli_args.sparsity_table(model)
    if table:
        D.print_main(table)

    if args.sparsify_weights or args.bsr is not None:
        if args.bsr is not None and not args.sparsify_weights:
            D.print_main("--bsr implies --sparsify-weights: folding the masks into the weights first")
        model = finalize(model)
        D.print_main("Offline sparsification: masks folded into the weights")

    compiled = False
    if args.bsr is not None:
        model, compiled = compile_sparse(model, args.bsr)

    start = time.time()
    with torch.no_grad():
        acc1, acc5 = evaluate(model, loader, device, args.print_freq, amp=args.amp)
    elapsed = time.time() - start  # the "Test:  Total time" line is printed by evaluate()
    if compiled:
        import sparse_compile

        if hasattr(sparse_compile, "report"):
            D.print_main(sparse_compile.report(model))
    return {"acc1": acc1, "acc5": acc5, "time_s": elapsed, "compiled": compiled}


if __name__ == "__main__":
    main()
