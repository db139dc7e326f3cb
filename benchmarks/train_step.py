"""Supermask ViT training step: eager, torch.compile (Inductor), and backend="sparse" (masked linears).

    python -m benchmarks.train_step            # GPU: ViT-B/16, bf16, batch 64; CPU: a small ViT
    python -m benchmarks.train_step --help

One step = forward, cross-entropy backward, SGD (momentum) step, on a fixed random batch. Every
encoder ``nn.Linear`` (MLP linears and the attention out-projection) gets a
:class:`~sparse_compile.training.Supermask` (as ``apply_supermask`` does; the head is not masked;
``--attention-in-proj`` masks the packed q/k/v projections too).
Per (sparsity, tile) the same masked model runs three ways: eager, ``torch.compile`` (Inductor,
dense matmuls on ``W * mask``), and ``backend="sparse"`` (masked linears skip dropped tiles in
the forward and input-gradient matmuls). The unmasked model, eager and compiled, is the dense
reference.

Timing: every variant is built, checked and warmed up first; then the timed steps go round-robin
over all variants (one step of each, ``--reps`` times), so load from other processes hits every
variant alike. Each step is timed with ``time.perf_counter`` around it (CUDA: synchronized before
and after: steps are tens of ms, launch overhead is part of a step). Medians are reported.

Check: the first step of every variant starts from the same weights and batch; its loss and the
gradients of every parameter (weights, scores) are compared with eager on the same masked model.

Bi-Mask (``--bimask 2:4``; ``--no-supermask`` leaves out the Supermask rows): the same encoder
linears (and in_proj with ``--attention-in-proj``) get a bidirectional
:class:`~sparse_compile.training.NMMask` (``apply_nm``; forward mask, backward mask and SR-STE
decay every step), run eager, ``torch.compile`` and ``backend="sparse"``; "vs dense compile" is
the issue's ratio (the dense model under ``backend="inductor"`` over the row). The permutation
search (every 100 steps) does not fall in the timed steps.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import sys
import time
from typing import Any, Sequence

import torch
import torchvision
from torch import nn

import sparse_compile
from benchmarks import common
from sparse_compile.measure import one_call_at_a_time, round_robin
from sparse_compile.training import apply_nm, apply_supermask
from sparse_compile.training.cli_args import parse_nm

CPU_SMALL = dict(image_size=64, patch_size=8, num_layers=6, hidden_dim=384, mlp_dim=1536, num_heads=6)
SMALL_FLAGS = ("patch_size", "num_layers", "hidden_dim", "mlp_dim", "num_heads")

#: ``--variants``: the compiled rows to run (default all). Each compiles the model's forward and
#: backward (ViT-B on a GPU: tens of seconds), so a run that must fit a time limit picks its rows.
#: The eager rows always run: they are their group's gradient reference, and compile nothing.
VARIANTS = {
    "dense-compile": "dense model, torch.compile",
    "supermask-compile": "Supermask, torch.compile",
    "sparse": 'Supermask, backend="sparse"',
    "bimask-compile": "Bi-Mask N:M, torch.compile (with --bimask)",
    "bimask-sparse": 'Bi-Mask N:M, backend="sparse" (with --bimask)',
}

DEFAULTS = {
    # The GPU issue's setting: ViT-B/16, bf16, batch 64.
    "cuda": dict(
        model="vit_b_16", batch_size=64, image_size=224, dtype=[torch.bfloat16],
        sparsity=[0.5, 0.8, 0.9], blocksize=[32, 64], warmup=3, reps=20, variants=list(VARIANTS),
    ),
    # A small ViT whose step is dominated by its linears. Runtime: see benchmarks/results/cpu-train-step.md.
    "cpu": dict(
        model="small", batch_size=32, image_size=CPU_SMALL["image_size"], dtype=[torch.float32],
        sparsity=[0.5, 0.8, 0.9], blocksize=[32, 64], warmup=1, reps=10, variants=list(VARIANTS),
    ),
}

HEADERS = [
    "variant", "sparsity", "tile", "masked layers", "median ms", "reps",
    "vs eager", "vs inductor", "vs dense compile", "compile s", "grad err", "check",
]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", help="a torchvision ViT name, or 'small' (built from --patch-size, ...); "
                        "default: vit_b_16 on GPU, small on CPU")
    parser.add_argument("--batch-size", type=common.positive_int)
    parser.add_argument("--image-size", type=common.positive_int)
    for flag in SMALL_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", type=common.positive_int,
                            help=f"--model small only (default {CPU_SMALL[flag]})")
    parser.add_argument("--attention-in-proj", action="store_true",
                        help="also mask each attention's packed q/k/v projection (apply_supermask(..., attention_in_proj=True))")
    parser.add_argument("--bimask", action="append", type=common.comma_list(parse_nm), metavar="N:M",
                        help="also time Bi-Mask (bidirectional N:M, apply_nm) rows for each N:M, e.g. 2:4")
    parser.add_argument("--supermask", action=argparse.BooleanOptionalAction, default=True,
                        help="the Supermask rows (--no-supermask: dense and Bi-Mask rows only)")
    parser.add_argument("--variants", action="append", type=common.comma_list(_variant),
                        help="compiled rows to run, comma list (default: all; the eager rows always run): "
                        + "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()))
    parser.add_argument("--amp", action="store_true",
                        help="fp32 weights, forward and loss under torch.autocast(bfloat16) (needs --dtype float32)")
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    if args.amp and args.dtype is None:
        args.dtype = [[torch.float32]]
    common.finish_args(parser, args, DEFAULTS)
    if args.amp and args.dtype != [torch.float32]:
        parser.error("--amp keeps the weights in float32: use it with --dtype float32 (the default with --amp)")
    if args.model == "small":
        for flag in SMALL_FLAGS:
            if getattr(args, flag) is None:
                setattr(args, flag, CPU_SMALL[flag])
    elif any(getattr(args, flag) is not None for flag in SMALL_FLAGS):
        parser.error(f"--patch-size, --num-layers, ... apply to --model small only, not {args.model}")
    return args


def _variant(text: str) -> str:
    if text not in VARIANTS:
        raise ValueError(f"unknown variant {text!r}; use any of {', '.join(VARIANTS)}")
    return text


def build_model(args: argparse.Namespace) -> nn.Module:
    """The dense model, random weights (seeded), train mode, fp32 on CPU."""
    torch.manual_seed(0)
    if args.model == "small":
        model = torchvision.models.VisionTransformer(
            image_size=args.image_size, **{flag: getattr(args, flag) for flag in SMALL_FLAGS}
        )
    else:
        model = torchvision.models.get_model(args.model, weights=None, image_size=args.image_size)
    for module in model.heads.modules():  # torchvision's zero head would give zero gradients
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
    return model.train()


def bimask_model(model: nn.Module, n: int, m: int, in_proj: bool = False) -> tuple[nn.Module, int]:
    """A copy of ``model`` whose encoder linears (and in_proj with ``in_proj``) get Bi-Mask ``n:m``."""
    masked = copy.deepcopy(model)
    torch.manual_seed(1)  # the same permutation seeds for every variant
    names = apply_nm(masked, n, m, filter_fn=lambda name, _m: name.startswith("encoder"), attention_in_proj=in_proj)
    return masked, len(names)


def masked_model(model: nn.Module, sparsity: float, tile: int, in_proj: bool = False) -> tuple[nn.Module, int]:
    masked = copy.deepcopy(model)
    torch.manual_seed(1)  # the same scores for every variant of one (sparsity, tile)
    names = apply_supermask(masked, linear_sparsity=sparsity, linear_tile_size=tile,
                            filter_fn=lambda name, _m: name.startswith("encoder"), attention_in_proj=in_proj)
    return masked, len(names)


@dataclasses.dataclass
class Variant:
    label: str
    sparsity: float | None
    tile: int | str | None  # Supermask tile, or "N:M" for Bi-Mask rows
    model: nn.Module
    compiled: nn.Module
    optimizer: torch.optim.Optimizer
    masked_total: int = 0
    masked_layers: str = "-"
    compile_s: float | None = None
    grad_err: float | None = None
    tol: float | None = None
    times_ms: list[float] = dataclasses.field(default_factory=list)
    note: str = ""
    autocast: torch.dtype | None = None  # --amp: forward and loss under torch.autocast(this dtype)

    @property
    def ok(self) -> bool:
        return self.note == "" and self.grad_err is not None and self.grad_err <= self.tol

    @property
    def median_ms(self) -> float | None:
        return common.Timing(tuple(self.times_ms)).median_ms if self.ok and self.times_ms else None


def make_variant(label, model, how, device, dtype, sparsity=None, tile=None, masked_total=0, autocast=None) -> Variant:
    model = copy.deepcopy(model).to(device=device, dtype=dtype)
    compiled = model if how == "eager" else torch.compile(model, backend=how)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return Variant(label, sparsity, tile, model, compiled, optimizer, masked_total, autocast=autocast)


def train_step(variant: Variant, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    variant.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=variant.autocast or torch.bfloat16, enabled=variant.autocast is not None):
        loss = nn.functional.cross_entropy(variant.compiled(x), y)
    loss.backward()
    variant.optimizer.step()
    return loss


def first_step_grads(variant: Variant, x, y, device) -> tuple[dict[str, torch.Tensor], float]:
    """Runs the first step (compiling), returns the gradients it took and its wall time."""
    common.synchronize(device)
    start = time.perf_counter()
    train_step(variant, x, y)
    common.synchronize(device)
    seconds = time.perf_counter() - start
    grads = {name: p.grad.detach().clone() for name, p in variant.model.named_parameters() if p.grad is not None}
    return grads, seconds


def grad_error(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Worst ``max |g - g_ref| / max |g_ref|`` over the parameters (same names, same tensors)."""
    if grads.keys() != ref.keys():
        raise RuntimeError(f"different parameters got gradients: {sorted(grads.keys() ^ ref.keys())}")
    return max(common.relative_error(grads[name], ref[name]) for name in ref)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.set_up_run(args)
    common.warm_up_compiler(device)
    # Every variant stays compiled at once (round-robin timing): one Dynamo cache entry each.
    torch._dynamo.config.cache_size_limit = 256
    torch._dynamo.config.accumulated_cache_size_limit = 1024
    model = build_model(args)
    facts = common.environment(device, args.tf32) + [
        ("model", f"{args.model}: image {args.image_size}, patch {model.patch_size}, layers "
                  f"{len(model.encoder.layers)}, hidden {model.hidden_dim}, mlp {model.mlp_dim}, batch {args.batch_size}"),
        ("masks", ("Supermask" if args.supermask else "Bi-Mask") + " on every encoder nn.Linear (MLP and attention out-projection)"
                  + (" and every attention in_proj" if args.attention_in_proj else "")
                  + ("; sparsity = fraction of tiles dropped" if args.supermask else "")
                  + ("; Bi-Mask rows: bidirectional N:M (apply_nm), tile = N:M" if args.bimask else "")),
        ("step", "forward + cross-entropy backward + SGD(momentum) step; model compiled, optimizer eager"
                 + ("; forward and loss under torch.autocast(bfloat16), fp32 weights" if args.amp else "")),
        ("timing", f"median of {args.reps} steps per variant, round-robin over all variants, "
                   f"after {args.warmup} warm-up steps each"),
    ]
    common.print_key_values(facts)
    tables, raw, all_ok = [], [], True
    for dtype in args.dtype:
        tables_dtype, raw_dtype, ok = run_dtype(args, device, dtype, model)
        tables.append(tables_dtype)
        raw += raw_dtype
        all_ok &= ok
    legend = (
        "masked layers: linears the sparse backend runs masked / Supermask layers. vs eager, vs inductor: "
        "the same masked model's eager / torch.compile median over this row's. vs dense compile: the "
        "unmasked model under torch.compile over this row. compile s: first step (compiles). grad err: "
        "worst max|g - g_eager| / max|g_eager| over all parameters after the first step."
    )
    return common.finish_run(args, argv, "benchmarks.train_step", "Supermask ViT training step", legend,
                             facts, tables, raw, all_ok)


