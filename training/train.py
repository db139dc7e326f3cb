"""Train a torchvision classifier with Supermask or N:M masks (torchvision-references style).

Single process::

    python -m sparse_compile.training.train --model vit_b_16 --data-path /data/imagenet \\
        --sparsity-linear 0.9 --sp-linear-tile-size 32 --output-dir runs/vit90

Several processes (one per GPU, or CPU processes with gloo)::

    torchrun --nproc_per_node=8 -m sparse_compile.training.train ...same flags...

``--compile`` compiles the model with ``torch.compile(model, backend="sparse")`` (then wraps it in
DDP under torchrun, in that order): every linear whose weight is a Supermask of tiles >= 16 runs
through the masked op, which skips the dropped tiles. After the first step the compile report is
printed (rank 0): how many linears run masked, and why the others stay dense.
``--compile-backend inductor`` compiles with Inductor alone, the dense comparison.

``--batch-size`` is per process, as in the references. Every epoch writes
``<output-dir>/checkpoint.pth`` (model, optimizer, lr_scheduler, epoch, args as a dict, and
``model_ema`` with ``--model-ema``) atomically: to a temporary file first, then renamed, so a
crash while saving keeps the previous checkpoint; it holds plain data only and loads with
``torch.load(..., weights_only=True)``. ``--resume <output-dir>/checkpoint.pth`` continues from
the epoch after the saved one and gives the same result as an uninterrupted run: data order,
augmentation, MixUp/CutMix and dropout draw their randomness from ``--seed``, the epoch number
and the process's rank only (the rank, as DeiT does, so that ``--ra-sampler``'s copies of an
image, which go to different processes, are augmented differently).

The references' recipe flags (the SuperBlock ViT command runs as written)::

    --auto-augment {ra,ta_wide,augmix,imagenet,cifar10,svhn}   policy after crop and flip
        --ra-magnitude 9, --augmix-severity 3                   its strength
    --random-erase P                 RandomErasing after normalisation (default 0: off)
    --mixup-alpha A, --cutmix-alpha A  MixUp / CutMix on batches, one picked per batch
                                     (default 0: off); the loss gets soft targets
    --ra-sampler, --ra-reps 3        repeated augmentation (``distributed.RASampler``)
    --model-ema                      exponential moving average of parameters and buffers,
        --model-ema-steps 32         updated every 32 steps (reset to the model during lr warm-up),
        --model-ema-decay 0.99998    adjusted for batch, world size, steps, epochs (``ema.py``);
                                     evaluated every epoch ("Test: EMA Acc@1 ...")

Example, the SuperBlock ``vit_b_16`` recipe with 90% Supermask sparsity in 32x32 tiles, trained
with the sparse backend::

    torchrun --nproc_per_node=8 -m sparse_compile.training.train \\
        --model vit_b_16 --epochs 300 --batch-size 512 --opt adamw --lr 0.003 --wd 0.3 \\
        --lr-scheduler cosineannealinglr --lr-warmup-method linear --lr-warmup-epochs 30 \\
        --lr-warmup-decay 0.033 --amp --label-smoothing 0.11 --mixup-alpha 0.2 --auto-augment ra \\
        --clip-grad-norm 1 --ra-sampler --cutmix-alpha 1.0 --model-ema \\
        --sparsity-linear 0.9 --sp-linear-tile-size 32 --data-path /data/imagenet --compile
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch
import torch.nn as nn

from sparse_compile.training import cli_args, data
from sparse_compile.training import distributed as D
from sparse_compile.training.checkpoint import load_checkpoint_file, model_state_dict
from sparse_compile.training.ema import ExponentialMovingAverage, adjusted_decay
from sparse_compile.training.evaluate import evaluate


#: ``--compile`` without ``--compile-backend``: the project's backend, so a compiled run trains sparse.
DEFAULT_COMPILE_BACKEND = "sparse"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-compile-train", description="Train a sparse torchvision classifier", add_help=add_help
    )
    parser.add_argument("--data-path", required=True, help="ImageFolder root with train/ and val/")
    cli_args.add_model_args(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("-b", "--batch-size", default=32, type=int, help="images per process per step")
    parser.add_argument("--epochs", default=90, type=int)
    parser.add_argument("-j", "--workers", default=4, type=int, help="data loading processes per training process")
    parser.add_argument("--opt", default="sgd", choices=("sgd", "adamw"))
    parser.add_argument("--lr", default=0.1, type=float)
    parser.add_argument("--momentum", default=0.9, type=float)
    parser.add_argument("--wd", "--weight-decay", default=1e-4, type=float, dest="weight_decay")
    parser.add_argument("--label-smoothing", default=0.0, type=float)
    parser.add_argument("--clip-grad-norm", default=None, type=float, help="max gradient norm (default: no clipping)")
    parser.add_argument(
        "--lr-scheduler", default="cosineannealinglr", choices=("cosineannealinglr", "steplr", "constant")
    )
    parser.add_argument("--lr-step-size", default=30, type=int, help="epochs between decays (steplr)")
    parser.add_argument("--lr-gamma", default=0.1, type=float, help="decay factor (steplr)")
    parser.add_argument("--lr-min", default=0.0, type=float, help="final lr (cosineannealinglr)")
    parser.add_argument("--lr-warmup-epochs", default=0, type=int)
    parser.add_argument("--lr-warmup-method", default="linear", choices=("linear", "constant"))
    parser.add_argument("--lr-warmup-decay", default=0.01, type=float, help="warm-up starts at lr * this")
    parser.add_argument("--no-augment", action="store_true", help="no random crop/flip: resize only")
    parser.add_argument("--print-freq", default=10, type=int, help="steps between progress lines")
    parser.add_argument("--output-dir", default=None, help="where checkpoint.pth goes (none: no checkpoint)")
    parser.add_argument("--resume", default=None, help="checkpoint.pth to continue from")
    parser.add_argument("--start-epoch", default=0, type=int, help="first epoch (overridden by --resume)")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model with --compile-backend (default sparse: Supermask linears run masked)",
    )
    parser.add_argument(
        "--compile-backend",
        default=None,
        metavar="NAME",
        help=f"backend for --compile (default {DEFAULT_COMPILE_BACKEND}; inductor: the dense comparison)",
    )
    parser.add_argument("--use-deterministic-algorithms", action="store_true")
    parser.add_argument("--test-only", action="store_true", help="only evaluate (with --resume)")
    add_recipe_args(parser)
    cli_args.add_sparsity_args(parser)
    return parser


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """Augmentation, sampling and EMA flags of torchvision's classification references (same names, defaults)."""
    g = parser.add_argument_group("recipe (torchvision references)")
    g.add_argument("--auto-augment", default=None, choices=data.AUTO_AUGMENT_POLICIES, help="auto-augment policy")
    g.add_argument("--ra-magnitude", default=9, type=int, help="RandAugment magnitude (--auto-augment ra), 0..30")
    g.add_argument("--augmix-severity", default=3, type=int, help="AugMix severity (--auto-augment augmix), 1..10")
    g.add_argument("--random-erase", default=0.0, type=float, help="RandomErasing probability")
    g.add_argument("--mixup-alpha", default=0.0, type=float, help="MixUp Beta(alpha, alpha) (0: off)")
    g.add_argument("--cutmix-alpha", default=0.0, type=float, help="CutMix Beta(alpha, alpha) (0: off)")
    g.add_argument("--ra-sampler", action="store_true", help="repeated-augmentation sampler")
    g.add_argument("--ra-reps", default=3, type=int, help="repetitions of each image (--ra-sampler)")
    g.add_argument("--model-ema", action="store_true", help="keep and evaluate an EMA of the model")
    g.add_argument("--model-ema-steps", default=32, type=int, help="optimizer steps between EMA updates")
    g.add_argument(
        "--model-ema-decay", default=0.99998, type=float, help="EMA decay, before adjusting (see ema.adjusted_decay)"
    )


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    cli_args.check_sparsity_args(args, parser)
    for name in ("batch_size", "epochs", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 0:
        parser.error("--workers must be >= 0")
    if args.lr_warmup_epochs >= args.epochs and args.lr_warmup_epochs > 0:
        parser.error(f"--lr-warmup-epochs {args.lr_warmup_epochs} must be smaller than --epochs {args.epochs}")
    if args.resume is not None and not os.path.isfile(args.resume):
        parser.error(f"--resume {args.resume}: no such file")
    check_recipe_args(args, parser)
    check_compile_args(args, parser)


def check_compile_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``--compile-backend`` needs ``--compile`` and a backend ``torch.compile`` can find: found
    here, before any data is read (a missing ``sparse`` backend is an error, not a dense run)."""
    from torch._dynamo.backends.registry import list_backends, lookup_backend

    if args.compile_backend is not None and not args.compile:
        parser.error(f"--compile-backend {args.compile_backend} only applies with --compile")
    if not args.compile:
        return
    args.compile_backend = args.compile_backend or DEFAULT_COMPILE_BACKEND
    try:
        lookup_backend(args.compile_backend)
    except Exception as e:  # not registered, or its entry point does not import
        hint = (
            "install sparse_compile (pip install -e .) so that its entry point registers it"
            if args.compile_backend == DEFAULT_COMPILE_BACKEND
            else f"choose one of: {', '.join(list_backends())}"
        )
        parser.error(f"--compile-backend {args.compile_backend}: not available ({e}); {hint}")


def check_recipe_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for name in ("mixup_alpha", "cutmix_alpha"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 0 (0: off)")
    if not 0.0 <= args.random_erase <= 1.0:
        parser.error(f"--random-erase {args.random_erase}: must be a probability in [0, 1]")
    if not 0 <= args.ra_magnitude <= 30:  # RandAugment has 31 magnitude bins
        parser.error(f"--ra-magnitude {args.ra_magnitude}: must be in [0, 30]")
    if not 1 <= args.augmix_severity <= 10:
        parser.error(f"--augmix-severity {args.augmix_severity}: must be in [1, 10]")
    if args.no_augment and (args.auto_augment is not None or args.random_erase > 0):
        parser.error("--no-augment contradicts --auto-augment / --random-erase")
    if args.ra_reps < 1:
        parser.error(f"--ra-reps {args.ra_reps}: must be >= 1")
    if args.model_ema_steps < 1:
        parser.error(f"--model-ema-steps {args.model_ema_steps}: must be >= 1")
    if not 0.0 <= args.model_ema_decay <= 1.0:
        parser.error(f"--model-ema-decay {args.model_ema_decay}: must be in [0, 1]")


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of one epoch on one process: a function of ``--seed``, the epoch and the rank only.

    The rank is part of it (DeiT seeds ``seed + rank``): with ``--ra-sampler`` the repeated copies
    of an image go to different ranks at the same step, and identical seeds would give them
    bit-identical augmentations. The model's initial weights use ``--seed`` alone, on every rank.
    """
    return ((seed * 100003 + epoch) * 1000003 + rank) % 2**63  # torch.manual_seed takes < 2**64


def make_optimizer(params, args: argparse.Namespace) -> torch.optim.Optimizer:
    if args.opt == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace):
    """Stepped once per epoch, like the references."""
    sched = torch.optim.lr_scheduler
    main_epochs = args.epochs - args.lr_warmup_epochs
    if args.lr_scheduler == "cosineannealinglr":
        main = sched.CosineAnnealingLR(optimizer, T_max=max(main_epochs, 1), eta_min=args.lr_min)
    elif args.lr_scheduler == "steplr":
        main = sched.StepLR(optimizer, step_size=args.lr_step_size, gamma=args.lr_gamma)
    else:
        main = sched.LambdaLR(optimizer, lambda _: 1.0)
    if args.lr_warmup_epochs == 0:
        return main
    if args.lr_warmup_method == "linear":
        warmup = sched.LinearLR(optimizer, start_factor=args.lr_warmup_decay, total_iters=args.lr_warmup_epochs)
    else:
        warmup = sched.ConstantLR(optimizer, factor=args.lr_warmup_decay, total_iters=args.lr_warmup_epochs)
    return sched.SequentialLR(optimizer, [warmup, main], milestones=[args.lr_warmup_epochs])


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader,
    device: torch.device,
    epoch: int,
    args: argparse.Namespace,
    after_step=None,
    model_ema: ExponentialMovingAverage | None = None,
    model_without_ddp: nn.Module | None = None,
) -> float:
    """One pass over ``loader``; returns the mean training loss (over processes).

    ``target`` may be class indices or, after MixUp/CutMix, class probabilities: the loss takes
    both, and no training accuracy is computed from it.
    """
    model.train()
    logger = D.MetricLogger()
    logger.add_meter("lr", D.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    logger.add_meter("img/s", D.SmoothedValue(window_size=10, fmt="{value:.1f}"))
    header = f"Epoch: [{epoch}]"
    world = D.get_world_size()
    for i, (image, target) in enumerate(logger.log_every(loader, args.print_freq, header)):
        start = time.time()
        image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp):
            output = model(image)
            loss = criterion(output, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
        optimizer.step()
        if after_step is not None:
            after_step()
        if model_ema is not None and i % args.model_ema_steps == 0:
            update_ema(model_ema, model_without_ddp if model_without_ddp is not None else model, epoch, args)
        batch = image.shape[0]
        logger.update(loss=loss.item(), lr=optimizer.param_groups[0]["lr"])
        logger.meters["img/s"].update(batch * world / max(time.time() - start, 1e-9))
    logger.meters["loss"].synchronize_between_processes(device)
    return logger.meters["loss"].global_avg


def update_ema(model_ema: ExponentialMovingAverage, model: nn.Module, epoch: int, args: argparse.Namespace) -> None:
    """One EMA update, at the references' times: steps 0, s, 2s, ... of every epoch (``s = --model-ema-steps``)."""
    model_ema.update_parameters(model)
    if epoch < args.lr_warmup_epochs:
        # During warm-up the EMA follows the model: with n_averaged = 0 the next update copies.
        model_ema.n_averaged.fill_(0)


def make_model_ema(model: nn.Module, args: argparse.Namespace, world_size: int) -> ExponentialMovingAverage:
    decay = adjusted_decay(args.model_ema_decay, args.batch_size, world_size, args.model_ema_steps, args.epochs)
    D.print_main(f"Model EMA: decay {decay:.6g} per update (--model-ema-decay {args.model_ema_decay} adjusted)")
    return ExponentialMovingAverage(model, decay)


def evaluate_ema(model_ema: ExponentialMovingAverage, val_loader, device: torch.device, args) -> tuple[float, float]:
    # Every process holds the same EMA (same updates from the same DDP-synchronised weights),
    # so evaluating it over the sharded validation set is exact, like the model's evaluation.
    return evaluate(model_ema, val_loader, device, args.print_freq, amp=args.amp, header="Test: EMA")


def evaluation_model(model: nn.Module, model_without_ddp: nn.Module, args: argparse.Namespace) -> nn.Module:
    """What the end-of-epoch evaluation runs: ``model`` (compiled, DDP-wrapped), except with the
    ``sparse`` backend, whose inference graphs (``torch.no_grad()``) take the weights as constants
    on their first call (Inductor freezing, BSR conversion): the weights change every epoch, so
    evaluating that graph after the next epoch would score the first epoch's weights. The plain
    model evaluates there (online masks, dense; evaluation is a small part of an epoch)."""
    if args.compile and args.compile_backend == DEFAULT_COMPILE_BACKEND:
        return model_without_ddp
    return model


def print_compile_report(model: nn.Module, args: argparse.Namespace) -> int | None:
    """Prints (rank 0) what the ``sparse`` backend did to ``model``'s linears: the report's
    summary line per graph (how many run masked), then its per-layer table. Returns the number of
    linears that run sparse (masked in training graphs), None for another backend."""
    if args.compile_backend != DEFAULT_COMPILE_BACKEND:
        D.print_main(f"Compiled with --compile-backend {args.compile_backend}: every linear runs dense")
        return None
    import sparse_compile

    report = sparse_compile.report(model)
    D.print_main(report)
    return len(report.sparse_layers)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (console script, ``python -m``, ``torchrun -m``)."""
    run(argv)


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` and run; returns ``{"acc1", "acc5", "epoch", "loss", "masked_layers"}`` (for
    tests and scripts). ``masked_layers``: with ``--compile`` (sparse backend), how many linears
    the compile report shows running masked after the first step; None otherwise.

    With ``--model-ema`` also ``"ema_acc1"`` and ``"ema_acc5"``.
    """
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)

    info = D.init_distributed(args.device)
    try:
        return _run(args, info)
    finally:
        D.cleanup(info)


