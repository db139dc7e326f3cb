"""Measured kernel choice: time every viable way to run a linear layer, once, and remember it.

With ``density_threshold="auto"`` (the default) :func:`sparse_compile.analysis.decide` asks
:func:`time_candidates` for the time of each :class:`Candidate` — dense and BSR at each
candidate block size — with the layer's real shape and dtype, the number of rows the graph was
traced with, on the device the layer runs on.

- Dense is timed as the compiled graph runs it (:func:`inductor_dense`): ``x @ W.T + b`` as a
  one-op graph, compiled by Inductor with freezing (the weight a constant) once per process per
  shape, rows, dtype, bias or not and device; on CPU, ``extern_kernels.addmm`` with the bias in
  its epilogue. A sparse candidate is what its format's ``SparseFormat.timing_run`` calls.
- CUDA: the first call of each candidate autotunes our Triton kernel (``triton.autotune`` picks
  its config there); then ``triton.testing.do_bench`` (CUDA events, L2 flushed, median).
- CPU: the op call a converted layer makes (``SparseFormat.timing_run``: the tile kernel's
  ``sparse_compile::tile_linear`` on tiles packed once, through torch.ops, as Inductor's code
  calls it), against dense; warm-up calls, then round-robin timed calls, the fastest call, and
  each candidate's spread: half the interquartile range of its per-round ratio to dense's call
  (:class:`Measured`).

The tie rule (``analysis.tie_band_ms``): a sparse candidate runs only when it is faster than
dense by more than its spread and by more than ``min_saving_ms`` per call (0.02 ms on CPU).

Times are cached in one JSON file, ``$SPARSE_COMPILE_CACHE_DIR/timings-v3.json`` (default
``$XDG_CACHE_HOME/sparse_compile`` or ``~/.cache/sparse_compile``), keyed by device name,
torch/triton versions, shape, dtype, rows bucket, candidate (block size) and density bucket (a
sparse candidate's spread beside its time). A
second compile of the same model times nothing; layers of one shape and density bucket share
one measurement. Writes take a file lock, merge with what is on disk and replace the file
atomically, so processes compiling at once (DDP ranks) keep each other's entries; a file that
cannot be read is ignored with a warning and rewritten.

The whole-graph check (:func:`check_graph`): per-layer times say little where a layer takes
0.1 ms (per-call overhead, not arithmetic) and time neither the way Inductor runs a dense layer
(its ``mm``/``addmm`` with the fused epilogue) nor our op's call from the compiled graph. So when
some layer runs sparse, the backend also times the compiled graph against the same graph compiled
by Inductor alone, round-robin on the traced inputs, and keeps the rewrite only when the median
ratio of their calls says it is faster by more than the measured spread (and at least
:data:`GRAPH_MIN_GAIN`). Unless the rewritten graph, timed alone first, is already below the
plain graph's dense floor (its linear layers' per-layer dense times, summed) by
:data:`GRAPH_FLOOR_MARGIN`: then the plain graph is neither compiled nor timed. The verdict is cached in
the same file, keyed by the graph's structure, shapes, the layers' decisions (format, block size,
density bucket) and the device.

Tests replace :data:`timer` and :data:`graph_timer` (module attributes, looked up at every call):
no test depends on a real timing.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Hashable, Iterator, Mapping, Optional, Sequence, TypeVar

import torch

from sparse_compile import formats
from sparse_compile.formats.base import DENSE, Candidate, next_power_of_2

log = logging.getLogger("sparse_compile")

CACHE_ENV = "SPARSE_COMPILE_CACHE_DIR"
# v3: dense timed as Inductor compiles it, with spreads, and CPU BSR as the C++ ``tile_linear``
# call a converted layer makes; v2: dense as eager F.linear, CPU BSR through the Python op (~0.1 ms
# more per call); v1: BSR on CPU as the gathered block matmuls the tile kernel replaced.
CACHE_FILE = "timings-v3.json"
_FORMAT_VERSION = 1

#: Rows measured when the caller does not know the traced batch (a direct ``decide`` call).
DEFAULT_ROWS = 256

#: Density buckets are this wide: layers whose block densities round to the same bucket share a
#: measurement. BSR time grows with stored blocks, so 0.05 moves a BSR time by at most ~5%.
DENSITY_BUCKET = 0.05

# CPU timing: CPU_WARMUP round-robin warm-up calls, then round-robin timed calls until about
# CPU_BUDGET_S of work per layer shape (between CPU_MIN_REPS and CPU_MAX_REPS calls each); the
# fastest call counts. A candidate whose best warm-up call took CPU_HOPELESS times the fastest
# candidate's is not timed further (its warm-up time is kept): on ViT-B's MLP (2 cores) the
# gathered block matmuls (BSR's CPU path where no C++ compiler builds the tile kernel) at 50%
# density, block 32, took 3.5x dense (kernels/bsr_linear.py).
CPU_WARMUP = 2
CPU_MIN_REPS = 5
CPU_MIN_ROUNDS_UNDER_LOAD = 3
CPU_MAX_REPS = 25
CPU_BUDGET_S = 0.3
CPU_HOPELESS = 3.0

# CUDA timing: do_bench's own warm-up and measuring window, in ms.
CUDA_WARMUP_MS = 25
CUDA_REP_MS = 100

# Whole-graph check: GRAPH_WARMUP calls of each graph, then round-robin rounds (one call of each)
# for about GRAPH_BUDGET_S, between GRAPH_MIN_ROUNDS and GRAPH_MAX_ROUNDS; past the budget, after
# GRAPH_CLEAR_ROUNDS rounds that all agree by far (every ratio below 1 - GRAPH_CLEAR_GAIN, or
# every one above 1), it stops there (ViT-B MLP sized graph on 2 cores: 0.7 s a round). The rewrite is kept
# when the median over rounds of (its call / the plain graph's call) is below 1 by more than the
# spread of those ratios (half their interquartile range) and by at least GRAPH_MIN_GAIN.
GRAPH_WARMUP = 1
GRAPH_MIN_ROUNDS = 5
GRAPH_CLEAR_ROUNDS = 3
GRAPH_CLEAR_GAIN = 0.2
GRAPH_MAX_ROUNDS = 30
GRAPH_BUDGET_S = 1.0
GRAPH_MIN_GAIN = 0.03

# The floor shortcut of the whole-graph check: the rewritten graph is first timed alone
# (GRAPH_WARMUP calls, then GRAPH_ALONE_CALLS, the median counts). The plain graph runs every
# linear layer dense, so it takes at least the sum of their dense times as measured per layer
# (the "dense floor", ``LayerRecord.dense_floor_ms``). When the rewritten graph's median is below
# that floor by GRAPH_FLOOR_MARGIN, the rewrite is kept without compiling the plain graph: one
# Inductor compile of the whole graph saved (deit_tiny, cold: 11 of 55 s). The margin covers what
# the per-layer floor does not see: the plain graph's linears packed for oneDNN/MKL (its freezing
# packs them; the per-layer dense time is Inductor's ``addmm``) and concatenated where they share
# an input, and the noise of a few calls.
GRAPH_ALONE_CALLS = 5
GRAPH_FLOOR_MARGIN = 1.5


# --------------------------------------------------------------------------------------------
# What is timed


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What a timing depends on besides the candidate."""

    out_features: int
    in_features: int
    dtype: torch.dtype
    rows: int
    device: torch.device


