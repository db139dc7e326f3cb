"""ViT inference latency: dense eager, dense torch.compile, torch.sparse BSR, and backend="sparse".

    python -m benchmarks.vit                       # GPU: the seed's ViT-B/16 setting; CPU: a small ViT
    python -m benchmarks.vit --help

The model has random weights; every encoder linear (attention in/out projections and both MLP
linears, not the classifier head) is block-pruned by magnitude, as in the seed's benchmark.
Every row runs the same input and is checked against dense eager of the same weights.

Dense rows do not depend on sparsity or block size (a dense matmul does the same work whatever
the values), so they run once per dtype, on the model before pruning, and each sparse row is
compared with them.

Timing: every row of a dtype is compiled and checked first; then all of them are timed
round-robin (one call of each in turn, ``--reps`` rounds), so load from other processes hits every
row alike. A row's speedup is the median of its per-round ratios to a dense row, its spread their
interquartile range. A row of sparse_compile whose whole spread lies below dense torch.compile
(the backend's contract: never slower than dense) is flagged ``SLOWER`` and fails the run; a
spread that holds 1.0 is a tie. Progress goes to stderr; the last line of stdout is the verdict.

"2:4 (N:M-trained)" (once per dtype): every encoder linear and attention in_proj masked 2:4 by
magnitude (``apply_nm`` + ``finalize``, the masks an N:M training ends with), compiled with
``backend="sparse"``: the backend runs those linears on torch's 2:4 kernels where its
measurement finds them faster. Those kernels need a GPU (sm80/sm90) and fp16/bf16; elsewhere the
row says why instead of a number.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import os
import pathlib
import sys
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import sparse_compile
from sparse_compile.measure import wait_for_compile_workers
from benchmarks import common, floors, plot

# The CPU default: two blocks of ViT-B's widths (768, MLP 3072, 12 heads) at ViT-B/32's 50 tokens,
# batch 4 (200 rows): ViT-B's linear shapes at a size 2 cores run in ~30 ms. Smaller layers
# (the former default: 256 wide, 272 rows) showed nothing when BSR on CPU ran gathered block
# matmuls: dense F.linear beat them on 2 threads, so the measured choice kept every layer dense.
CPU_TINY = dict(image_size=224, patch_size=32, num_layers=2, hidden_dim=768, mlp_dim=3072, num_heads=12)
TINY_FLAGS = ("patch_size", "num_layers", "hidden_dim", "mlp_dim", "num_heads")

#: ``--variants``: which rows run (default all). Each compiled row compiles the whole model
#: afresh (tens of seconds for ViT-B on a GPU, minutes with max-autotune), so a run that must fit
#: a time limit picks its rows. The references (dense eager on the dense and on the pruned
#: weights) are computed whatever is picked.
VARIANTS = {
    "eager": "dense eager",
    "compile": "dense torch.compile",
    "max-autotune": "dense torch.compile (max-autotune), GPU only",
    "torch-sparse": "torch.sparse BSR (eager)",
    "sparse": 'torch.compile backend="sparse"',
    "supermask": "Supermask layout incl. and excl. in_proj (backend=\"sparse\")",
    "2:4": "2:4 (N:M-trained), once per dtype",
}

DEFAULTS = {
    # The seed's setting (superblock README: ViT-B/16, batch 256, 224 px).
    "cuda": dict(
        model="vit_b_16", batch_size=256, image_size=224, dtype=[torch.float32, torch.bfloat16],
        sparsity=[0.8, 0.9], blocksize=[32, 64], warmup=3, reps=20, variants=list(VARIANTS),
    ),
    # Sized for a few minutes on 2 quiet cores, compile times included; three sparsities so
    # that the plot draws lines. 20 rounds: the quartiles of 20 per-round ratios are stable.
    "cpu": dict(
        model="tiny", batch_size=4, image_size=CPU_TINY["image_size"], dtype=[torch.float32],
        sparsity=[0.5, 0.7, 0.9], blocksize=[32, 64], warmup=3, reps=20, variants=list(VARIANTS),
    ),
}

HEADERS = [
    "variant", "sparsity", "block", "sparse layers", "median ms", "rounds", "vs eager", "vs compile",
    "spread", "verdict", "compile s", "linears floor ms", "% of floor", "rel err", "check",
]

#: Where the table (markdown) and the plot go unless ``--output`` / ``--plot`` say otherwise.
OUT_DIR = pathlib.Path(__file__).resolve().parent / "out"

#: The headline row of the verdict: backend="sparse" nearest the seed's 90% sparsity, block 32.
HEADLINE = (0.9, 32)


# --------------------------------------------------------------------------------------------
# Command line


def vit_names() -> list[str]:
    return sorted(name for name in torchvision.models.list_models(module=torchvision.models) if name.startswith("vit_"))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.vit", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", choices=["tiny", *vit_names()],
        help="a torchvision ViT, or 'tiny' (built from --patch-size, --num-layers, ...); "
        "default: vit_b_16 on GPU, tiny on CPU",
    )
    parser.add_argument("--batch-size", type=common.positive_int)
    parser.add_argument("--image-size", type=common.positive_int)
    for flag in TINY_FLAGS:
        parser.add_argument(
            f"--{flag.replace('_', '-')}", type=common.positive_int,
            help=f"--model tiny only (default {CPU_TINY[flag]})",
        )
    parser.add_argument(
        "--variants", action="append", type=common.comma_list(_variant),
        help="rows to run, comma list (default: all): " + "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()),
    )
    parser.add_argument(
        "--no-plot", action="store_true",
        help=f"no plot (default: one at {_shown(OUT_DIR)}/vit-<device>.png when matplotlib is installed)",
    )
    common.add_timing_cache_arg(parser)
    common.add_common_args(parser)
    for action in parser._actions:
        if action.dest == "reps":
            action.help = "timed rounds: one call of every row per round; medians and spreads over the rounds"
        elif action.dest == "output":
            action.help = f"the tables and raw numbers as markdown (default: {_shown(OUT_DIR)}/vit-<device>.md)"
    args = parser.parse_args(argv)
    if args.plot and args.no_plot:
        parser.error("--plot and --no-plot contradict each other")
    common.finish_args(parser, args, DEFAULTS)
    _check_model_flags(parser, args)
    if args.output is None:
        args.output = str(OUT_DIR / f"vit-{args.device}.md")
    if args.plot is None and not args.no_plot and importlib.util.find_spec("matplotlib") is not None:
        args.plot = str(OUT_DIR / f"vit-{args.device}.png")
    return args


def _shown(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies under it (the repository root)."""
    try:
        return os.path.relpath(path) if not os.path.relpath(path).startswith("..") else str(path)
    except ValueError:  # another drive (Windows)
        return str(path)


