"""Models nobody here wrote, block-pruned: dense eager / backend="inductor" (without and with
freezing) / backend="sparse".

    python -m benchmarks.zoo                 # every model, CPU, batch 1
    python -m benchmarks.zoo --models deit_tiny,gpt2_tiny --reps 10
    python -m benchmarks.zoo --models bert_tiny,gpt2_tiny --batch 2 --tokens 24 --threads 1   # issue 21's setting

torchvision, timm and transformers models built from their configs with random weights (no
download); every linear (``nn.Linear``, ``nn.MultiheadAttention``'s input projection,
transformers' ``Conv1D``) is block-pruned by magnitude at ``--sparsity`` and ``--blocksize``,
the classifier heads included. Each model runs in eval mode under ``torch.no_grad()``; the
rows of a model are timed round-robin (one call of each per round, so load from other
processes hits all alike) and checked against eager on the same pruned weights.

The fair dense baseline is ``backend="inductor"`` with freezing (weights as constants; on CPU
packed for oneDNN/MKL), the ``vs freezing`` column. Freezing is switched on while Dynamo traces
(``torch._inductor.config.patch(freezing=True)`` around the first call): with torch 2.11,
``options={"freezing": True}`` on ``backend="inductor"`` freezes nothing (Dynamo then passes the
parameters as graph inputs; ``docs/inference.md``).

``--batch`` and ``--tokens`` set the input: batch for every model, tokens for the text models
(token ids; the image models keep their image size).

timm and transformers are the ``zoo`` extra of the benchmarks (``pip install -e ".[zoo]"``),
never of the library; a model whose package is missing gets a row that says so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import sys
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

import sparse_compile
from benchmarks import common

DEFAULTS = {
    "cpu": dict(dtype=[torch.float32], sparsity=[0.9], blocksize=[32], warmup=3, reps=30),
    "cuda": dict(dtype=[torch.float32], sparsity=[0.9], blocksize=[32], warmup=5, reps=50),
}

HEADERS = [
    "model", "variant", "sparse layers", "median ms", "reps", "vs eager", "vs inductor", "vs freezing",
    "compile s", "rel err", "check",
]

VARIANTS = ("eager", 'backend="inductor"', 'backend="inductor", freezing', 'backend="sparse"')
SPARSE = VARIANTS.index('backend="sparse"')
FREEZING = VARIANTS.index('backend="inductor", freezing')

#: Token ids of the text models are drawn from [0, VOCAB) (their configs' vocab_size).
VOCAB = 1000


# --------------------------------------------------------------------------------------------
# Models: name -> (package, builder returning (model, example input))


@dataclasses.dataclass(frozen=True)
class ZooModel:
    name: str
    package: str  # what must be installed (torchvision, timm, transformers)
    describe: str
    build: Callable[[], tuple[nn.Module, Any]]


def _timm(name: str, **kwargs):
    def build():
        import timm

        model = timm.create_model(name, pretrained=False, **kwargs)
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))[1:] if not kwargs.get("img_size") else (kwargs["img_size"],) * 2
        return model, torch.randn(1, 3, *size)

    return build


def _torchvision(name: str, image_size: int = 224):
    def build():
        import torchvision

        return torchvision.models.get_model(name, weights=None), torch.randn(1, 3, image_size, image_size)

    return build


class _LastHiddenState(nn.Module):
    """transformers models return a dict-like output; the benchmark compares one tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).last_hidden_state


def _bert_tiny():
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512, vocab_size=VOCAB,
        max_position_embeddings=128,
    )
    return _LastHiddenState(BertModel(config)), torch.randint(0, VOCAB, (1, 64))


def _gpt2_tiny():
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(
        n_layer=2, n_embd=128, n_head=2, n_positions=128, vocab_size=1000, bos_token_id=0, eos_token_id=0
    )
    return _LastHiddenState(GPT2Model(config)), torch.randint(0, 1000, (1, 64))


def _bert_small():
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, vocab_size=1000,
        max_position_embeddings=128,
    )
    model = BertModel(config, add_pooling_layer=False)
    return _LastHiddenState(model), torch.randint(0, 1000, (1, 128))


MODELS = {
    m.name: m
    for m in [
        ZooModel("deit_tiny", "timm", "timm deit_tiny_patch16_224, 224 px", _timm("deit_tiny_patch16_224")),
        ZooModel("gpt2_tiny", "transformers", "transformers GPT2Model, 2 layers, 128 wide, 64 tokens", _gpt2_tiny),
        ZooModel("maxvit_t", "torchvision", "torchvision maxvit_t, 224 px", _torchvision("maxvit_t")),
        ZooModel("vit_b_16", "torchvision", "torchvision vit_b_16, 224 px", _torchvision("vit_b_16")),
        ZooModel("mixer_s16", "timm", "timm mixer_s16_224 at 64 px: 16 tokens (16x256 token-mixing linears)",
                 _timm("mixer_s16_224", img_size=64)),
        ZooModel("bert_small", "transformers", "transformers BertModel, 4 layers, 256 wide, 128 tokens", _bert_small),
        ZooModel("bert_tiny", "transformers", "transformers BertModel, 2 layers, 128 wide (MLP 512), 64 tokens",
                 _bert_tiny),
    ]
}