@dataclasses.dataclass(frozen=True)
class TimingRequest:
    """A candidate to time: ``run()`` computes the layer once on a representative input.

    ``prepare()``, when given, does once what ``run`` needs before it can be timed (dense:
    Inductor's compile of the one-op graph, :func:`inductor_dense`); the real timers call it
    first, a test's stand-in timer need not (then nothing is compiled).
    """

    candidate: Candidate
    layer: LayerSpec
    run: Callable[[], object]
    prepare: Callable[[], None] | None = None


@dataclasses.dataclass
class Spent:
    """What measuring has cost this process so far (read by benchmarks, logged per layer)."""

    candidates_timed: int = 0
    seconds: float = 0.0  # timing, the wait below included
    waiting_seconds: float = 0.0  # of which waiting for Inductor's compile workers to start
    graphs_timed: int = 0  # whole-graph checks that timed (not read from the cache)
    graph_check_seconds: float = 0.0  # whole-graph checks: Inductor's compile of the plain graph and the timing
    graph_compile_seconds: float = 0.0  # of which compiling the plain graph
    graphs_below_floor: int = 0  # of the graphs timed, kept by the floor shortcut (plain graph not compiled)
    dense_compiles: int = 0  # one-op dense graphs Inductor compiled to time dense (once per shape)
    dense_compile_seconds: float = 0.0  # their compile time (within ``seconds``)


spent = Spent()


@dataclasses.dataclass(frozen=True)
class Measured:
    """What a timer says of one candidate: ``ms``, its fastest call, and ``spread``, the noise
    of its comparison with dense as a fraction of dense's time (half the interquartile range of
    the per-round ratios of its call to dense's call in the same round; 0 for dense itself, for
    a candidate timed without dense, and on CUDA, where ``do_bench`` gives one median)."""

    ms: float
    spread: float = 0.0


@dataclasses.dataclass(frozen=True)
class Timed:
    candidate: Candidate
    ms: float
    from_cache: bool
    spread: float = 0.0  # see Measured
    # The rows it was timed with (the cache shares a time within a rows bucket); None when
    # unknown (an entry written before the rows were kept).
    rows: int | None = None

    def floor_ms(self, rows: int) -> float | None:
        """A lower bound of this candidate's time at ``rows``: ``ms``, scaled down in proportion
        when it was timed with more rows (a matmul's time is a fixed cost plus a cost per row, so
        it shrinks no faster than the rows do); None when the rows it was timed with are unknown."""
        if self.rows is None or self.rows <= 0:
            return None
        return self.ms * min(1.0, rows / self.rows)


# --------------------------------------------------------------------------------------------
# Timers