def _variant(text: str) -> str:
    if text not in VARIANTS:
        raise ValueError(f"unknown variant {text!r}; use any of {', '.join(VARIANTS)}")
    return text


def _check_model_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    given = [flag for flag in TINY_FLAGS if getattr(args, flag) is not None]
    if args.model != "tiny":
        if given:
            parser.error(f"--{given[0].replace('_', '-')} applies to --model tiny only; {args.model} has its own")
        patch_size = int(args.model.rsplit("_", 1)[1])  # vit_b_16 -> 16
    else:
        for flag in TINY_FLAGS:
            if getattr(args, flag) is None:
                setattr(args, flag, CPU_TINY[flag])
        if args.hidden_dim % args.num_heads:
            parser.error(f"--hidden-dim {args.hidden_dim} is not a multiple of --num-heads {args.num_heads}")
        patch_size = args.patch_size
    if args.image_size % patch_size:
        parser.error(f"--image-size {args.image_size} is not a multiple of the patch size {patch_size}")


# --------------------------------------------------------------------------------------------
# Model


def build_model(args: argparse.Namespace) -> nn.Module:
    """The dense model with random weights, eval mode, on CPU in fp32 (seeded: same every run)."""
    torch.manual_seed(0)
    if args.model == "tiny":
        model = torchvision.models.VisionTransformer(
            image_size=args.image_size, **{flag: getattr(args, flag) for flag in TINY_FLAGS}
        )
    else:
        model = torchvision.models.get_model(args.model, weights=None, image_size=args.image_size)
    # torchvision initialises the classifier head to zeros: every output would be 0 and the
    # output check would pass whatever the encoder computed.
    for module in model.heads.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.normal_(module.bias, std=0.02)
    return model.eval()


def model_config(args: argparse.Namespace, model: nn.Module) -> str:
    encoder_layers = len(model.encoder.layers)
    return (
        f"{args.model}: image {args.image_size}, patch {model.patch_size}, layers {encoder_layers}, "
        f"hidden {model.hidden_dim}, mlp {model.mlp_dim}, heads {model.encoder.layers[0].num_heads}, "
        f"{model.seq_length} tokens, batch {args.batch_size}"
    )


def is_encoder(name: str, _module: nn.Module) -> bool:
    return name.startswith("encoder")


def pruned_copy(model: nn.Module, sparsity: float, blocksize: int) -> tuple[nn.Module, list[str]]:
    pruned = copy.deepcopy(model)
    names = sparse_compile.prune_linear_blocks_(pruned, sparsity, blocksize, filter_fn=is_encoder)
    return pruned, names


