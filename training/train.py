"""Train a torchvision classifier with Supermask or N:M masks (torchvision-references style).

Single process::

    python -m sparse_compile.training.train --model vit_b_16 --data-path /data/imagenet \\
        --sparsity-linear 0.9 --sp-linear-tile-size 32 --output-dir runs/vit90

Several processes (one per GPU, or CPU processes with gloo)::

    torchrun --nproc_per_node=8 -m sparse_compile.training.train ...same flags...

``--batch-size`` is per process, as in the references. Every epoch writes
``<output-dir>/checkpoint.pth`` (model, optimizer, lr_scheduler, epoch, args);
``--resume <output-dir>/checkpoint.pth`` continues from the epoch after the saved one and
gives the same result as an uninterrupted run: data order, augmentation and dropout draw
their randomness from ``--seed`` and the epoch number only.
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
from sparse_compile.training.evaluate import evaluate


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
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (default backend)")
    parser.add_argument("--use-deterministic-algorithms", action="store_true")
    parser.add_argument("--test-only", action="store_true", help="only evaluate (with --resume)")
    cli_args.add_sparsity_args(parser)
    return parser


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


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


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
) -> float:
    """One pass over ``loader``; returns the mean training loss (over processes)."""
    model.train()
    logger = D.MetricLogger()
    logger.add_meter("lr", D.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    logger.add_meter("img/s", D.SmoothedValue(window_size=10, fmt="{value:.1f}"))
    header = f"Epoch: [{epoch}]"
    world = D.get_world_size()
    for image, target in logger.log_every(loader, args.print_freq, header):
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
        batch = image.shape[0]
        logger.update(loss=loss.item(), lr=optimizer.param_groups[0]["lr"])
        logger.meters["img/s"].update(batch * world / max(time.time() - start, 1e-9))
    logger.meters["loss"].synchronize_between_processes(device)
    return logger.meters["loss"].global_avg


def _unwrap_state_dict(obj) -> dict:
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    return obj


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (console script, ``python -m``, ``torchrun -m``)."""
    run(argv)


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` and run; returns ``{"acc1", "acc5", "epoch", "loss"}`` (for tests and scripts)."""
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

    train_set = data.image_folder(args.data_path, "train", data.train_transform(args.image_size, not args.no_augment))
    val_set = data.image_folder(args.data_path, "val", data.val_transform(args.image_size, args.val_resize_size))
    if val_set.classes != train_set.classes:
        raise ValueError(f"train/ and val/ have different classes: {train_set.classes} vs {val_set.classes}")
    num_classes = args.num_classes or len(train_set.classes)
    train_sampler = D.train_sampler(train_set, args.seed)
    train_loader = data.make_loader(train_set, args.batch_size, train_sampler, args.workers, device)
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
        checkpoint = torch.load(args.resume, map_location="cpu", weights_only=False)
        model.load_state_dict(_unwrap_state_dict(checkpoint))
        if not args.test_only:
            optimizer.load_state_dict(checkpoint["optimizer"])
            lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        args.start_epoch = checkpoint["epoch"] + 1
        D.print_main(f"Resumed from {args.resume}: continuing at epoch {args.start_epoch}")

    model_without_ddp = model
    if info.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)

    after_step = None
    if args.nm is not None and args.mask_mode == "post":
        def after_step():
            post_step_projection(model_without_ddp)

    result: dict = {"epoch": args.start_epoch - 1, "acc1": None, "acc5": None, "loss": None}
    if args.test_only:
        acc1, acc5 = evaluate(model, val_loader, device, args.print_freq, amp=args.amp)
        return {**result, "acc1": acc1, "acc5": acc5}

    D.print_main("Start training")
    start = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        # Randomness of this epoch (augmentation, dropout, worker seeds, permutation draws)
        # depends on seed and epoch only, so a resumed run repeats an uninterrupted one.
        seed_all(args.seed * 100003 + epoch)
        train_sampler.set_epoch(epoch)
        loss = train_one_epoch(model, criterion, optimizer, train_loader, device, epoch, args, after_step)
        lr_scheduler.step()
        acc1, acc5 = evaluate(model, val_loader, device, args.print_freq, amp=args.amp)
        result = {"epoch": epoch, "acc1": acc1, "acc5": acc5, "loss": loss}
        if args.output_dir:
            checkpoint = {
                "model": model_without_ddp.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "epoch": epoch,
                "args": args,
            }
            D.save_on_main(checkpoint, os.path.join(args.output_dir, "checkpoint.pth"))
    D.print_main(f"Training time {D.format_seconds(time.time() - start)}")
    if table:
        D.print_main(cli_args.sparsity_table(model_without_ddp))
    return result


if __name__ == "__main__":
    main()