def _run(args: argparse.Namespace, info: D.DistInfo) -> dict:
    from sparse_compile.training import post_step_projection

    device = info.device
    if args.use_deterministic_algorithms:
        torch.use_deterministic_algorithms(True)
    D.print_main(f"sparse-compile-train: world_size={info.world_size} device={device}")
    D.print_main(args)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)

    train_tf = data.train_transform(
        args.image_size,
        not args.no_augment,
        auto_augment=args.auto_augment,
        ra_magnitude=args.ra_magnitude,
        augmix_severity=args.augmix_severity,
        random_erase=args.random_erase,
    )
    train_set = data.image_folder(args.data_path, "train", train_tf)
    val_set = data.image_folder(args.data_path, "val", data.val_transform(args.image_size, args.val_resize_size))
    if val_set.classes != train_set.classes:
        raise ValueError(f"train/ and val/ have different classes: {train_set.classes} vs {val_set.classes}")
    num_classes = args.num_classes or len(train_set.classes)
    train_sampler = D.train_sampler(train_set, args.seed, ra_reps=args.ra_reps if args.ra_sampler else 0)
    collate = data.mixup_cutmix_collate(num_classes, args.mixup_alpha, args.cutmix_alpha)
    train_loader = data.make_loader(train_set, args.batch_size, train_sampler, args.workers, device, collate)
    val_loader = data.make_loader(val_set, args.batch_size, D.ShardSampler(val_set), args.workers, device)

    seed_all(args.seed)  # same initial weights and masks on every process
    model = cli_args.build_model(args, num_classes)
    masked = cli_args.apply_sparsity(model, args)
    model.to(device)
    D.print_main(f"Masked layers: {len(masked)}")
    table = cli_args.sparsity_table(model)
    if table:
        D.print_main(table)

    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer = make_optimizer(model.parameters(), args)
    lr_scheduler = make_lr_scheduler(optimizer, args)

    if args.resume:
        checkpoint = load_checkpoint_file(args.resume)
        model.load_state_dict(model_state_dict(checkpoint))
        if not args.test_only:
            optimizer.load_state_dict(checkpoint["optimizer"])
            lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        args.start_epoch = checkpoint["epoch"] + 1
        D.print_main(f"Resumed from {args.resume}: continuing at epoch {args.start_epoch}")

    # After the resumed weights are in: the EMA starts as their copy when the checkpoint has none.
    model_ema = make_model_ema(model, args, info.world_size) if args.model_ema else None
    if model_ema is not None and args.resume:
        if "model_ema" in checkpoint:
            model_ema.load_state_dict(checkpoint["model_ema"])
        else:
            D.print_main(f"{args.resume} has no model_ema: the EMA starts from the resumed weights")

    model_without_ddp = model
    if args.compile:
        # Compile first, then wrap: torch.compile(DDP(model)) graph-breaks in DDP's forward, so
        # only the masks would get compiled and no linear would run masked.
        model = torch.compile(model, backend=args.compile_backend)
    if info.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    eval_model = evaluation_model(model, model_without_ddp, args)

    steps = 0

    def after_step():
        nonlocal steps
        if args.nm is not None and args.mask_mode == "post":
            post_step_projection(model_without_ddp)
        steps += 1
        if steps == 1 and args.compile:
            result["masked_layers"] = print_compile_report(model_without_ddp, args)

    result: dict = {"epoch": args.start_epoch - 1, "acc1": None, "acc5": None, "loss": None, "masked_layers": None}
    if args.test_only:
        # The weights stay as they are: the compiled model evaluates (with the sparse backend,
        # frozen weights and BSR where measured faster), and its report says what ran sparse.
        acc1, acc5 = evaluate(model, val_loader, device, args.print_freq, amp=args.amp)
        result = {**result, "acc1": acc1, "acc5": acc5}
        if args.compile:
            print_compile_report(model_without_ddp, args)
        if model_ema is not None:
            result.update(zip(("ema_acc1", "ema_acc5"), evaluate_ema(model_ema, val_loader, device, args)))
        return result

    D.print_main("Start training")
    start = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        # Randomness of this epoch (augmentation, dropout, worker seeds) depends on seed, epoch and
        # rank only, so a resumed run repeats an uninterrupted one. (Bi-Mask's permutation draws
        # have their own generator, the same on every rank.)
        seed_all(epoch_seed(args.seed, epoch, info.rank))
        train_sampler.set_epoch(epoch)
        loss = train_one_epoch(
            model, criterion, optimizer, train_loader, device, epoch, args, after_step, model_ema, model_without_ddp
        )
        lr_scheduler.step()
        acc1, acc5 = evaluate(eval_model, val_loader, device, args.print_freq, amp=args.amp)
        result.update(epoch=epoch, acc1=acc1, acc5=acc5, loss=loss)
        if model_ema is not None:
            result.update(zip(("ema_acc1", "ema_acc5"), evaluate_ema(model_ema, val_loader, device, args)))
        if args.output_dir:
            checkpoint = {
                "model": model_without_ddp.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "epoch": epoch,
                "args": vars(args),  # plain data: the file loads with torch.load(weights_only=True)
            }
            if model_ema is not None:
                checkpoint["model_ema"] = model_ema.state_dict()
            D.save_on_main(checkpoint, os.path.join(args.output_dir, "checkpoint.pth"))
    D.print_main(f"Training time {D.format_seconds(time.time() - start)}")
    if table:
        D.print_main(cli_args.sparsity_table(model_without_ddp))
    return result


if __name__ == "__main__":
    main()