# --------------------------------------------------------------------------------------------
# The torch.sparse reference path: F.linear on weights converted with Tensor.to_sparse_bsr


class BsrLinear(nn.Module):
    """``F.linear`` with a ``torch.sparse_bsr`` weight (flattened to 2-D: the BSR matmul wants it)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, blocksize: int):
        super().__init__()
        self.weight = weight.detach().to_sparse_bsr(blocksize)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])


class BsrSelfAttention(nn.Module):
    """``nn.MultiheadAttention`` (self-attention, batch_first) with BSR in/out projections.

    The module itself cannot take sparse weights (its fused path reads ``in_proj_weight`` as a
    dense tensor), so this spells it out: in projection, scaled dot-product attention, out
    projection. Called as ViT's encoder block calls it: ``attn(x, x, x, need_weights=False)``.
    """

    def __init__(self, attention: nn.MultiheadAttention, blocksize: int):
        super().__init__()
        if not attention.batch_first or attention.in_proj_weight is None:
            raise ValueError("BsrSelfAttention takes batch_first attention with a packed in_proj_weight")
        self.num_heads = attention.num_heads
        self.in_proj = BsrLinear(attention.in_proj_weight, attention.in_proj_bias, blocksize)
        self.out_proj = BsrLinear(attention.out_proj.weight, attention.out_proj.bias, blocksize)

    def forward(self, query, key, value, need_weights=False):
        if not (query is key is value) or need_weights:
            raise NotImplementedError("BsrSelfAttention: self-attention without attention weights only")
        batch, tokens, hidden = query.shape
        q, k, v = self.in_proj(query).view(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [batch, heads, tokens, head_dim]
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, hidden)), None


def to_torch_sparse(model: nn.Module, blocksize: int) -> tuple[nn.Module, int]:
    """A copy whose encoder linears run through ``torch.sparse`` BSR; returns it and how many."""
    model = copy.deepcopy(model)
    converted = 0
    # Attention first: its out_proj is an nn.Linear that the attention module itself calls.
    for kind in (nn.MultiheadAttention, nn.Linear):
        for name, module in list(model.named_modules()):
            if not isinstance(module, kind) or not is_encoder(name, module):
                continue
            if isinstance(module, nn.MultiheadAttention):
                replacement, count = BsrSelfAttention(module, blocksize), 2
            else:
                replacement, count = BsrLinear(module.weight, module.bias, blocksize), 1
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, replacement)
            converted += count
    return model, converted


# --------------------------------------------------------------------------------------------
# Rows


@dataclasses.dataclass
class Row:
    variant: str
    sparsity: float | None = None
    blocksize: int | None = None
    sparse_layers: str = "-"
    timing: common.Timing | None = None
    compile_s: float | None = None
    rel_err: float | None = None
    tol: float | None = None
    floor: float | None = None  # the linears' floor (benchmarks.floors), ms
    ours: bool = False  # a row of sparse_compile: if it cannot run, the run fails
    note: str = ""  # why the row did not run, when it did not
    fn: Callable[[], Any] | None = dataclasses.field(default=None, repr=False)  # built, waiting to be timed
    vs_eager: common.Speedup | None = None  # over dense eager, round by round
    vs_compile: common.Speedup | None = None  # over dense torch.compile, round by round
    versus: common.Speedup | None = None  # over the baseline: dense torch.compile, else dense eager

    @property
    def ok(self) -> bool:
        return self.timing is not None and self.rel_err is not None and self.rel_err <= self.tol

    @property
    def median_ms(self) -> float | None:
        # A wrong answer gets no speedup: a fast wrong kernel must not look like a win.
        return self.timing.median_ms if self.ok else None

    @property
    def name(self) -> str:
        if self.sparsity is None:
            return self.variant
        return f"{self.variant} {self.sparsity:.0%}" + ("" if self.blocksize is None else f" / {self.blocksize}")

    @property
    def slower(self) -> bool:
        """A row of sparse_compile slower than the dense baseline beyond the spread: fails the run."""
        return self.ours and self.versus is not None and self.versus.verdict == "slower"


@dataclasses.dataclass
class Job:
    """A row to build: ``make`` returns the function to call and, optionally, one that says how
    many layers run sparse (see :func:`build_row`); ``make=None``: the row only says why not."""

    row: Row
    make: Callable[[], tuple[Callable[[], Any], Callable[[], str] | None]] | None = None
    ref: torch.Tensor | None = None
    compiled: bool = False


@dataclasses.dataclass
class Setup:
    """What every row of one dtype shares."""

    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    x: torch.Tensor
    gpu: floors.Gpu | None = None  # whose floor the table shows
    progress: common.Progress = dataclasses.field(default_factory=lambda: common.Progress("vit"))

    @property
    def tol(self) -> float:
        return common.tolerance(self.dtype, self.args.tf32)


def build_row(setup: Setup, job: Job, index: int, total: int) -> Row:
    """Builds the row's variant, runs it once (timing the compile) and checks it; the function
    stays on the row for :func:`time_rows`. The compiled rows of one dtype stay compiled side by
    side (no ``torch._dynamo.reset()`` between them: they are timed round-robin afterwards).

    The layer count is asked after the first call (compiling is lazy). Any failure becomes the
    row's note: one path that cannot run must not hide the others.
    """
    row, progress = job.row, setup.progress
    if job.make is None:
        progress(f"row {index}/{total} {row.name}: {row.note}; {total - index} left")
        return row
    sparse_compile.clear_reports()
    verb = "compiling" if job.compiled else "running"
    start = time.monotonic()
    try:
        with torch.no_grad(), progress.heartbeat(f"{verb} {row.name}"):
            fn, count_layers = job.make()
            out, seconds = common.first_call(fn, setup.device)
            row.compile_s = seconds if job.compiled else None
            if count_layers is not None:
                row.sparse_layers = count_layers()
            row.rel_err, row.tol = common.relative_error(out, job.ref), setup.tol
            row.fn = fn
        status = "ok" if row.rel_err <= row.tol else f"WRONG (err {row.rel_err:.1e})"
    except Exception as error:  # noqa: BLE001 - reported in the table instead
        row.note = f"not run: {common.describe_error(error)}"
        status = row.note
    took = time.monotonic() - start
    layers = "" if row.sparse_layers == "-" else f", {row.sparse_layers} layers sparse"
    progress(f"{'compiled' if job.compiled else 'built'} {index}/{total} {row.name}: {took:.1f} s{layers}, "
             f"{status}; {total - index} left")
    return row


def time_rows(setup: Setup, rows: list[Row]) -> None:
    """Times every built row round-robin, then compares each with the dense rows round by round."""
    built = {row.name: row.fn for row in rows if row.fn is not None}  # names are unique within a dtype
    wait_for_compile_workers()  # compiling started them: see common.warm_up_compiler
    setup.progress(f"timing {len(built)} rows round-robin: {setup.args.warmup} warm-up calls each, "
                   f"then {setup.args.reps} rounds")
    with torch.no_grad():  # as each row was compiled: another grad mode would compile it again
        timings, errors = common.time_round_robin(built, setup.device, setup.args.warmup, setup.args.reps,
                                                  setup.progress)
    for row in rows:
        row.fn = None  # the compiled models go with it
        if row.name in timings:
            row.timing = timings[row.name]
        elif row.name in errors:
            row.note = f"not run: {common.describe_error(errors[row.name])}"
    compare(rows)


def dense_row(rows: list[Row], label: str) -> Row | None:
    """The dense row called ``label`` when it ran and was right."""
    return next((row for row in rows if row.variant == label and row.ok), None)


def compare(rows: list[Row]) -> None:
    """Each right row's speedups over dense eager and dense torch.compile (median and spread of
    the per-round ratios); ``versus``: over dense torch.compile, or dense eager when that did not run."""
    eager, compiled = dense_row(rows, "dense eager"), dense_row(rows, "dense torch.compile")
    for row in rows:
        if not row.ok:
            continue
        row.vs_eager = common.paired_speedup(eager.timing, row.timing) if eager else None
        row.vs_compile = common.paired_speedup(compiled.timing, row.timing) if compiled else None
        row.versus = row.vs_compile if compiled else row.vs_eager


def on_device(model: nn.Module, setup: Setup) -> nn.Module:
    return model.to(device=setup.device, dtype=setup.dtype)


def eager(model: nn.Module, setup: Setup):
    model = on_device(model, setup)
    return lambda: model(setup.x), None


def inductor(model: nn.Module, setup: Setup, mode: str | None):
    compiled = torch.compile(on_device(model, setup), mode=mode)
    return lambda: compiled(setup.x), None


def torch_sparse(model: nn.Module, setup: Setup, blocksize: int, total: int):
    sparse_model, converted = to_torch_sparse(on_device(model, setup), blocksize)
    return lambda: sparse_model(setup.x), lambda: f"{converted}/{total}"


def sparse_backend(model: nn.Module, setup: Setup, blocksize: int):
    compiled = torch.compile(on_device(model, setup), backend="sparse", options={"blocksize": blocksize})

    def count_layers() -> str:
        report = sparse_compile.report(compiled)
        return f"{len(report.sparse_layers)}/{len(report.convertible_layers)}"

    return lambda: compiled(setup.x), count_layers


def linears_floor(model: nn.Module, setup: Setup, blocksize: int | None, sparse_24: bool = False) -> float | None:
    """Floor of the model's linears alone (``benchmarks.floors``), ms: encoder linears as BSR of
    their (pruned) weights when ``blocksize`` is given, as 2:4 (half stored, 2:4 tensor-core
    peak) with ``sparse_24``, dense otherwise; the head always dense.

    Attention, norms and the rest are left out, so the whole model's time is always further
    above this than a single kernel's: read "% of floor" as an upper bound on what the linears
    reach.
    """
    tokens, batch = model.seq_length, setup.args.batch_size
    linears = []
    for name, module in model.named_modules():
        weights = []
        if isinstance(module, nn.Linear):
            weights = [module.weight]
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            weights = [module.in_proj_weight]  # out_proj is an nn.Linear of its own
        for weight in weights:
            m = batch if name.startswith("heads") else batch * tokens  # the head sees the class token
            n, k = weight.shape
            if (blocksize is not None or sparse_24) and is_encoder(name, module):
                if sparse_24:
                    linears.append(floors.Linear(m, k, n, setup.dtype, stored=n * k // 2, sparse_24=True))
                else:
                    linears.append(floors.bsr_linear(m, weight, blocksize, setup.dtype))
            else:
                linears.append(floors.Linear(m, k, n, setup.dtype))
    return floors.floor_ms(linears, setup.gpu, setup.args.tf32)


@dataclasses.dataclass(frozen=True)
class SparseVariant:
    """One way of running the pruned model: a row per (sparsity, block size).

    ``make(pruned_model, setup, blocksize, total_linears)`` returns the function to time and one
    that says how many layers run sparse (see :func:`build_row`). ``ours``: a row of
    sparse_compile (if it cannot run, the run fails). ``sparse_24``: its linears run on 2:4
    sparse tensor cores (the floor then uses that peak).
    """

    label: str
    make: Callable[[nn.Module, Setup, int, int], tuple[Callable[[], Any], Callable[[], str] | None]]
    compiled: bool
    ours: bool
    sparse_24: bool = False
    key: str = ""  # its name in --variants


def _torch_sparse_variant(pruned: nn.Module, setup: Setup, blocksize: int, total: int):
    return torch_sparse(pruned, setup, blocksize, total)


def _sparse_backend_variant(pruned: nn.Module, setup: Setup, blocksize: int, total: int):
    return sparse_backend(copy.deepcopy(pruned), setup, blocksize)


SPARSE_LABEL = 'torch.compile backend="sparse"'

#: Every sparse row, in table order. A new way of running the pruned model is one entry here.
SPARSE_VARIANTS = [
    SparseVariant("torch.sparse BSR (eager)", _torch_sparse_variant, compiled=False, ours=False, key="torch-sparse"),
    SparseVariant(SPARSE_LABEL, _sparse_backend_variant, compiled=True, ours=True, key="sparse"),
]


def dense_rows(setup: Setup, model: nn.Module) -> list[Job]:
    with torch.no_grad():
        ref = on_device(copy.deepcopy(model), setup)(setup.x)
    floor = linears_floor(model, setup, None)
    jobs = []
    if "eager" in setup.args.variants:
        jobs.append(Job(Row("dense eager", floor=floor), lambda: eager(copy.deepcopy(model), setup), ref))
    modes = [None, "max-autotune"] if setup.device.type == "cuda" else [None]
    for mode in modes:
        if ("max-autotune" if mode else "compile") not in setup.args.variants:
            continue
        label = "dense torch.compile" + (f" ({mode})" if mode else "")
        make = lambda mode=mode: inductor(copy.deepcopy(model), setup, mode)  # noqa: E731
        jobs.append(Job(Row(label, floor=floor), make, ref, compiled=True))
    return jobs


def sparse_rows(setup: Setup, model: nn.Module, sparsity: float, blocksize: int) -> list[Job]:
    variants = [variant for variant in SPARSE_VARIANTS if variant.key in setup.args.variants]
    if not variants:
        return []
    pruned, names = pruned_copy(model, sparsity, blocksize)
    total = sum(isinstance(m, nn.Linear) for m in pruned.modules())  # MHA out_proj included
    total += sum(isinstance(m, nn.MultiheadAttention) for m in pruned.modules())  # in_proj
    with torch.no_grad():
        # The reference for every sparse row: dense eager on the pruned weights.
        ref = on_device(copy.deepcopy(pruned), setup)(setup.x)
    jobs = []
    for variant in variants:
        row = Row(variant.label, sparsity, blocksize, ours=variant.ours,
                  floor=linears_floor(pruned, setup, blocksize, variant.sparse_24))
        make = lambda variant=variant: variant.make(pruned, setup, blocksize, total)  # noqa: E731
        jobs.append(Job(row, make, ref, compiled=variant.compiled))
    return jobs


def supermask_rows(setup: Setup, model: nn.Module, sparsity: float, blocksize: int) -> list[Job]:
    """backend="sparse" on a Supermask layout (tile = block) with and without attention in_proj (issue 14).

    The masks keep their initial random scores: training moves which tiles are kept, not how
    many, and the speed depends on how many.
    """
    from sparse_compile.training import apply_supermask, finalize

    jobs = []
    for in_proj in (True, False):
        masked = copy.deepcopy(model)
        apply_supermask(masked, linear_sparsity=sparsity, linear_tile_size=blocksize, filter_fn=is_encoder,
                        attention_in_proj=in_proj)
        finalize(masked)
        with torch.no_grad():
            ref = on_device(copy.deepcopy(masked), setup)(setup.x)
        label = f"Supermask layout {'incl.' if in_proj else 'excl.'} in_proj"
        row = Row(label, sparsity, blocksize, ours=True, floor=linears_floor(masked, setup, blocksize))
        jobs.append(Job(row, lambda m=masked: sparse_backend(copy.deepcopy(m), setup, blocksize), ref, compiled=True))
    return jobs


NM_LABEL = "2:4 (N:M-trained)"


def nm_rows(setup: Setup, model: nn.Module) -> list[Job]:
    """backend="sparse" on a model whose encoder linears carry 2:4 masks (issue 9)."""
    from sparse_compile.kernels import semi_structured
    from sparse_compile.training import apply_nm, finalize

    masked = copy.deepcopy(model)
    apply_nm(masked, 2, 4, mode="forward", filter_fn=is_encoder, attention_in_proj=True)
    finalize(masked)
    row = Row(NM_LABEL, 0.5, floor=linears_floor(masked, setup, None, sparse_24=True))
    if setup.device.type != "cuda":
        row.note = "needs a GPU: torch's 2:4 kernels are CUDA-only (the CPU reference makes no speed claim)"
        return [Job(row)]
    if setup.dtype not in semi_structured.CUDA_DTYPES:
        row.note = f"no 2:4 kernel for {common.dtype_name(setup.dtype)} (torch's: float16, bfloat16)"
        return [Job(row)]
    if not semi_structured.cuda_kernels(setup.device):
        row.note = f"torch has no 2:4 kernel on {common.device_name(setup.device)}"
        return [Job(row)]
    row.ours = True
    with torch.no_grad():
        ref = on_device(copy.deepcopy(masked), setup)(setup.x)
    return [Job(row, lambda: sparse_backend_default(copy.deepcopy(masked), setup), ref, compiled=True)]


def sparse_backend_default(model: nn.Module, setup: Setup):
    """backend="sparse" with its default options (every layer measured, every format)."""
    compiled = torch.compile(on_device(model, setup), backend="sparse")

    def count_layers() -> str:
        report = sparse_compile.report(compiled)
        return f"{len(report.sparse_layers)}/{len(report.convertible_layers)}"

    return lambda: compiled(setup.x), count_layers


def verdict_cell(row: Row, baseline: Row | None) -> str:
    """faster / tie / slower over the baseline; ``SLOWER`` (capitals) for a row of sparse_compile,
    which fails the run."""
    if row is baseline:
        return "baseline"
    if row.versus is None:
        return "-"
    return "SLOWER" if row.slower else row.versus.verdict


def table_rows(rows: list[Row], device: torch.device) -> list[list[str]]:
    baseline = dense_row(rows, "dense torch.compile") or dense_row(rows, "dense eager")
    out = []
    for row in rows:
        cells = [
            row.variant,
            "-" if row.sparsity is None else f"{row.sparsity:.0%}",
            "-" if row.blocksize is None else str(row.blocksize),
            row.sparse_layers,
        ]
        if row.timing is None:
            out.append(cells + ["-"] * 10 + [row.note])
            continue
        check = "ok" if row.ok else f"WRONG: err > {row.tol:.0e}"
        out.append(cells + [
            common.fmt(row.timing.median_ms, 3), str(row.timing.reps),
            _speedup(row.vs_eager), _speedup(row.vs_compile),
            "-" if row.versus is None or row is baseline else row.versus.spread, verdict_cell(row, baseline),
            common.fmt(row.compile_s, 1), common.fmt_sig(row.floor),
            common.fmt(floors.percent_of_floor(row.floor, row.median_ms, device), 0), f"{row.rel_err:.1e}", check,
        ])
    return out


def _speedup(speedup: common.Speedup | None) -> str:
    return "-" if speedup is None else f"{speedup.median:.2f}x"


def raw_records(dtype: torch.dtype, rows: list[Row]) -> list[dict[str, Any]]:
    return [
        dict(dtype=common.dtype_name(dtype), variant=row.variant, sparsity=row.sparsity,
             block=row.blocksize, times_ms=row.timing.times_ms)
        for row in rows if row.timing is not None
    ]


# --------------------------------------------------------------------------------------------
# Main


def plot_points(dtype: torch.dtype, rows: list[Row]) -> list[plot.Point]:
    """Speedup of each sparse row over the baseline: dense torch.compile (the best dense row on
    every device), dense eager when that did not run."""
    return [
        plot.Point(common.dtype_name(dtype), row.blocksize, row.variant, row.sparsity,
                   None if row.versus is None else row.versus.median)
        for row in rows if row.sparsity is not None and row.blocksize is not None  # 2:4: table only
    ]


def baseline_label(rows_by_dtype: list[tuple[torch.dtype, list[Row]]]) -> str:
    compiled = all(dense_row(rows, "dense torch.compile") for _, rows in rows_by_dtype)
    return "dense torch.compile" if compiled else "dense eager"


def headline(rows_by_dtype: list[tuple[torch.dtype, list[Row]]]) -> tuple[torch.dtype, Row] | None:
    """The verdict's row: backend="sparse" of the first dtype nearest :data:`HEADLINE` (90%, block 32)."""
    for dtype, rows in rows_by_dtype:
        candidates = [row for row in rows if row.variant == SPARSE_LABEL and row.versus is not None]
        if candidates:
            return dtype, min(candidates, key=lambda r: (abs(r.sparsity - HEADLINE[0]), abs(r.blocksize - HEADLINE[1])))
    return None


