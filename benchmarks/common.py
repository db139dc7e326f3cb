"""What every benchmark shares: command-line flags, timing, output checks, environment, tables.

Timing follows DESIGN.md: warm-up calls first, then many timed calls, and the median is reported
with the number of timed calls: ``triton.testing.do_bench`` on CUDA (CUDA events, L2 flushed
before each call), ``torch.utils.benchmark.Timer`` on CPU (see :func:`measure`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
import warnings
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

import torch
from tabulate import tabulate

from sparse_compile.kernels.bsr_linear import BLOCKSIZES
from sparse_compile.measure import one_call_at_a_time, round_robin, wait_for_compile_workers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


#: Largest accepted ``max |out - ref| / max |ref|`` per dtype, ref being dense eager in the same
#: dtype. fp32 without TF32 differs only by summation order; the half types round every
#: intermediate, and a whole network compounds that (measured on CPU: bf16 tiny ViT ~1e-2).
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}
TF32_TOLERANCE = 1e-2

# --------------------------------------------------------------------------------------------
# Command line


def comma_list(convert: Callable[[str], Any]) -> Callable[[str], list]:
    """argparse ``type=`` for ``--flag a,b`` that may also be repeated (``--flag a --flag b``).

    Errors need not name the flag: argparse prefixes "argument --flag:".
    """

    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        try:
            return [convert(item) for item in items]
        except (ValueError, KeyError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _dtype(text: str) -> torch.dtype:
    name = DTYPE_ALIASES.get(text.lower(), text.lower())
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {text!r}; use one of {', '.join(DTYPES)} (or fp32, bf16, fp16)")
    return DTYPES[name]


def _sparsity(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"sparsity {text} is outside [0, 1) (fraction of blocks set to zero)")
    return value


def _blocksize(text: str) -> int:
    value = int(text)
    if value not in BLOCKSIZES:
        raise ValueError(f"block size {text} is not supported; use one of {list(BLOCKSIZES)}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags both benchmarks take. Defaults of ``None`` are filled per device by :func:`finish_args`."""
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    parser.add_argument(
        "--dtype", action="append", type=comma_list(_dtype),
        help="float32, bfloat16, float16; comma list or repeated (default: GPU fp32,bf16; CPU fp32)",
    )
    parser.add_argument(
        "--sparsity", action="append", type=comma_list(_sparsity),
        help="fraction of weight blocks pruned, e.g. 0.8,0.9",
    )
    parser.add_argument(
        "--blocksize", action="append", type=comma_list(_blocksize),
        help=f"block side, one of {list(BLOCKSIZES)}; comma list or repeated",
    )
    parser.add_argument("--warmup", type=non_negative_int, help="untimed calls before timing")
    parser.add_argument("--reps", type=positive_int, help="timed calls; the median is reported")
    parser.add_argument(
        "--tf32", action="store_true",
        help="allow TF32 for fp32 matmuls in every row (default off: true fp32 everywhere)",
    )
    parser.add_argument("--threads", type=positive_int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--output", metavar="FILE", help="also write the tables and raw numbers as markdown")
    parser.add_argument(
        "--plot", metavar="PNG",
        help="also draw speedup over dense vs sparsity per block size (needs matplotlib: the bench extra)",
    )
    parser.add_argument(
        "--floor-gpu", choices=["a100", "h100", "h100-pcie", "h200"],
        help="GPU of the 'floor ms' column (default: this GPU; H100 on CPU)",
    )


def finish_args(parser: argparse.ArgumentParser, args: argparse.Namespace, defaults: dict[str, dict]) -> None:
    """Flattens repeated list flags, then fills unset flags from ``defaults["cuda" | "cpu"]``."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch")
    for key, value in vars(args).items():
        if isinstance(value, list) and value and isinstance(value[0], list):
            # Keep the order given, drop repeats.
            setattr(args, key, list(dict.fromkeys(item for chunk in value for item in chunk)))
    for key, value in defaults[args.device].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.plot:
        from benchmarks.plot import require_matplotlib

        require_matplotlib()


def set_up_run(args: argparse.Namespace) -> torch.device:
    """Process-wide settings every benchmark applies before measuring; returns the device."""
    # torch.sparse prints a beta warning on every BSR conversion; it would bury the table.
    warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
    if args.threads:
        torch.set_num_threads(args.threads)
    set_matmul_precision(args.tf32)
    return torch.device(args.device)


def set_matmul_precision(tf32: bool) -> None:
    """The same fp32 matmul precision for every row: TF32 on or off for cuBLAS, cuDNN and Triton."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call times of one timed loop, in milliseconds."""

    times_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def reps(self) -> int:
        return len(self.times_ms)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> Timing:
    """``warmup`` untimed calls, then timed calls through the library timers.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 cache cleared before every call,
    ``return_mode="all"`` for every call's time). It takes a time budget, not a count: the
    budget is ``reps`` times the fastest warm-up call, so the count is close to ``reps`` and the
    table prints the real one.
    CPU: ``reps`` calls of ``torch.utils.benchmark.Timer.timeit(number=1)`` (under the process's
    thread setting), each one timed call after the Timer's own 2 untimed ones. Not
    ``blocked_autorange``: for calls under ~10 ms it times blocks of 10 and more, and the raw
    times would be block means, not calls.
    """
    if device.type == "cuda":
        import triton.testing

        # do_bench counts the L2 clearing into each call's share of the budget.
        per_call_s = _warm_up(fn, device, max(warmup, 1)) + _l2_clear_s(device)
        budget_ms = reps * per_call_s * 1e3
        return Timing(tuple(triton.testing.do_bench(fn, warmup=0, rep=budget_ms, return_mode="all")))
    from torch.utils.benchmark import Timer

    for _ in range(warmup):
        fn()
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return Timing(tuple(timer.timeit(number=1).raw_times[0] * 1e3 for _ in range(reps)))


def time_call_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """One timed call, ms, as one call of :func:`measure` times it: CPU ``Timer.timeit(number=1)``
    (after the Timer's own 2 untimed calls); CUDA events around the call after an L2 clear, what
    ``do_bench`` does per call (``do_bench`` itself cannot time one call without ~8 untimed ones)."""
    if device.type != "cuda":
        from torch.utils.benchmark import Timer

        timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return timer.timeit(number=1).raw_times[0] * 1e3
    import triton

    driver = triton.runtime.driver.active
    cache = _l2_cache(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    synchronize(device)
    driver.clear_cache(cache)
    start.record()
    fn()
    end.record()
    synchronize(device)
    return start.elapsed_time(end)


@functools.cache
def _l2_cache(device: torch.device) -> torch.Tensor:
    import triton

    return triton.runtime.driver.active.get_empty_cache_for_benchmark()


def time_round_robin(
    fns: Mapping[Hashable, Callable[[], Any]],
    device: torch.device,
    warmup: int,
    rounds: int,
    progress: "Progress | None" = None,
    call_ms: Callable[[Callable[[], Any], torch.device], float] | None = None,
) -> tuple[dict[Hashable, Timing], dict[Hashable, BaseException]]:
    """Times every function round-robin: ``warmup`` untimed calls of each, then ``rounds`` rounds
    of one timed call of each (:func:`time_call_ms`), starting one later in the order each round.

    Load from other processes then hits every function alike, and ``times_ms[r]`` of two results
    are calls of the same round (:func:`paired_speedup` compares them round by round). A function
    that raises is dropped (its error is returned) and the others go on. ``call_ms``: the per-call
    timer (tests pass a stand-in).
    """
    call_ms = call_ms or time_call_ms
    errors: dict[Hashable, BaseException] = {}
    for key in fns:
        try:
            for _ in range(warmup):
                fns[key]()
        except Exception as error:  # noqa: BLE001 - the caller reports it in the row
            errors[key] = error
    synchronize(device)

    def timed_or_dropped(key):
        def call():
            try:
                return call_ms(fns[key], device)
            except Exception as error:  # noqa: BLE001 - dropped from the rounds, reported in its row
                errors[key] = error
                return None

        return call

    def report(done, took, left):
        if progress is not None:
            progress(f"timed round {done}/{rounds} ({left} rows): {took:.1f} s; "
                     f"{rounds - done} left (~{fmt_seconds(took * (rounds - done))})")

    # The library's round-robin loop (sparse_compile.measure.round_robin), each call timed alone.
    live = {key: timed_or_dropped(key) for key in fns if key not in errors}
    times = round_robin(live, rounds, one_call_at_a_time(lambda call: call()), rotate=True, after_round=report)
    return {key: Timing(tuple(values)) for key, values in times.items()}, errors


@dataclasses.dataclass(frozen=True)
class Speedup:
    """A row's speedup over a baseline timed in the same rounds: the median of the per-round
    ratios ``baseline time / row time`` and their interquartile range, the spread.

    ``verdict``: "faster" when the whole spread is above 1, "slower" when it is below 1, else
    "tie": a difference within the spread is noise, not a result.
    """

    median: float
    low: float  # 25th percentile of the per-round ratios
    high: float  # 75th percentile

    @property
    def verdict(self) -> str:
        if self.low > 1.0:
            return "faster"
        if self.high < 1.0:
            return "slower"
        return "tie"

    @property
    def spread(self) -> str:
        return f"{self.low:.2f}-{self.high:.2f}"


def paired_speedup(baseline: Timing, row: Timing) -> Speedup:
    """:class:`Speedup` of ``row`` over ``baseline`` from calls of the same rounds (:func:`time_round_robin`)."""
    if baseline.reps != row.reps or not row.reps:
        raise ValueError(f"paired timings need the same rounds: {baseline.reps} and {row.reps} calls")
    ratios = sorted(b / t for b, t in zip(baseline.times_ms, row.times_ms))
    if len(ratios) == 1:
        return Speedup(ratios[0], ratios[0], ratios[0])
    low, median, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return Speedup(median, low, high)


def timing_fact(device: torch.device, args: argparse.Namespace) -> str:
    """How the rows were timed, for the facts above the tables."""
    if device.type == "cuda":
        return (f"triton.testing.do_bench: median of ~{args.reps} calls (budget {args.reps} x the fastest of "
                f"{max(args.warmup, 1)} warm-up calls), L2 flushed before each")
    return (f"torch.utils.benchmark.Timer: median of {args.reps} calls after {args.warmup} warm-up calls, "
            "each timed call after 2 untimed ones")


@functools.cache
def _l2_clear_s(device: torch.device) -> float:
    """Seconds of one of do_bench's L2 clears (zeroing a 256 MB buffer), measured once."""
    import triton

    driver = triton.runtime.driver.active
    cache = driver.get_empty_cache_for_benchmark()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(5):
        driver.clear_cache(cache)
    synchronize(device)
    return (time.perf_counter() - start) / 5


def _warm_up(fn: Callable[[], Any], device: torch.device, calls: int) -> float:
    """Runs ``fn`` ``calls`` times; returns the seconds of the fastest call (the budget's unit)."""
    fastest = float("inf")
    for _ in range(calls):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        fastest = min(fastest, time.perf_counter() - start)
    return fastest


def warm_up_compiler(device: torch.device) -> None:
    """Compiles a trivial function once, so that the first compiled variant of a run does not
    pay alone for what every process pays once (imports, C++/Triton toolchain checks)."""
    torch._dynamo.reset()
    torch.compile(lambda x: x * 2 + 1)(torch.ones(8, device=device))
    torch._dynamo.reset()
    # Inductor's compile workers start with the first compile and import torch for seconds,
    # taking the cores a CPU timing needs: on the 2-core machine the first (dense) rows of
    # benchmarks.vit timed 76-79 ms while they started, 52-56 ms for the same computation later.
    wait_for_compile_workers()


def first_call(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``(fn(), seconds)``: for a compiled function the first call is where compiling happens."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Progress


def fmt_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class Progress:
    """Progress lines on stderr, so that the tables on stdout stay clean: ``[vit 42 s] message``.

    While a :meth:`heartbeat` block runs (a compile), a line every ``every_s`` seconds says it
    is still running: a long step never leaves the terminal silent.
    """

    def __init__(self, name: str, every_s: float = 30.0):
        self.name = name
        self.every_s = every_s
        self.start = time.monotonic()
        self._lock = threading.Lock()

    def elapsed_s(self) -> float:
        return time.monotonic() - self.start

    def __call__(self, message: str) -> None:
        with self._lock:
            print(f"[{self.name} {self.elapsed_s():4.0f} s] {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def heartbeat(self, what: str) -> Iterator[None]:
        stop = threading.Event()
        started = time.monotonic()

        def beat() -> None:
            while not stop.wait(self.every_s):
                self(f"still {what} ({time.monotonic() - started:.0f} s)")

        thread = threading.Thread(target=beat, name=f"{self.name}-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


# --------------------------------------------------------------------------------------------
# The sparse backend's timing cache


def add_timing_cache_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timing-cache", metavar="DIR",
        help="the sparse backend's timing cache (SPARSE_COMPILE_CACHE_DIR); default: a new empty "
        "directory, so every run measures its layers on the machine as it is now",
    )


@contextlib.contextmanager
def timing_cache(directory: str | None) -> Iterator[str]:
    """``SPARSE_COMPILE_CACHE_DIR`` set to ``directory``, or to a new empty one removed afterwards:
    a cache measured while the machine was busy must not decide a later run's layers."""
    with contextlib.ExitStack() as stack:
        path = directory or stack.enter_context(tempfile.TemporaryDirectory(prefix="sparse-compile-timings-"))
        stack.enter_context(environment_variable("SPARSE_COMPILE_CACHE_DIR", path))
        yield path


@contextlib.contextmanager
def environment_variable(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# --------------------------------------------------------------------------------------------
# Checking outputs


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|``, in float64: one number comparable across layers and dtypes."""
    out, ref = out.double(), ref.double()
    scale = ref.abs().max().item()
    return (out - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def tolerance(dtype: torch.dtype, tf32: bool) -> float:
    if dtype == torch.float32 and tf32:
        return TF32_TOLERANCE
    return TOLERANCE[dtype]


def describe_error(error: BaseException, limit: int = 90) -> str:
    """One line for a table cell: the exception type and the start of its first line."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Environment and output


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def environment(device: torch.device, tf32: bool) -> list[tuple[str, str]]:
    """The facts a reader needs to reproduce or compare a run."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    rows = [
        ("device", f"{device.type}: {device_name(device)}"),
        ("torch", torch.__version__),
        ("triton", triton_version),
        ("python", platform.python_version()),
    ]
    if device.type == "cuda":
        rows.append(("CUDA", str(torch.version.cuda)))
    else:
        rows.append(("CPU threads", str(torch.get_num_threads())))
    rows.append(("fp32 matmul", "TF32 allowed" if tf32 else "true fp32 (TF32 off)"))
    return rows


def command_line(argv: Sequence[str] | None, module: str) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "-m", module, *map(shlex.quote, args)])


def print_key_values(rows: Sequence[tuple[str, str]]) -> None:
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}} : {value}")


@dataclasses.dataclass
class Table:
    """A titled table, printed as text and written as markdown."""

    title: str
    headers: list[str]
    rows: list[list[Any]]

    def text(self, fmt: str = "simple") -> str:
        return tabulate(self.rows, headers=self.headers, tablefmt=fmt, disable_numparse=True)


def write_markdown(
    path: str, title: str, command: str, facts: Sequence[tuple[str, str]], tables: Sequence[Table],
    raw: Sequence[dict[str, Any]], closing: str = "",
) -> None:
    """The file for ``benchmarks/results/<gpu>.md``: command, environment, tables, the closing
    verdict when there is one, raw per-call times."""
    lines = [f"# {title}", "", "```", command, "```", ""]
    lines += [f"- {key}: {value}" for key, value in facts]
    for table in tables:
        lines += ["", f"## {table.title}", "", table.text("github")]
    if closing:
        lines += ["", "## Verdict", "", closing]
    lines += ["", "## Raw per-call times (ms)", ""]
    for record in raw:
        label = ", ".join(f"{k}={v}" for k, v in record.items() if k != "times_ms")
        times = " ".join(f"{t:.4f}" for t in record["times_ms"])
        lines.append(f"- {label}: {times}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_sig(value: float | None, digits: int = 3) -> str:
    """``digits`` significant digits: floors span 1e-4 ms (tiny CPU shapes) to 100 ms."""
    return "-" if value is None else f"{value:.{digits}g}"


def fmt_ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator <= 0:
        return "-"
    return f"{numerator / denominator:.2f}x"


def finish_run(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    module: str,
    title: str,
    legend: str,
    facts: list[tuple[str, str]],
    tables: list["Table"],
    raw: list[dict[str, Any]],
    all_ok: bool,
    ours_not_run: Sequence[str] = (),
    ours_slower: Sequence[str] = (),
    closing: str = "",
) -> int:
    """Prints the column legend, writes ``--output``, prints ``closing`` (the verdict: the last
    line of stdout) and returns the exit status.

    1 when a row's output is wrong (``all_ok`` false), when one of this project's rows did not
    run (``ours_not_run``: their labels) or was slower than dense beyond the measured spread
    (``ours_slower``). A reference path that cannot run (torch's CPU BSR matmul has no bf16
    kernel) is a fact about torch and leaves the status at 0.
    """
    print("\n" + legend)
    if args.output:
        write_markdown(args.output, title, command_line(argv, module), facts, tables, raw, closing)
        print(f"wrote {args.output}")
    if not all_ok:
        print("ERROR: a row's output differs from dense beyond its tolerance (see 'check')", file=sys.stderr)
    for label in ours_not_run:
        print(f"ERROR: a row of sparse_compile did not run: {label}", file=sys.stderr)
    for label in ours_slower:
        print(f"ERROR: a row of sparse_compile is slower than dense beyond the measured spread: {label}",
              file=sys.stderr)
    if closing:
        print("\n" + closing, flush=True)
    return 0 if all_ok and not ours_not_run and not ours_slower else 1