def time_requests(requests: Sequence[TimingRequest]) -> list[Measured]:
    """The time of each request's ``run``, all of one layer, on its device (CUDA: the median;
    CPU: the fastest call, with each candidate's spread against dense's calls)."""
    for request in requests:
        if request.prepare is not None:
            request.prepare()
    device = requests[0].layer.device
    fns = [request.run for request in requests]
    if device.type == "cuda":
        return [Measured(ms) for ms in _time_cuda(fns, device)]
    wait_for_compile_workers()
    dense = next((i for i, r in enumerate(requests) if r.candidate.kind == "dense"), None)
    best_warm, samples = _time_cpu_rounds(fns)
    return [
        Measured(1e3 * (min(samples[i]) if i in samples else best_warm[i]), _spread(samples, i, dense))
        for i in range(len(fns))
    ]


def _spread(samples: dict[int, list[float]], i: int, dense: int | None) -> float:
    """Half the interquartile range of (candidate ``i``'s call / dense's call), round by round:
    load from other processes that hits both calls of a round cancels out."""
    if dense is None or i == dense or i not in samples or dense not in samples:
        return 0.0
    ratios = [a / b for a, b in zip(samples[i], samples[dense]) if b > 0]
    if len(ratios) < 2:
        return 0.0
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return (high - low) / 2


def wait_for_compile_workers() -> None:
    """Inductor starts its compile worker processes as compiling begins, just before our pass
    runs; while they start they take the cores a CPU timing needs (tiny ViT's 768x256 layer,
    1 thread: fastest dense call 14.3 ms while they started, 0.64 ms on its own). Wait for them."""
    try:
        from torch._inductor.async_compile import AsyncCompile

        if AsyncCompile.process_pool.cache_info().currsize:  # a pool exists: we are compiling
            start = time.perf_counter()
            AsyncCompile.wait_pool_ready(timeout=120)
            spent.waiting_seconds += time.perf_counter() - start
    except Exception as error:  # noqa: BLE001 - a private API: timing goes on without it
        log.debug("sparse_compile: could not wait for Inductor's compile workers: %s", error)


#: The timer :func:`time_candidates` calls. Tests replace it with a fake that returns recorded
#: times (it receives the candidates, so it can answer per block size and density): ms as
#: floats (spread 0), or :class:`Measured` values.
timer: Callable[[Sequence[TimingRequest]], Sequence[float | Measured]] = time_requests


def _time_cpu(fns: Sequence[Callable[[], object]]) -> list[float]:
    """ms of each of ``fns``: its fastest call (see :func:`_time_cpu_rounds`)."""
    best_warm, samples = _time_cpu_rounds(fns)
    return [1e3 * (min(samples[i]) if i in samples else best_warm[i]) for i in range(len(fns))]


def _time_cpu_rounds(fns: Sequence[Callable[[], object]]) -> tuple[list[float], dict[int, list[float]]]:
    """Seconds of each warm-up-best call, and of every timed call of the candidates not dropped
    as hopeless (by index), called round-robin."""
    warm: list[list[float]] = [[] for _ in fns]
    for _ in range(CPU_WARMUP):
        for i, fn in enumerate(fns):
            warm[i].append(_seconds(fn))
    best_warm = [min(w) for w in warm]
    fastest = max(min(best_warm), 1e-4)  # below 0.1 ms a warm-up call says too little to drop one
    active = [i for i, seconds in enumerate(best_warm) if seconds <= CPU_HOPELESS * fastest]
    per_round = sum(best_warm[i] for i in active)
    reps = int(min(CPU_MAX_REPS, max(CPU_MIN_REPS, CPU_BUDGET_S / max(per_round, 1e-9))))
    # The minimum, not the median: other processes only ever add time, and on a shared machine a
    # median of a few calls still moved by 10x between runs (tiny ViT's 256x256 layer: 0.9 vs
    # 26.8 ms, 2 cores). A loaded machine makes calls slower than the warm-up promised: stop at
    # twice the budget.
    times = round_robin(
        {i: fns[i] for i in active}, reps, one_call_at_a_time(_seconds),
        stop=lambda done, elapsed, _: done >= CPU_MIN_ROUNDS_UNDER_LOAD and elapsed > 2 * CPU_BUDGET_S,
    )  # fmt: skip
    return best_warm, times


Key = TypeVar("Key", bound=Hashable)
RoundTimer = Callable[[Sequence[Callable[[], object]]], Sequence[Optional[float]]]