def verdict_line(rows_by_dtype: list[tuple[torch.dtype, list[Row]]], device: torch.device, args: argparse.Namespace,
                 total_s: float, plot_written: bool) -> str:
    """The closing line: the headline speedup on this device, how many rows of ours are slower
    than dense (the run fails if any), the total time and where the table and plot went."""
    parts = []
    found = headline(rows_by_dtype)
    if found is None:
        parts.append(f'no backend="sparse" row was timed against dense on {device.type}')
    else:
        dtype, row = found
        rows = rows_by_dtype[[d for d, _ in rows_by_dtype].index(dtype)][1]
        baseline = "dense torch.compile" if dense_row(rows, "dense torch.compile") else "dense eager"
        parts.append(
            f'backend="sparse" at {row.sparsity:.0%} / block {row.blocksize}, {common.dtype_name(dtype)}: '
            f"{row.versus.median:.2f}x {baseline} (spread {row.versus.spread}, {row.versus.verdict}) "
            f"on {device.type} ({common.device_name(device)}"
            + (f", {torch.get_num_threads()} threads)" if device.type == "cpu" else ")")
        )
    ours = [row for _, rows in rows_by_dtype for row in rows if row.ours and row.versus is not None]
    slower = sum(row.slower for row in ours)
    ties = sum(row.versus.verdict == "tie" for row in ours)
    parts.append(f"rows of sparse_compile slower than dense beyond the spread: {slower} of {len(ours)}"
                 + (f" ({ties} ties)" if ties else ""))
    parts.append(f"total {common.fmt_seconds(total_s)}")
    parts.append(f"table: {_shown(args.output)}")
    if args.plot:
        parts.append(f"plot: {_shown(args.plot)}" if plot_written else "plot: not written")
    return "verdict: " + "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark and prints the tables; returns 1 if a row gave a wrong answer, one of
    sparse_compile's rows did not run, or one was slower than dense beyond the spread."""
    args = parse_args(argv)
    progress = common.Progress("vit")
    # Every row of a dtype stays compiled until it is timed: one Dynamo cache entry each, and a
    # row past the limit must fail, not silently run eagerly.
    with common.timing_cache(args.timing_cache), torch._dynamo.config.patch(
        recompile_limit=256, accumulated_recompile_limit=4096, fail_on_recompile_limit_hit=True
    ):
        return _run(args, argv, progress)


