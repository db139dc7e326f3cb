"""Evaluate a (sparse) torchvision classifier on ``<data-path>/val``.

Give the sparsity flags the checkpoint was trained with, so the model gets the same mask
parametrizations and the checkpoint loads::

    # online sparsification: masks recomputed every forward
    python -m sparse_compile.training.evaluate --model vit_b_16 --data-path /data/imagenet \\
        --sparsity-linear 0.9 --sp-linear-tile-size 32 --weights-path runs/vit90/checkpoint.pth
    # offline sparsification (W * mask folded into W once), then the sparse backend with BSR 32
    ... --sparsify-weights --bsr 32
    # convert every layer the backend supports, however dense (default: at most 40% of blocks kept)
    ... --sparsify-weights --bsr 32 --density-threshold 1

``--bsr`` and ``--density-threshold`` are checked by the backend's own option rules
(``sparse_compile.options.SparseOptions``) and the backend is looked up before any data is
read; a missing backend is an error, never a silent dense run.

``torchrun --nproc_per_node=N -m sparse_compile.training.evaluate ...`` splits the validation
images over N processes; every image is counted once.
"""

from __future__ import annotations

import argparse
import time

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
    parser.add_argument(
        "--density-threshold",
        default=None,
        type=_density_threshold,
        metavar="D",
        help="with --bsr: 'auto' (the backend's default: each layer timed, the faster way kept) or a "
        "number in [0, 1]: a layer becomes BSR when at most this fraction of its blocks hold a nonzero "
        "(1 converts every supported layer)",
    )
    cli_args.add_sparsity_args(parser)
    return parser


def _density_threshold(text: str) -> float | str:
    """``--density-threshold``: ``"auto"`` or a number; the range is the backend's to check."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in [0, 1] (or 'auto')") from None


def load_weights(model: nn.Module, path: str) -> None:
    """Load into ``model``: a train checkpoint (``{"model": ...}``), a plain state_dict, or a
    pytorch-labs/superblock checkpoint (its ``L.scores``/``L.scale``/``L.shift`` layout).

    When neither layout fits, the error shows why for both (the SuperBlock loader's reason names
    e.g. a tile size that does not match the checkpoint's scores).
    """
    from sparse_compile.training.checkpoint import load_checkpoint_file, load_superblock_checkpoint, model_state_dict

    try:
        state = model_state_dict(load_checkpoint_file(path))
    except TypeError as e:
        raise ValueError(f"--weights-path {path}: {e}") from None
    try:
        model.load_state_dict(state)
        return
    except RuntimeError as e:
        ours = e
    try:  # SuperBlock's own layout, mapped onto our parametrizations
        load_superblock_checkpoint(model, state, strict=True)
    except (KeyError, ValueError, TypeError) as e:
        superblock = e
    else:
        D.print_main(f"Loaded {path} as a SuperBlock checkpoint")
        return
    raise RuntimeError(
        f"--weights-path {path} does not fit the model built from the flags: pass the sparsity flags "
        "(--sparsity-linear, --sp-linear-tile-size, --nm, ...) it was trained with.\n"
        f"As a sparse_compile checkpoint: {ours}\n"
        f"As a SuperBlock checkpoint: {superblock}"
    ) from None


def sparse_backend_options(args: argparse.Namespace) -> dict:
    """``options=`` for ``torch.compile(backend="sparse")`` from ``--bsr`` / ``--density-threshold``,
    validated by the backend's own rules (``ValueError``/``TypeError`` that name the fix)."""
    from sparse_compile.options import SparseOptions

    options = {"blocksize": args.bsr}
    if args.density_threshold is not None:
        options["density_threshold"] = args.density_threshold
    SparseOptions.from_user(options)
    return options


def require_sparse_backend() -> None:
    """Raise unless ``torch.compile`` can find the ``sparse`` backend: ``--bsr`` never runs dense silently."""
    from torch._dynamo.backends.registry import lookup_backend

    try:
        lookup_backend("sparse")
    except Exception as e:  # not registered, or its entry point does not import
        raise RuntimeError(
            f"--bsr needs the 'sparse' torch.compile backend, which is not available ({type(e).__name__}: {e}); "
            "install sparse_compile (pip install -e .) so that its entry point registers it, or leave out --bsr "
            "to evaluate dense"
        ) from e


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (console script, ``python -m``, ``torchrun -m``)."""
    run(argv)


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` and run; returns ``{"acc1", "acc5", "time_s", "compiled", "bsr_layers"}`` (for tests and scripts).

    ``bsr_layers``: how many linear layers the sparse backend converted (0 without ``--bsr``).
    """
    parser = get_args_parser()
    args = parser.parse_args(argv)
    cli_args.check_sparsity_args(args, parser)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    # Everything that can be wrong with the flags or the backend is found before any data is read.
    args.sparse_options = None
    if args.density_threshold is not None and args.bsr is None:
        parser.error("--density-threshold only applies with --bsr (the sparse backend): add --bsr N")
    if args.bsr is not None:
        try:
            args.sparse_options = sparse_backend_options(args)
        except (ValueError, TypeError) as e:
            flags = f"--bsr {args.bsr}"
            if args.density_threshold is not None:
                flags += f" --density-threshold {args.density_threshold}"
            parser.error(f"{flags}: {e}")
        require_sparse_backend()
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

    if args.bsr is not None:
        model = torch.compile(model, backend="sparse", options=args.sparse_options)

    start = time.time()
    with torch.no_grad():
        acc1, acc5 = evaluate(model, loader, device, args.print_freq, amp=args.amp)
    elapsed = time.time() - start  # the "Test:  Total time" line is printed by evaluate()
    bsr_layers = 0
    if args.bsr is not None:
        import sparse_compile

        report = sparse_compile.report(model)
        bsr_layers = len(report.sparse_layers)
        D.print_main(report)
    return {"acc1": acc1, "acc5": acc5, "time_s": elapsed, "compiled": args.bsr is not None, "bsr_layers": bsr_layers}


if __name__ == "__main__":
    main()