def model_input(x: torch.Tensor, batch: int | None, tokens: int | None) -> torch.Tensor:
    """The builder's example input at ``batch`` (dim 0) and, for token ids, ``tokens`` (dim 1)."""
    if x.is_floating_point():
        return x if batch is None else torch.randn(batch, *x.shape[1:], dtype=x.dtype)
    shape = (batch or x.shape[0], tokens or x.shape[1], *x.shape[2:])
    return x if shape == tuple(x.shape) else torch.randint(0, VOCAB, shape)


def prune_every_linear(model: nn.Module, sparsity: float, blocksize: int) -> int:
    """Block-prunes every linear weight, transformers' ``Conv1D`` ([in, out] weight) included
    (``prune_linear_blocks_`` knows it); returns how many weights were pruned."""
    return len(sparse_compile.prune_linear_blocks_(model, sparsity, blocksize))


def _nonzero_heads(model: nn.Module) -> None:
    """Some libraries zero-initialise classifier heads: the output would be 0 whatever ran before."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.any():
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.normal_(module.bias, std=0.02)


# --------------------------------------------------------------------------------------------
# Rows


@dataclasses.dataclass
class Row:
    model: str
    variant: str
    sparse_layers: str = "-"
    times_ms: list[float] = dataclasses.field(default_factory=list)
    compile_s: float | None = None
    rel_err: float | None = None
    tol: float | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.times_ms) and self.rel_err is not None and self.rel_err <= self.tol

    @property
    def median_ms(self) -> float | None:
        return common.Timing(tuple(self.times_ms)).median_ms if self.ok else None


def run_model(spec: ZooModel, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[list[Row], bool]:
    """The three rows of one model; the bool is False when a row of ours failed or was wrong."""
    rows = [Row(spec.name, variant) for variant in VARIANTS]
    try:
        __import__(spec.package)
    except ImportError:
        for row in rows:
            row.note = f"not run: {spec.package} is not installed (pip install -e '.[zoo]')"
        return rows, True
    torch.manual_seed(0)
    torch._dynamo.reset()
    sparse_compile.clear_reports()
    try:
        model, x = spec.build()
    except Exception as error:  # noqa: BLE001 - a model that cannot be built is a row, not a crash
        for row in rows:
            row.note = f"not built: {common.describe_error(error)}"
        return rows, True
    model = model.eval().to(device=device, dtype=dtype)
    x = model_input(x, args.batch, args.tokens)
    x = x.to(device) if not x.is_floating_point() else x.to(device=device, dtype=dtype)
    _nonzero_heads(model)
    pruned = prune_every_linear(model, args.sparsity[0], args.blocksize[0])
    options = {"density_threshold": args.density_threshold}
    copies = [model, copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)]
    inductor = torch.compile(copies[1])
    # Its own options (a backend of its own: Dynamo would otherwise reuse the plain compile's code
    # for this instance of the same class) and freezing on while Dynamo traces (below).
    frozen = torch.compile(copies[2], options={"freezing": True})
    sparse = torch.compile(copies[3], backend="sparse", options=options)
    fns: list[Callable[[], Any] | None] = [lambda: copies[0](x), lambda: inductor(x), lambda: frozen(x), lambda: sparse(x)]
    tol = common.tolerance(dtype, args.tf32)
    with torch.no_grad():
        ref = model(x)
        for i, (row, fn) in enumerate(zip(rows, fns)):
            try:
                # Freezing applies when it is on while Dynamo traces: the first call.
                with torch._inductor.config.patch(freezing=True) if i == FREEZING else contextlib.nullcontext():
                    out, seconds = common.first_call(fn, device)
            except Exception as error:  # noqa: BLE001 - reported in the table
                row.note = f"not run: {common.describe_error(error)}"
                fns[i] = None
                continue
            row.compile_s = seconds if i else None
            row.rel_err, row.tol = common.relative_error(out, ref), tol
        report = sparse_compile.report(copies[SPARSE])
        rows[SPARSE].sparse_layers = f"{len(report.sparse_layers)}/{len(report.convertible_layers)}"
        if args.verbose:
            print(report)
        timings, errors = common.time_round_robin(
            {i: fn for i, fn in enumerate(fns) if fn is not None}, device, args.warmup, args.reps
        )
        for i, timing in timings.items():
            rows[i].times_ms = list(timing.times_ms)
        for i, error in errors.items():
            rows[i].note = f"not run: {common.describe_error(error)}"
    print(f"{spec.name}: {pruned} linear weights pruned; {rows[SPARSE].sparse_layers} run sparse", flush=True)
    ours_ok = rows[SPARSE].ok and not rows[SPARSE].note
    return rows, ours_ok


def table_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    eager_ms, inductor_ms, freezing_ms = rows[0].median_ms, rows[1].median_ms, rows[FREEZING].median_ms
    for row in rows:
        cells = [row.model, row.variant, row.sparse_layers]
        if not row.times_ms:
            out.append(cells + ["-"] * 7 + [row.note or "-"])
            continue
        check = "ok" if row.ok else f"WRONG: err > {row.tol:.0e}"
        out.append(cells + [
            common.fmt(common.Timing(tuple(row.times_ms)).median_ms, 3), str(len(row.times_ms)),
            common.fmt_ratio(eager_ms, row.median_ms), common.fmt_ratio(inductor_ms, row.median_ms),
            common.fmt_ratio(freezing_ms, row.median_ms),
            common.fmt(row.compile_s, 1), f"{row.rel_err:.1e}", check,
        ])
    return out


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.zoo", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--models", action="append", type=common.comma_list(_model_name),
        help=f"comma list of {', '.join(MODELS)} (default: all)",
    )
    parser.add_argument(
        "--density-threshold", type=_threshold, default="auto",
        help="the sparse backend's density_threshold: 'auto' (measured) or a number, e.g. 0.4",
    )
    common.add_timing_cache_arg(parser)
    parser.add_argument("--batch", type=common.positive_int, help="batch size of every model's input (default: 1)")
    parser.add_argument(
        "--tokens", type=common.positive_int,
        help="tokens per sequence of the text models (default: each model's own; image models keep their size)",
    )
    parser.add_argument("--verbose", action="store_true", help="print the sparse backend's report per model")
    common.add_common_args(parser)
    args = parser.parse_args(argv)
    common.finish_args(parser, args, DEFAULTS)
    if args.models is None:
        args.models = list(MODELS)
    for flag in ("dtype", "sparsity", "blocksize"):
        if len(getattr(args, flag)) != 1:
            parser.error(f"--{flag} takes one value in this benchmark")
    return args


def _model_name(text: str) -> str:
    if text not in MODELS:
        raise ValueError(f"unknown model {text!r}; use {', '.join(MODELS)}")
    return text


def _threshold(text: str) -> float | str:
    if text == "auto":
        return text
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"density threshold {text} is outside [0, 1]")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with common.timing_cache(args.timing_cache):
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    device = common.set_up_run(args)
    common.warm_up_compiler(device)
    dtype = args.dtype[0]
    facts = common.environment(device, args.tf32) + [
        ("models", "; ".join(f"{name}: {MODELS[name].describe}" for name in args.models)),
        ("pruning", f"{args.sparsity[0]:.0%} of the {args.blocksize[0]}x{args.blocksize[0]} blocks of every linear"),
        ("sparse backend", f"options={{'density_threshold': {args.density_threshold!r}}} (blocksize 'auto'), "
         f"timing cache {args.timing_cache or 'new and empty'}"),
        ("dtype", common.dtype_name(dtype)),
        ("timing", f"median of {args.reps} round-robin rounds after {args.warmup} warm-up calls, batch {args.batch or 1}"
         + (f", {args.tokens} tokens (text models)" if args.tokens else "")),
        ("dense baseline", 'backend="inductor" with freezing (on while Dynamo traces: the first call), "vs freezing"'),
    ]
    common.print_key_values(facts)
    all_rows, raw, all_ok = [], [], True
    start = time.perf_counter()
    for name in args.models:
        rows, ok = run_model(MODELS[name], args, device, dtype)
        all_ok &= ok
        all_rows += table_rows(rows)
        raw += [dict(model=row.model, variant=row.variant, times_ms=row.times_ms) for row in rows if row.times_ms]
    table = common.Table(f"zoo, {common.dtype_name(dtype)}", HEADERS, all_rows)
    print(f"\n{table.title}\n{table.text()}\n\ntotal {time.perf_counter() - start:.0f} s", flush=True)
    legend = (
        "sparse layers: linears run sparse / linears the backend saw. vs eager, vs inductor: that "
        "row's median / this row's median (>1: faster); freezing: backend=\"inductor\" with freezing, "
        "the fair dense baseline. compile s: wall time of the first call "
        "(Dynamo + Inductor + the sparse backend's measuring). rel err: max |out - eager out| / "
        "max |eager out|, same pruned weights."
    )
    return common.finish_run(args, argv, "benchmarks.zoo", "Model zoo inference latency", legend, facts, [table], raw, all_ok)


if __name__ == "__main__":
    sys.exit(main())