def round_robin(
    fns: Mapping[Key, Callable[[], object]],
    rounds: int,
    time_round: RoundTimer,
    *,
    stop: Optional[Callable[[int, float, Mapping[Key, list[float]]], bool]] = None,
    rotate: bool = False,
    after_round: Optional[Callable[[int, float, int], None]] = None,
) -> dict[Key, list[float]]:
    """The project's one timing loop: ``rounds`` rounds of one call of each function, the times of
    each function's calls in round order (``times[key][r]`` of two keys: calls of the same round).

    Round-robin, so that load from other processes hits every function alike (per-layer timing,
    the whole-graph check, the benchmarks' tables all compare functions timed this way).
    ``time_round(calls)`` times one round's calls, in order, and returns a time per call (``None``:
    drop that function from here on, e.g. it raised). ``stop(rounds done, seconds elapsed,
    times)``, asked before each round, ends early. ``rotate`` starts each round one function later.
    ``after_round(rounds done, seconds the round took, functions left)``: progress.
    """
    times: dict[Key, list[float]] = {key: [] for key in fns}
    start = time.perf_counter()
    for done in range(rounds):
        if stop is not None and stop(done, time.perf_counter() - start, times):
            break
        live = list(times)
        if not live:
            break
        first = done % len(live) if rotate else 0
        order = live[first:] + live[:first]
        round_start = time.perf_counter()
        for key, took in zip(order, time_round([fns[key] for key in order])):
            if took is None:
                del times[key]
            else:
                times[key].append(took)
        if after_round is not None:
            after_round(done + 1, time.perf_counter() - round_start, len(times))
    return times


def one_call_at_a_time(time_call: Callable[[Callable[[], object]], Optional[float]]) -> RoundTimer:
    """A round timer that times each call on its own with ``time_call``."""
    return lambda calls: [time_call(fn) for fn in calls]


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _time_cuda(fns: Sequence[Callable[[], object]], device: torch.device) -> list[float]:
    from triton.testing import do_bench

    results = []
    for fn in fns:
        fn()  # our kernel's autotuning (and Triton's compiling) happen here, outside the timing
        torch.cuda.synchronize(device)
        results.append(float(do_bench(fn, warmup=CUDA_WARMUP_MS, rep=CUDA_REP_MS, return_mode="median")))
    return results


def time_graphs(fns: Sequence[Callable[[], object]], device: torch.device) -> list[list[float]]:
    """ms of every timed call of each of ``fns`` (whole compiled graphs), called round-robin.

    CPU: ``time.perf_counter`` around each call. CUDA: CUDA events around each call, synchronized
    once per round (the first calls, outside the timing, autotune our Triton kernels). One graph
    alone (the floor shortcut, :func:`check_graph`): GRAPH_ALONE_CALLS timed calls.
    """
    cuda = device.type == "cuda"
    if not cuda:
        wait_for_compile_workers()
    for _ in range(GRAPH_WARMUP):
        for fn in fns:
            fn()
    if cuda:
        torch.cuda.synchronize(device)
    # CUDA: events around each call, one synchronize per round (so calls queue as in a run).
    time_round = _cuda_round_timer(device) if cuda else one_call_at_a_time(lambda fn: 1e3 * _seconds(fn))
    if len(fns) == 1:
        times = round_robin(dict(enumerate(fns)), GRAPH_ALONE_CALLS, time_round)
        return [times[0]]
    times = round_robin(
        dict(enumerate(fns)), GRAPH_MAX_ROUNDS, time_round,
        stop=lambda done, elapsed, times: elapsed > GRAPH_BUDGET_S and (
            done >= GRAPH_MIN_ROUNDS or (done >= GRAPH_CLEAR_ROUNDS and _clear(list(times.values())))
        ),
    )  # fmt: skip
    return [times[i] for i in range(len(fns))]


def _cuda_round_timer(device: torch.device) -> RoundTimer:
    def time_round(calls):
        events = []
        for fn in calls:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            events.append((begin, end))
        torch.cuda.synchronize(device)
        return [begin.elapsed_time(end) for begin, end in events]

    return time_round


def _clear(samples: list[list[float]]) -> bool:
    """Whether every round so far says the same by far: the first graph (the rewrite) at least
    GRAPH_CLEAR_GAIN faster than the second, or slower."""
    ratios = [a / b for a, b in zip(samples[0], samples[1]) if b > 0]
    return bool(ratios) and (max(ratios) < 1 - GRAPH_CLEAR_GAIN or min(ratios) > 1)


#: The timer :func:`check_graph` calls with ``[rewritten graph, plain graph]`` calls (or the
#: rewritten graph's alone, for the floor shortcut) and the device; returns the ms of every timed
#: call of each. Tests replace it.
graph_timer: Callable[[Sequence[Callable[[], object]], torch.device], list[list[float]]] = time_graphs


@dataclasses.dataclass(frozen=True)
class GraphVerdict:
    """The whole-graph check's outcome.

    ``ratio`` is the median over rounds of (rewritten graph's call / plain graph's call): each
    round runs both back to back, so load from other processes hits both alike. ``spread`` is half
    the interquartile range of those ratios (the noise the rewrite must beat); ``sparse_ms`` and
    ``dense_ms`` are the median calls (ms), shown in the report.

    With ``floor`` the plain graph was neither compiled nor timed: ``dense_ms`` is the dense
    floor (the summed per-layer dense times of its linear layers, which the plain graph spends at
    least) and ``ratio`` the rewritten graph's median over it, so the true speedup is at least
    :attr:`speedup`.
    """

    sparse_ms: float
    dense_ms: float
    ratio: float
    spread: float
    keep: bool
    from_cache: bool = False
    seconds: float = 0.0  # what the check cost this compile (plain compile + timing)
    floor: bool = False

    @property
    def band(self) -> float:
        """How much faster (fraction) the rewrite had to be to be kept (a timed comparison's; a
        ``floor`` verdict had to be below the floor by :data:`GRAPH_FLOOR_MARGIN`)."""
        return max(self.spread, GRAPH_MIN_GAIN)

    @property
    def speedup(self) -> float:
        """Of the rewrite over the plain graph (above 1: the rewrite is faster)."""
        return 1.0 / self.ratio if self.ratio > 0 else float("inf")