def plan(setup: Setup, model: nn.Module) -> list[Job]:
    """Every row of one dtype, in table order, not yet built."""
    args = setup.args
    jobs = dense_rows(setup, model)
    if "2:4" in args.variants:
        jobs += nm_rows(setup, model)
    for sparsity in args.sparsity:
        for blocksize in args.blocksize:
            jobs += sparse_rows(setup, model, sparsity, blocksize)
            if "supermask" in args.variants:
                jobs += supermask_rows(setup, model, sparsity, blocksize)
    return jobs


def _run(args: argparse.Namespace, argv: Sequence[str] | None, progress: common.Progress) -> int:
    device = common.set_up_run(args)
    gpu = floors.gpu_for(device, args.floor_gpu)
    progress(f"starting on {device.type} ({common.device_name(device)}): compiler warm-up")
    with progress.heartbeat("warming up the compiler"):
        common.warm_up_compiler(device)
    model = build_model(args)
    torch.manual_seed(1)
    x_fp32 = torch.randn(args.batch_size, 3, args.image_size, args.image_size)

    facts = common.environment(device, args.tf32) + [
        ("model", model_config(args, model)),
        ("dtypes", ", ".join(common.dtype_name(d) for d in args.dtype)),
        ("sparsity", ", ".join(f"{s:.0%}" for s in args.sparsity) + " of the blocks of every encoder linear"),
        ("block sizes", ", ".join(map(str, args.blocksize))),
        ("timing", timing_fact(device, args)),
        ("sparse backend", f"timing cache {args.timing_cache or 'new and empty (every layer measured in this run)'}"),
        ("floor", f"{gpu.name} data-sheet peaks, linears only (benchmarks/floors.py)" if gpu else "unknown GPU"),
    ]
    common.print_key_values(facts)

    tables, raw, points, all_ok, ours_not_run, ours_slower = [], [], [], True, [], []
    rows_by_dtype: list[tuple[torch.dtype, list[Row]]] = []
    for dtype in args.dtype:
        setup = Setup(args, device, dtype, x_fp32.to(device=device, dtype=dtype), gpu, progress)
        torch._dynamo.reset()
        # The sparse backend never uses Inductor's on-disk graph cache; with it off for dense
        # too, "compile s" compares cold compiles, whatever ran before on this machine.
        with torch._inductor.config.patch(fx_graph_cache=False):
            progress(f"{common.dtype_name(dtype)}: pruning and reference outputs")
            with progress.heartbeat("pruning and computing reference outputs"):
                jobs = plan(setup, model)
            rows = [build_row(setup, job, i + 1, len(jobs)) for i, job in enumerate(jobs)]
            time_rows(setup, rows)
        torch._dynamo.reset()
        rows_by_dtype.append((dtype, rows))
        table = common.Table(f"{args.model}, {common.dtype_name(dtype)}", HEADERS, table_rows(rows, device))
        print(f"\n{table.title}\n{table.text()}", flush=True)
        tables.append(table)
        raw += raw_records(dtype, rows)
        points += plot_points(dtype, rows)
        all_ok &= all(row.ok or row.timing is None for row in rows)
        ours_not_run += [
            f"{common.dtype_name(dtype)} {row.name}: {row.note}" for row in rows if row.ours and row.timing is None
        ]
        ours_slower += [
            f"{common.dtype_name(dtype)} {row.name}: {row.versus.median:.2f}x (spread {row.versus.spread})"
            for row in rows if row.slower
        ]

    legend = (
        "sparse layers: linears run sparse / linears in the model. rounds: timed calls of each row, one per "
        "round, every row in every round. vs eager, vs compile: median over the rounds of dense eager's or "
        "dense torch.compile's time / this row's time in the same round (>1: faster). spread: the "
        "interquartile range of those ratios against dense torch.compile (dense eager when it did not run). "
        "verdict: faster (spread above 1), tie (spread holds 1), slower (below 1); SLOWER: a row of "
        "sparse_compile slower than dense, which fails the run. compile s: wall time of the first call (cold "
        "compile). linears floor ms: the model's linears alone at the floor GPU's peaks (attention and the "
        "rest not counted); % of floor: that floor / median (GPU runs only). rel err: max |out - dense eager "
        "out| / max |dense eager out|, same weights and dtype."
    )
    plot_written = False
    if args.plot:
        pathlib.Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot.plot_speedups(args.plot, f"{model_config(args, model)}\n{common.device_name(device)}",
                           baseline_label(rows_by_dtype), points, None)
        plot_written = True
        print(f"wrote {args.plot}")
    pathlib.Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    closing = verdict_line(rows_by_dtype, device, args, progress.elapsed_s(), plot_written)
    return common.finish_run(args, argv, "benchmarks.vit", "ViT inference latency", legend, facts, tables, raw,
                             all_ok, ours_not_run, ours_slower=ours_slower, closing=closing)


def timing_fact(device: torch.device, args: argparse.Namespace) -> str:
    per_call = ("CUDA events around each call, L2 flushed before it" if device.type == "cuda"
                else "torch.utils.benchmark.Timer, each timed call after 2 untimed ones")
    return (f"round-robin over every row of a dtype: {args.warmup} warm-up calls each, then {args.reps} rounds "
            f"of one timed call of each row ({per_call}); medians and interquartile ranges of per-round ratios")


if __name__ == "__main__":
    sys.exit(main())
