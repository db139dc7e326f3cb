"""ViT inference latency: dense eager, dense torch.compile, torch.sparse BSR, and backend="sparse".

    python -m benchmarks.vit                       # GPU: the seed's ViT-B/16 setting; CPU: a small ViT
    python -m benchmarks.vit --help

The model has random weights; every encoder linear (attention in/out projections and both MLP
linears, not the classifier head) is block-pruned by magnitude, as in the seed's benchmark.
Every row runs the same input and is checked against dense eager of the same weights.

Dense rows do not depend on sparsity or block size (a dense matmul does the same work whatever
the values), so they run once per dtype, on the model before pruning, and each sparse row is
compared with them.

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
import sys
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
    # Sized for ~4 minutes on 2 quiet cores, compile times included; three sparsities so
    # that --plot draws lines.
    "cpu": dict(
        model="tiny", batch_size=4, image_size=CPU_TINY["image_size"], dtype=[torch.float32],
        sparsity=[0.5, 0.7, 0.9], blocksize=[32, 64], warmup=3, reps=10, variants=list(VARIANTS),
    ),
}

HEADERS = [
    "variant", "sparsity", "block", "sparse layers", "median ms", "reps",
    "vs eager", "vs compile", "compile s", "linears floor ms", "% of floor", "rel err", "check",
]


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
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    common.finish_args(parser, args, DEFAULTS)
    _check_model_flags(parser, args)
    return args


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

    @property
    def ok(self) -> bool:
        return self.timing is not None and self.rel_err is not None and self.rel_err <= self.tol

    @property
    def median_ms(self) -> float | None:
        # A wrong answer gets no speedup: a fast wrong kernel must not look like a win.
        return self.timing.median_ms if self.ok else None


@dataclasses.dataclass
class Setup:
    """What every row of one dtype shares."""

    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    x: torch.Tensor
    gpu: floors.Gpu | None = None  # whose floor the table shows

    @property
    def tol(self) -> float:
        return common.tolerance(self.dtype, self.args.tf32)


def run_row(setup: Setup, row: Row, make: Callable[[], tuple[Callable[[], Any], Callable[[], str] | None]],
            ref: torch.Tensor, compiled: bool) -> Row:
    """Builds the variant, runs it once (timing the compile), checks it, then times it.

    ``make`` returns the function to call and, optionally, a function that says how many layers
    were made sparse (asked after the first call: compiling is lazy). Any failure becomes the
    row's note: one path that cannot run must not hide the others.
    """
    torch._dynamo.reset()
    sparse_compile.clear_reports()
    try:
        with torch.no_grad():
            fn, count_layers = make()
            out, seconds = common.first_call(fn, setup.device)
            row.compile_s = seconds if compiled else None
            if count_layers is not None:
                row.sparse_layers = count_layers()
            row.rel_err, row.tol = common.relative_error(out, ref), setup.tol
            wait_for_compile_workers()  # a compile just started them: see common.warm_up_compiler
            row.timing = common.measure(fn, setup.device, setup.args.warmup, setup.args.reps)
    except Exception as error:  # noqa: BLE001 - reported in the table instead
        row.note = f"not run: {common.describe_error(error)}"
    finally:
        torch._dynamo.reset()
    return row


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
        return f"{len(report.sparse_layers)}/{len(report.layers)}"

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
    that says how many layers run sparse (see :func:`run_row`). ``ours``: a row of
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


#: Every sparse row, in table order. A new way of running the pruned model is one entry here.
SPARSE_VARIANTS = [
    SparseVariant("torch.sparse BSR (eager)", _torch_sparse_variant, compiled=False, ours=False, key="torch-sparse"),
    SparseVariant('torch.compile backend="sparse"', _sparse_backend_variant, compiled=True, ours=True, key="sparse"),
]


def dense_rows(setup: Setup, model: nn.Module) -> list[Row]:
    with torch.no_grad():
        ref = on_device(copy.deepcopy(model), setup)(setup.x)
    floor = linears_floor(model, setup, None)
    rows = []
    if "eager" in setup.args.variants:
        rows.append(run_row(setup, Row("dense eager", floor=floor), lambda: eager(copy.deepcopy(model), setup), ref,
                            compiled=False))
    modes = [None, "max-autotune"] if setup.device.type == "cuda" else [None]
    for mode in modes:
        if ("max-autotune" if mode else "compile") not in setup.args.variants:
            continue
        label = "dense torch.compile" + (f" ({mode})" if mode else "")
        make = lambda mode=mode: inductor(copy.deepcopy(model), setup, mode)  # noqa: E731
        rows.append(run_row(setup, Row(label, floor=floor), make, ref, compiled=True))
    return rows


def sparse_rows(setup: Setup, model: nn.Module, sparsity: float, blocksize: int) -> list[Row]:
    variants = [variant for variant in SPARSE_VARIANTS if variant.key in setup.args.variants]
    if not variants:
        return []
    pruned, names = pruned_copy(model, sparsity, blocksize)
    total = sum(isinstance(m, nn.Linear) for m in pruned.modules())  # MHA out_proj included
    total += sum(isinstance(m, nn.MultiheadAttention) for m in pruned.modules())  # in_proj
    with torch.no_grad():
        # The reference for every sparse row: dense eager on the pruned weights.
        ref = on_device(copy.deepcopy(pruned), setup)(setup.x)
    rows = []
    for variant in variants:
        row = Row(variant.label, sparsity, blocksize, ours=variant.ours,
                  floor=linears_floor(pruned, setup, blocksize, variant.sparse_24))
        make = lambda variant=variant: variant.make(pruned, setup, blocksize, total)  # noqa: E731
        rows.append(run_row(setup, row, make, ref, compiled=variant.compiled))
    return rows


def supermask_rows(setup: Setup, model: nn.Module, sparsity: float, blocksize: int) -> list[Row]:
    """backend="sparse" on a Supermask layout (tile = block) with and without attention in_proj (issue 14).

    The masks keep their initial random scores: training moves which tiles are kept, not how
    many, and the speed depends on how many.
    """
    from sparse_compile.training import apply_supermask, finalize

    rows = []
    for in_proj in (True, False):
        masked = copy.deepcopy(model)
        apply_supermask(masked, linear_sparsity=sparsity, linear_tile_size=blocksize, filter_fn=is_encoder,
                        attention_in_proj=in_proj)
        finalize(masked)
        with torch.no_grad():
            ref = on_device(copy.deepcopy(masked), setup)(setup.x)
        label = f"Supermask layout {'incl.' if in_proj else 'excl.'} in_proj"
        row = Row(label, sparsity, blocksize, ours=True, floor=linears_floor(masked, setup, blocksize))
        rows.append(run_row(setup, row,
                            lambda m=masked: sparse_backend(copy.deepcopy(m), setup, blocksize), ref, compiled=True))
    return rows


NM_LABEL = "2:4 (N:M-trained)"


def nm_rows(setup: Setup, model: nn.Module) -> list[Row]:
    """backend="sparse" on a model whose encoder linears carry 2:4 masks (issue 9)."""
    from sparse_compile.kernels import semi_structured
    from sparse_compile.training import apply_nm, finalize

    masked = copy.deepcopy(model)
    apply_nm(masked, 2, 4, mode="forward", filter_fn=is_encoder, attention_in_proj=True)
    finalize(masked)
    row = Row(NM_LABEL, 0.5, floor=linears_floor(masked, setup, None, sparse_24=True))
    if setup.device.type != "cuda":
        row.note = "needs a GPU: torch's 2:4 kernels are CUDA-only (the CPU reference makes no speed claim)"
        return [row]
    if setup.dtype not in semi_structured.CUDA_DTYPES:
        row.note = f"no 2:4 kernel for {common.dtype_name(setup.dtype)} (torch's: float16, bfloat16)"
        return [row]
    if not semi_structured.cuda_kernels(setup.device):
        row.note = f"torch has no 2:4 kernel on {common.device_name(setup.device)}"
        return [row]
    row.ours = True
    with torch.no_grad():
        ref = on_device(copy.deepcopy(masked), setup)(setup.x)
    return [run_row(setup, row, lambda: sparse_backend_default(copy.deepcopy(masked), setup), ref, compiled=True)]


def sparse_backend_default(model: nn.Module, setup: Setup):
    """backend="sparse" with its default options (every layer measured, every format)."""
    compiled = torch.compile(on_device(model, setup), backend="sparse")

    def count_layers() -> str:
        report = sparse_compile.report(compiled)
        return f"{len(report.sparse_layers)}/{len(report.layers)}"

    return lambda: compiled(setup.x), count_layers


def dense_median(rows: list[Row], label: str) -> float | None:
    """Median of the dense row called ``label`` (None when it did not run or was not picked)."""
    return next((row.median_ms for row in rows if row.variant == label), None)


def table_rows(rows: list[Row], device: torch.device) -> list[list[str]]:
    eager_ms = dense_median(rows, "dense eager")
    compile_ms = dense_median(rows, "dense torch.compile")
    out = []
    for row in rows:
        cells = [
            row.variant,
            "-" if row.sparsity is None else f"{row.sparsity:.0%}",
            "-" if row.blocksize is None else str(row.blocksize),
            row.sparse_layers,
        ]
        if row.timing is None:
            out.append(cells + ["-"] * 8 + [row.note])
            continue
        check = "ok" if row.ok else f"WRONG: err > {row.tol:.0e}"
        out.append(cells + [
            common.fmt(row.timing.median_ms, 3), str(row.timing.reps),
            common.fmt_ratio(eager_ms, row.median_ms), common.fmt_ratio(compile_ms, row.median_ms),
            common.fmt(row.compile_s, 1), common.fmt_sig(row.floor),
            common.fmt(floors.percent_of_floor(row.floor, row.median_ms, device), 0), f"{row.rel_err:.1e}", check,
        ])
    return out


def raw_records(dtype: torch.dtype, rows: list[Row]) -> list[dict[str, Any]]:
    return [
        dict(dtype=common.dtype_name(dtype), variant=row.variant, sparsity=row.sparsity,
             block=row.blocksize, times_ms=row.timing.times_ms)
        for row in rows if row.timing is not None
    ]


# --------------------------------------------------------------------------------------------
# Main


def plot_points(dtype: torch.dtype, rows: list[Row]) -> list[plot.Point]:
    """Speedup of each sparse row over dense torch.compile (the best dense row on every device)."""
    dense_ms = dense_median(rows, "dense torch.compile")
    return [
        plot.Point(common.dtype_name(dtype), row.blocksize, row.variant, row.sparsity,
                   None if row.median_ms is None or dense_ms is None else dense_ms / row.median_ms)
        for row in rows if row.sparsity is not None and row.blocksize is not None  # 2:4: table only
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark and prints the tables; returns 1 if a row gave a wrong answer or one
    of sparse_compile's rows did not run."""
    args = parse_args(argv)
    device = common.set_up_run(args)
    gpu = floors.gpu_for(device, args.floor_gpu)
    common.warm_up_compiler(device)
    model = build_model(args)
    torch.manual_seed(1)
    x_fp32 = torch.randn(args.batch_size, 3, args.image_size, args.image_size)

    facts = common.environment(device, args.tf32) + [
        ("model", model_config(args, model)),
        ("dtypes", ", ".join(common.dtype_name(d) for d in args.dtype)),
        ("sparsity", ", ".join(f"{s:.0%}" for s in args.sparsity) + " of the blocks of every encoder linear"),
        ("block sizes", ", ".join(map(str, args.blocksize))),
        ("timing", common.timing_fact(device, args)),
        ("floor", f"{gpu.name} data-sheet peaks, linears only (benchmarks/floors.py)" if gpu else "unknown GPU"),
    ]
    common.print_key_values(facts)

    tables, raw, points, all_ok, ours_not_run = [], [], [], True, []
    for dtype in args.dtype:
        setup = Setup(args, device, dtype, x_fp32.to(device=device, dtype=dtype), gpu)
        # The sparse backend never uses Inductor's on-disk graph cache; with it off for dense
        # too, "compile s" compares cold compiles, whatever ran before on this machine.
        with torch._inductor.config.patch(fx_graph_cache=False):
            rows = dense_rows(setup, model)
            if "2:4" in args.variants:
                rows += nm_rows(setup, model)
            for sparsity in args.sparsity:
                for blocksize in args.blocksize:
                    rows += sparse_rows(setup, model, sparsity, blocksize)
                    if "supermask" in args.variants:
                        rows += supermask_rows(setup, model, sparsity, blocksize)
        table = common.Table(f"{args.model}, {common.dtype_name(dtype)}", HEADERS, table_rows(rows, device))
        print(f"\n{table.title}\n{table.text()}", flush=True)
        tables.append(table)
        raw += raw_records(dtype, rows)
        points += plot_points(dtype, rows)
        all_ok &= all(row.ok or row.timing is None for row in rows)
        ours_not_run += [
            f"{common.dtype_name(dtype)} {row.variant} sparsity {row.sparsity} block {row.blocksize}: {row.note}"
            for row in rows if row.ours and row.timing is None
        ]

    legend = (
        "sparse layers: linears run sparse / linears in the model. vs eager, vs compile: dense "
        "eager or dense torch.compile median / this row's median. compile s: wall time of the first "
        "call (cold compile). linears floor ms: the model's linears alone at the floor GPU's peaks "
        "(attention and the rest not counted); % of floor: that floor / median (GPU runs only). "
        "rel err: max |out - dense eager out| / max |dense eager out|, same weights and dtype."
    )
    if args.plot:
        plot.plot_speedups(args.plot, f"{model_config(args, model)}\n{common.device_name(device)}",
                           "dense torch.compile", points, None)
        print(f"wrote {args.plot}")
    return common.finish_run(args, argv, "benchmarks.vit", "ViT inference latency", legend, facts, tables, raw,
                             all_ok, ours_not_run)


if __name__ == "__main__":
    sys.exit(main())