def judge(sparse_samples: Sequence[float], dense_samples: Sequence[float]) -> GraphVerdict:
    """Keeps the rewrite when the median paired ratio is below 1 by more than the spread.

    Medians, not the fastest calls: on this project's loaded 2-core machine the rewritten GPT-2
    tiny graph's fastest call was 1.36 ms but its median 6.3 ms (Inductor's: 0.90 / 2.2 ms); the
    user runs the typical call.
    """
    ratios = [s / d for s, d in zip(sparse_samples, dense_samples) if d > 0]
    if len(ratios) < 2:
        raise ValueError(f"sparse_compile.measure: the whole-graph check needs 2 rounds or more, got {len(ratios)}")
    low, ratio, high = statistics.quantiles(ratios, n=4, method="inclusive")
    verdict = GraphVerdict(
        statistics.median(sparse_samples), statistics.median(dense_samples), ratio, (high - low) / 2, keep=False
    )
    return dataclasses.replace(verdict, keep=ratio < 1.0 - verdict.band)


def check_graph(
    key: str,
    sparse_fn: Callable[..., object],
    compile_dense: Callable[[], Callable[..., object]],
    inputs: Sequence[object],
    device: torch.device,
    dense_floor_ms: float = 0.0,
) -> tuple[GraphVerdict, Callable[..., object] | None]:
    """The whole-graph verdict for the graph ``key`` names, from the cache or timed now.

    ``sparse_fn`` is the rewritten graph compiled; ``compile_dense`` compiles the plain graph
    (Inductor alone) when needed: always when timing, and on a cached verdict only when that
    verdict is dense. Both are called with ``inputs``. Returns the verdict and the plain graph's
    compiled function (None when it was not compiled).

    ``dense_floor_ms`` (0: none): what the plain graph spends at least, in its linear layers run
    dense (see :data:`GRAPH_FLOOR_MARGIN`). Then the rewritten graph is timed alone first, and
    when it is below the floor by the margin the rewrite is kept without compiling the plain graph.
    """
    cache = current_cache()
    keys = {part: f"{key} | {part}" for part in ("sparse ms", "dense ms", "ratio", "spread", "keep")}
    cached = {part: cache.get(k) for part, k in keys.items()}
    floor_key = f"{key} | floor"
    start = time.perf_counter()
    if all(value is not None for value in cached.values()):
        keep = bool(cached["keep"])
        dense_fn = None if keep else _compile_timed(compile_dense)
        verdict = GraphVerdict(
            cached["sparse ms"], cached["dense ms"], cached["ratio"], cached["spread"], keep, from_cache=True,
            seconds=time.perf_counter() - start, floor=bool(cache.get(floor_key)),
        )
        spent.graph_check_seconds += verdict.seconds
        return verdict, dense_fn
    if dense_floor_ms > 0:
        alone = statistics.median(graph_timer([functools.partial(sparse_fn, *inputs)], device)[0])
        if alone * GRAPH_FLOOR_MARGIN < dense_floor_ms:
            verdict = GraphVerdict(
                alone, dense_floor_ms, alone / dense_floor_ms, 0.0, keep=True, floor=True,
                seconds=time.perf_counter() - start,
            )
            spent.graphs_timed += 1
            spent.graphs_below_floor += 1
            spent.graph_check_seconds += verdict.seconds
            log.info(
                "sparse_compile: whole graph timed alone: median %.3g ms, below the %.3g ms its linear layers "
                "take dense (per layer) by more than %.2fx: the plain graph is not compiled (%.2f s)",
                alone, dense_floor_ms, GRAPH_FLOOR_MARGIN, verdict.seconds,
            )
            _store_verdict(cache, keys, floor_key, verdict)
            return verdict, None
    dense_fn = _compile_timed(compile_dense)
    sparse_samples, dense_samples = graph_timer(
        [functools.partial(sparse_fn, *inputs), functools.partial(dense_fn, *inputs)], device
    )
    verdict = dataclasses.replace(judge(sparse_samples, dense_samples), seconds=time.perf_counter() - start)
    spent.graphs_timed += 1
    spent.graph_check_seconds += verdict.seconds
    log.info(
        "sparse_compile: whole graph timed with and without the rewrite: median %.3g ms vs %.3g ms, %.2fx "
        "(spread %.1f%%); plain compile and timing %.2f s",
        verdict.sparse_ms, verdict.dense_ms, verdict.speedup, 100 * verdict.spread, verdict.seconds,
    )
    _store_verdict(cache, keys, floor_key, verdict)
    return verdict, dense_fn