def run_dtype(args, device, dtype, model) -> tuple[common.Table, list[dict[str, Any]], bool]:
    torch.manual_seed(2)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device, dtype=dtype)
    y = torch.randint(0, model.heads[-1].out_features, (args.batch_size,), device=device)
    autocast = torch.bfloat16 if args.amp else None
    tol = common.tolerance(autocast or dtype, args.tf32)
    torch._dynamo.reset()
    sparse_compile.clear_reports()

    def wanted(key: str) -> bool:
        return key in args.variants

    groups: list[list[Variant]] = [[
        make_variant("dense model, eager", model, "eager", device, dtype, autocast=autocast),
        *([make_variant("dense model, torch.compile", model, "inductor", device, dtype, autocast=autocast)]
          if wanted("dense-compile") else []),
    ]]
    for sparsity in args.sparsity if args.supermask else []:
        for tile in args.blocksize:
            masked, total = masked_model(model, sparsity, tile, args.attention_in_proj)
            label = dict(sparsity=sparsity, tile=tile, masked_total=total, autocast=autocast)
            groups.append([
                make_variant("Supermask, eager", masked, "eager", device, dtype, **label),
                *([make_variant("Supermask, torch.compile", masked, "inductor", device, dtype, **label)]
                  if wanted("supermask-compile") else []),
                *([make_variant('Supermask, backend="sparse"', masked, "sparse", device, dtype, **label)]
                  if wanted("sparse") else []),
            ])
    for n, m in args.bimask or []:
        masked, total = bimask_model(model, n, m, args.attention_in_proj)
        label = dict(sparsity=1 - n / m, tile=f"{n}:{m}", masked_total=total, autocast=autocast)
        groups.append([
            make_variant(f"Bi-Mask {n}:{m}, eager", masked, "eager", device, dtype, **label),
            *([make_variant(f"Bi-Mask {n}:{m}, torch.compile", masked, "inductor", device, dtype, **label)]
              if wanted("bimask-compile") else []),
            *([make_variant(f'Bi-Mask {n}:{m}, backend="sparse"', masked, "sparse", device, dtype, **label)]
              if wanted("bimask-sparse") else []),
        ])

    with torch._inductor.config.patch(fx_graph_cache=False):
        for group in groups:
            ref = None
            for variant in group:
                try:
                    grads, seconds = first_step_grads(variant, x, y, device)
                    ref = grads if ref is None else ref
                    variant.compile_s = None if variant.compiled is variant.model else seconds
                    variant.grad_err, variant.tol = grad_error(grads, ref), tol
                    if variant.label.endswith('"sparse"'):
                        report = sparse_compile.report(variant.compiled)
                        variant.masked_layers = f"{sum(r.format != 'dense' for r in report.layers)}/{variant.masked_total}"
                    for _ in range(args.warmup):
                        train_step(variant, x, y)
                    progress(f"{variant.label} {variant.sparsity} {variant.tile}: first step {seconds:.1f} s")
                except Exception as error:  # noqa: BLE001 - reported in the table instead
                    variant.note = f"not run: {common.describe_error(error)}"
        variants = [v for group in groups for v in group if v.note == ""]

        def step_ms(step) -> float:
            common.synchronize(device)
            start = time.perf_counter()
            step()
            common.synchronize(device)
            return (time.perf_counter() - start) * 1e3

        # One step of every variant per round (the library's round-robin loop), so load hits all alike.
        steps = {i: functools.partial(train_step, variant, x, y) for i, variant in enumerate(variants)}
        times = round_robin(
            steps, args.reps, one_call_at_a_time(step_ms),
            after_round=lambda done, took, left: progress(f"timed round {done}/{args.reps}: {took:.1f} s"),
        )  # fmt: skip
        for i, variant in enumerate(variants):
            variant.times_ms.extend(times[i])

    def median(group: list[Variant], suffix: str) -> float | None:
        return next((v.median_ms for v in group if v.label.endswith(suffix)), None)

    dense_compile_ms = median(groups[0], ", torch.compile")
    rows = []
    for group in groups:
        eager_ms, inductor_ms = median(group, ", eager"), median(group, ", torch.compile")
        for variant in group:
            cells = [
                variant.label,
                "-" if variant.sparsity is None else f"{variant.sparsity:.0%}",
                "-" if variant.tile is None else str(variant.tile),
                variant.masked_layers,
            ]
            if variant.note:
                rows.append(cells + ["-"] * 7 + [variant.note])
                continue
            check = "ok" if variant.ok else f"WRONG: err > {variant.tol:.0e}"
            rows.append(cells + [
                common.fmt(variant.median_ms if variant.ok else None, 1), str(len(variant.times_ms)),
                common.fmt_ratio(eager_ms, variant.median_ms), common.fmt_ratio(inductor_ms, variant.median_ms),
                common.fmt_ratio(dense_compile_ms, variant.median_ms), common.fmt(variant.compile_s, 1),
                f"{variant.grad_err:.1e}", check,
            ])
    title = f"{args.model}, {common.dtype_name(dtype)}" + (", autocast bfloat16" if args.amp else "")
    table = common.Table(title, HEADERS, rows)
    print(f"\n{table.title}\n{table.text()}", flush=True)
    raw = [
        dict(dtype=common.dtype_name(dtype), autocast=common.dtype_name(autocast) if autocast else None,
             variant=v.label, sparsity=v.sparsity, tile=v.tile, times_ms=v.times_ms)
        for group in groups for v in group if v.times_ms
    ]
    ok = all(v.ok or v.note for group in groups for v in group)
    return table, raw, ok


if __name__ == "__main__":
    sys.exit(main())