def _store_verdict(cache: TimingCache, keys: Mapping[str, str], floor_key: str, verdict: GraphVerdict) -> None:
    """Caches ``verdict`` under ``keys`` (one per part) and ``floor_key`` (whether the floor decided)."""
    cache.put({
        keys["sparse ms"]: verdict.sparse_ms, keys["dense ms"]: verdict.dense_ms, keys["ratio"]: verdict.ratio,
        keys["spread"]: verdict.spread, keys["keep"]: float(verdict.keep), floor_key: float(verdict.floor),
    })


def _compile_timed(compile_dense: Callable[[], Callable[..., object]]) -> Callable[..., object]:
    start = time.perf_counter()
    try:
        return compile_dense()
    finally:
        spent.graph_compile_seconds += time.perf_counter() - start


def graph_key(device: torch.device, structure: str) -> str:
    """The cache key of a whole-graph verdict: device, versions, and a hash of ``structure``
    (the graph's code, input and constant shapes, the layers' decisions; see the backend)."""
    import hashlib

    digest = hashlib.sha256(structure.encode()).hexdigest()[:24]
    return " | ".join([device_name(device), f"torch {torch.__version__}", f"triton {_triton_version()}", f"graph {digest}"])


# --------------------------------------------------------------------------------------------
# Measuring one layer


def time_candidates(
    weight: torch.Tensor, candidates: Sequence[Candidate], rows: int | None = None
) -> list[Timed]:
    """Time of each candidate for ``weight`` ``[out, in]`` (from the cache where it has one).

    Only candidates missing from the cache are timed, all in one round-robin run, with dense
    (when it is one of ``candidates``) timed again among them: a sparse candidate's spread is
    measured against dense's calls of the same rounds.
    """
    rows = DEFAULT_ROWS if rows is None else max(1, int(rows))
    layer = LayerSpec(weight.shape[0], weight.shape[1], weight.dtype, rows, weight.device)
    cache = current_cache()
    keys = [cache_key(layer, candidate) for candidate in candidates]
    known = {key: cache.get(key) for key in keys}
    spreads = {key: cache.get(spread_key(key)) or 0.0 for key in keys}
    timed_rows = {key: _int_or_none(cache.get(rows_key(key))) for key in keys}
    missing = [c for c, key in zip(candidates, keys) if known[key] is None]
    if missing and DENSE not in missing and DENSE in candidates:
        missing.insert(0, DENSE)
    if missing:
        start = time.perf_counter()
        compile_seconds = spent.dense_compile_seconds
        requests = _requests(weight, layer, missing)
        measured = [value if isinstance(value, Measured) else Measured(float(value)) for value in timer(requests)]
        seconds = time.perf_counter() - start
        spent.candidates_timed += len(missing)
        spent.seconds += seconds
        log.info(
            "sparse_compile: timed %s for a %dx%d %s layer, %d rows, in %.2f s (of which %.2f s compiling dense)",
            ", ".join(c.label for c in missing), layer.out_features, layer.in_features,
            str(layer.dtype).removeprefix("torch."), layer.rows, seconds, spent.dense_compile_seconds - compile_seconds,
        )
        if len(measured) != len(missing):
            raise RuntimeError(f"sparse_compile.measure: the timer returned {len(measured)} times for {len(missing)} candidates")
        new = {cache_key(layer, c): float(m.ms) for c, m in zip(missing, measured)}
        new_spreads = {cache_key(layer, c): float(m.spread) for c, m in zip(missing, measured) if c.kind != "dense"}
        new_rows = {key: layer.rows for key in new}
        cache.put({
            **new, **{spread_key(key): spread for key, spread in new_spreads.items()},
            **{rows_key(key): float(n) for key, n in new_rows.items()},
        })
        known.update(new)
        spreads.update(new_spreads)
        timed_rows.update(new_rows)
    missing_labels = {c.label for c in missing}
    return [
        Timed(c, known[key], c.label not in missing_labels, spreads[key], timed_rows[key])
        for c, key in zip(candidates, keys)
    ]


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(value)


def _requests(weight: torch.Tensor, layer: LayerSpec, candidates: Sequence[Candidate]) -> list[TimingRequest]:
    """One run per candidate on one random input: dense as Inductor compiles it
    (:func:`inductor_dense`, compiled by the request's ``prepare``), or what the candidate's
    format runs for a converted layer (``SparseFormat.timing_run``)."""
    generator = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(layer.rows, layer.in_features, generator=generator, device=weight.device).to(weight.dtype)
    bias = torch.randn(layer.out_features, generator=generator, device=weight.device).to(weight.dtype)
    dense_weight = weight.detach().contiguous()
    requests = []
    for candidate in candidates:
        prepare = None
        if candidate.kind == "dense":
            run = _DenseRun(x, bias)
            prepare = run.prepare
        elif candidate.kind in formats.FORMATS:
            run = formats.FORMATS[candidate.kind].timing_run(dense_weight, candidate, x, bias)
        else:
            raise ValueError(f"sparse_compile.measure: no way to time a {candidate.kind!r} candidate")
        requests.append(TimingRequest(candidate, layer, run, prepare))
    return requests


class _DenseRun:
    """Dense for ``x`` (rows x in) and ``bias`` as the compiled graph runs it; compiled (once per
    process and shape, :func:`inductor_dense`) by :meth:`prepare` or at the first call."""

    def __init__(self, x: torch.Tensor, bias: torch.Tensor | None):
        self.x, self.bias = x, bias
        self._fn: Callable[[torch.Tensor], object] | None = None

    def prepare(self) -> None:
        if self._fn is not None:
            return
        try:
            self._fn = inductor_dense(self.bias.shape[0], self.x, self.bias is not None)
        except Exception as error:  # noqa: BLE001 - timing must not fail a compile: dense as eager then
            log.warning(
                "sparse_compile: Inductor could not compile a dense %dx%d layer to time it (%s: %s); "
                "timing F.linear instead", self.bias.shape[0], self.x.shape[1], type(error).__name__, error,
            )
            weight = torch.randn(self.bias.shape[0], self.x.shape[1], device=self.x.device).to(self.x.dtype)
            self._fn = lambda x: _no_grad(torch.nn.functional.linear, x, weight, self.bias)
            self._fn.weight = weight

    def __call__(self):
        self.prepare()
        return self._fn(self.x)


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


# --------------------------------------------------------------------------------------------
# Dense as Inductor runs it


class _DenseLinear(torch.nn.Module):
    """One linear layer, its weight and bias constants of the graph (frozen, as in the backend)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


#: Per process: (out, rows, in, dtype, bias, device) -> the one-op graph as Inductor compiled it.
_dense_compiled: dict[tuple, Callable[[torch.Tensor], object]] = {}


def inductor_dense(out_features: int, x: torch.Tensor, bias: bool = True) -> Callable[[torch.Tensor], object]:
    """A call computing ``x @ W.T + b`` (``W``: ``[out_features, x.shape[1]]``) as the ``sparse``
    backend's compiled graph computes a dense layer: ``W`` and ``b`` constants (freezing), no CPU
    weight packing (which the backend switches off so that its pass sees the linears), the
    user's Inductor settings (``mode``) where it runs inside a compile; on CPU that is
    ``extern_kernels.addmm`` (``mm`` without a bias) with the bias in its epilogue.

    Compiled by Inductor once per process per shape, rows, dtype, bias or not and device (a dense
    matmul's time does not depend on the weight's values, so ``W`` and ``b`` are random), with
    ``compile_fx`` directly (no Dynamo), without the backend's pass, leaving the user's counters
    as they were: it runs inside a compile of the ``sparse`` backend. The call is the compiled
    module's own ``call`` (what runs inside a graph, less the entry checks of a compiled graph,
    ~10 us a call on this project's CPU, which a layer inside a graph does not pay).
    :data:`spent` counts the compiles and their seconds.
    """
    key = (out_features, *x.shape, x.dtype, bool(bias), x.device, dense_settings())
    if key not in _dense_compiled:
        start = time.perf_counter()
        try:
            _dense_compiled[key] = _compile_dense(out_features, x, bias)
        finally:
            spent.dense_compiles += 1
            spent.dense_compile_seconds += time.perf_counter() - start
    return _dense_compiled[key]


def _compile_dense(out_features: int, x: torch.Tensor, bias: bool) -> Callable[[torch.Tensor], object]:
    from torch._dynamo.utils import counters
    from torch._guards import tracing
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner
    from torch._inductor.virtualized import V
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from sparse_compile import backend  # imports this module: imported here

    generator = torch.Generator(device=x.device).manual_seed(1)
    weight = torch.randn(out_features, x.shape[1], generator=generator, device=x.device).to(x.dtype)
    b = torch.randn(out_features, generator=generator, device=x.device).to(x.dtype) if bias else None
    gm = torch.fx.symbolic_trace(_DenseLinear(weight, b))
    patches = {
        "freezing": True,
        # Only Inductor's own passes: not the backend's (this graph is none of the user's) nor a user's.
        "post_grad_custom_pre_pass": None,
        "post_grad_custom_post_pass": None,
        "cpp.weight_prepack": False,
        "fx_graph_cache": False,
    }
    inner: list[object] = []

    def inner_compile(*args, **kwargs):
        inner.append(compile_fx_inner(*args, **kwargs))
        return inner[-1]

    saved = {name: collections.Counter(counter) for name, counter in counters.items()}
    backend._register_freezing_patterns()
    try:
        # A compile of its own, outside the fake mode and the tracing context of the compile it
        # may run in, and a just-in-time one even inside an AOTInductor compile (whose flag would
        # send compile_fx down the export path, which needs the outer compile's fake mode).
        with (
            unset_fake_temporarily(), tracing(None), torch.no_grad(), V.set_aot_compilation(False),
            backend._freezing_patterns_without_packing(),
        ):  # fmt: skip
            compiled = compile_fx(gm, [x], config_patches=patches, inner_compile=inner_compile)
    finally:
        counters.clear()
        counters.update(saved)
    call = getattr(inner[-1], "current_callable", None) if len(inner) == 1 else None
    if call is None:  # another Inductor than the one this was written for: the whole compiled graph
        call = lambda args: compiled(*args)  # noqa: E731

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = call([x])  # a list of its own: the generated code empties it
        return out[0] if isinstance(out, (list, tuple)) else out

    run.weight, run.bias = weight, b  # for tests
    return run


def rows_bucket(rows: int) -> int:
    """Next power of two: batches 200 and 250 share timings, 16 and 256 do not."""
    return next_power_of_2(rows)


def density_bucket(density: float) -> str:
    return f"{round(density / DENSITY_BUCKET) * DENSITY_BUCKET:.2f}"


def spread_key(key: str) -> str:
    """Where a candidate's spread (see :class:`Measured`) is kept, beside its time under ``key``."""
    return f"{key} | spread"


def rows_key(key: str) -> str:
    """Where the rows a candidate was timed with (:attr:`Timed.rows`) are kept, beside its time."""
    return f"{key} | rows"


def cache_key(layer: LayerSpec, candidate: Candidate) -> str:
    parts = [
        device_name(layer.device),
        f"torch {torch.__version__}",
        f"triton {_triton_version()}",
        f"{layer.out_features}x{layer.in_features}",
        str(layer.dtype).removeprefix("torch."),
        f"rows {rows_bucket(layer.rows)}",
        candidate.label,
    ]
    if candidate.density is not None:
        parts.append(f"density {density_bucket(candidate.density)}")
    settings = dense_settings() if candidate.kind == "dense" else ""
    if settings:
        parts.append(settings)
    return " | ".join(parts)


def dense_settings() -> str:
    """The Inductor settings that change how dense is compiled, and so its time, beyond the shape
    (empty by default): ``mode="max-autotune"`` searches GEMM kernels where the default mode
    calls ``mm``/``addmm``. Part of a dense time's cache key and of the one-op compile's; a sparse
    candidate runs our op, the same in every mode."""
    from torch._inductor import config as inductor_config

    return "max-autotune" if inductor_config.max_autotune or inductor_config.max_autotune_gemm else ""


def device_name(device: torch.device) -> str:
    """The device as timings depend on it: GPU model, or CPU model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}: {_cpu_model()}, {torch.get_num_threads()} threads"


@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@functools.lru_cache(maxsize=None)
def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


# --------------------------------------------------------------------------------------------
# The cache file


def cache_dir() -> Path:
    """``$SPARSE_COMPILE_CACHE_DIR``, else the user's cache dir + ``sparse_compile``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "sparse_compile"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparse_compile"


class TimingCache:
    """Cache key -> ms, loaded once per process, written through to a JSON file."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / CACHE_FILE
        self._entries: dict[str, float] | None = None

    def get(self, key: str) -> float | None:
        if self._entries is None:
            self._entries = self._read()
        return self._entries.get(key)

    def put(self, new: dict[str, float]) -> None:
        if self._entries is None:
            self._entries = self._read()
        self._entries.update(new)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.path.with_name(self.path.name + ".lock")):
                # Another process may have written since we read: keep its entries too.
                merged = {**self._read(quiet=True), **new}
                _atomic_write_json(self.path, {"version": _FORMAT_VERSION, "entries": merged})
            self._entries = {**merged, **self._entries}
        except OSError as error:
            warnings.warn(
                f"sparse_compile: could not write the timing cache {self.path} ({error}); timings are "
                f"kept for this process only. Set {CACHE_ENV} to a writable directory.",
                stacklevel=2,
            )

    def _read(self, quiet: bool = False) -> dict[str, float]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as error:
            return self._unreadable(f"cannot be read ({error})", quiet)
        try:
            data = json.loads(text)
            if data.get("version") != _FORMAT_VERSION:
                raise ValueError(f"format version {data.get('version')!r}, expected {_FORMAT_VERSION}")
            entries = data["entries"]
            if not isinstance(entries, dict):
                raise ValueError(f"'entries' is a {type(entries).__name__}, not an object")
            return {str(k): float(v) for k, v in entries.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            return self._unreadable(f"is corrupt ({type(error).__name__}: {error})", quiet)

    def _unreadable(self, why: str, quiet: bool) -> dict[str, float]:
        if not quiet:
            warnings.warn(
                f"sparse_compile: timing cache {self.path} {why}; ignoring it: layers are measured "
                "again and the file is rewritten",
                stacklevel=3,
            )
        return {}


_caches: dict[Path, TimingCache] = {}


def current_cache() -> TimingCache:
    """The cache of the current cache dir (read from the environment at every call)."""
    directory = cache_dir()
    if directory not in _caches:
        _caches[directory] = TimingCache(directory)
    return _caches[directory]


def forget_loaded_caches() -> None:
    """Drops what this process has read or measured, as a new process would start (tests)."""
    _caches.clear()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the atomic replace still keeps the file whole
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _atomic_write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def rows_hint(value) -> int | None:
    """The traced number of rows as an int (a dynamic dim's hint), or None when unknown."""
    if isinstance(value, int):
        return value
    hint = getattr(getattr(value, "node", None), "hint", None)
    return int(hint) if isinstance(hint, int) else None
