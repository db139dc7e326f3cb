"""Measured choice (density_threshold="auto"): the fastest recorded candidate wins, timings are
cached on disk, and the CPU op runs what was timed.

Every test replaces the timer (``sparse_compile.measure.timer``) with recorded times: nothing
here depends on how fast this machine is.
"""

import importlib
import json
import multiprocessing
import statistics
import warnings

import pytest
import torch
from torch import nn

import sparse_compile
from sparse_compile import measure
from sparse_compile.analysis import decide
from sparse_compile.formats import DENSE, Candidate
from sparse_compile.kernels import BsrWeight
from sparse_compile.options import SparseOptions
from sparse_compile.pruning import prune_linear_blocks_

from compile_helpers import TileKernelCalls, compile_and_run, float64_reference

# The module, not the function of the same name that sparse_compile.kernels exports.
bsr_linear_module = importlib.import_module("sparse_compile.kernels.bsr_linear")

pytestmark = pytest.mark.usefixtures("fresh_compiler")

FEATURES = 256  # 8 x 8 = 64 blocks of 32
# Stored blocks of 64 -> block densities 0.047, 0.30, 0.59, 0.95 (buckets 0.05, 0.30, 0.60, 0.95).
KEPT_BLOCKS = (3, 19, 38, 61)


def keep_blocks(weight, kept, b=32):
    """Zeroes all but ``kept`` random whole b x b blocks of ``weight`` (randn: no other zeros)."""
    nb, kb = weight.shape[0] // b, weight.shape[1] // b
    keep = torch.zeros(nb * kb, dtype=torch.bool)
    keep[torch.randperm(nb * kb)[:kept]] = True
    mask = keep.view(nb, kb).repeat_interleave(b, 0).repeat_interleave(b, 1)
    with torch.no_grad():
        weight.mul_(mask)
    return weight


class FourDensities(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(FEATURES, FEATURES) for _ in KEPT_BLOCKS)
        for layer, kept in zip(self.layers, KEPT_BLOCKS):
            keep_blocks(layer.weight, kept)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class RecordedTimer:
    """Times from a table ``{label: ms}`` or ``{label: {density bucket: ms}}``; counts its calls."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def __call__(self, requests):
        self.calls.append([r.candidate for r in requests])
        times = []
        for request in requests:
            entry = self.table[request.candidate.label]
            if isinstance(entry, dict):
                entry = entry[measure.density_bucket(request.candidate.density)]
            times.append(entry)
        return times

    @property
    def timed(self):
        return sum(len(call) for call in self.calls)


# Dense always 1 ms. BSR is faster at 0.05 and 0.30, slower at 0.60, and (unlike any density
# rule) faster again at 0.95: the choice must follow the recorded times, not the density.
RECORDED = {"dense": 1.0, "bsr32": {"0.05": 0.2, "0.30": 0.7, "0.60": 1.3, "0.95": 0.9}}
EXPECTED = ["bsr", "bsr", "dense", "bsr"]


def test_choices_follow_the_recorded_timings(monkeypatch):
    timer = RecordedTimer(RECORDED)
    monkeypatch.setattr(measure, "timer", timer)
    sparse_calls = TileKernelCalls()
    model = FourDensities().eval()
    x = torch.randn(6, 10, FEATURES)
    compiled, out = compile_and_run(model, x, {"blocksize": 32})

    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)
    layers = sparse_compile.report(compiled).layers
    assert [layer.format for layer in layers] == EXPECTED, str(sparse_compile.report(compiled))
    for layer, kept in zip(layers, KEPT_BLOCKS):
        bucket = measure.density_bucket(kept / 64)
        assert layer.density == pytest.approx(kept / 64)
        assert layer.dense_ms == 1.0 and layer.from_cache is False
        assert layer.time_ms == (RECORDED["bsr32"][bucket] if layer.format == "bsr" else 1.0)
    assert "dense measured faster: 1 ms vs 1.3 ms for BSR at block 32" in layers[2].reason
    # The three BSR layers ran the sparse path that was timed (the tile kernel), including the one
    # at density 0.95 that the op's fixed rule (tiles up to 0.5) would have run dense.
    assert len(sparse_calls) == 3
    # One timing run per layer, dense in each: a sparse candidate's spread is measured against
    # dense's calls of the same rounds.
    assert [[c.label for c in call] for call in timer.calls] == [["dense", "bsr32"]] * 4


def test_summary_says_the_expected_speedup(monkeypatch):
    monkeypatch.setattr(measure, "timer", RecordedTimer(RECORDED))
    compiled, _ = compile_and_run(FourDensities().eval(), torch.randn(4, FEATURES), {"blocksize": 32})
    text = str(sparse_compile.report(compiled))
    # dense 4 x 1 ms; chosen 0.2 + 0.7 + 1.0 + 0.9 = 2.8 ms.
    assert f"expected speedup of the linears {4 / 2.8:.2f}x over dense (measured)" in text
    for column in ("ms", "dense ms", "timing", "measured"):
        assert column in text


@pytest.mark.parametrize("slow", ["dense", "bsr16", "bsr32", "bsr64", "bsr128"])
def test_a_slow_candidate_is_never_chosen(monkeypatch, slow):
    # Without the slow one every candidate ties but the slow one, which would otherwise win.
    table = {label: 1.0 for label in ("dense", "bsr16", "bsr32", "bsr64", "bsr128")}
    table[slow] = 1e6
    best_otherwise = "bsr128" if slow != "bsr128" else "bsr64"
    table[best_otherwise] = 0.5
    monkeypatch.setattr(measure, "timer", RecordedTimer(table))
    weight = keep_blocks(torch.randn(512, 512), 4, b=128)  # density 0.25 at every block size
    decision = decide(weight, SparseOptions(), rows=64)
    chosen = "dense" if decision.format == "dense" else f"bsr{decision.blocksize}"
    assert chosen != slow
    assert chosen == best_otherwise
    assert dict(decision.timings)[slow] == 1e6


def test_second_compile_hits_the_cache(monkeypatch):
    timer = RecordedTimer(RECORDED)
    monkeypatch.setattr(measure, "timer", timer)
    model, x = FourDensities().eval(), torch.randn(3, FEATURES)
    timed_before = measure.spent.candidates_timed
    compile_and_run(model, x, {"blocksize": 32})
    assert timer.timed == 8 and measure.spent.candidates_timed == timed_before + 8  # dense with each

    # A new process: nothing in memory, the file on disk.
    measure.forget_loaded_caches()
    torch._dynamo.reset()
    sparse_compile.clear_reports()
    compiled, out = compile_and_run(model, x, {"blocksize": 32})
    assert timer.timed == 8, "the second compile timed something"
    assert measure.spent.candidates_timed == timed_before + 8
    layers = sparse_compile.report(compiled).layers
    assert [layer.format for layer in layers] == EXPECTED
    assert all(layer.from_cache for layer in layers)
    assert "cache" in str(sparse_compile.report(compiled))
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)


def test_layers_of_one_shape_and_density_share_one_measurement(monkeypatch):
    timer = RecordedTimer({"dense": 1.0, "bsr32": 0.5})
    monkeypatch.setattr(measure, "timer", timer)
    model = nn.Sequential(*[nn.Linear(FEATURES, FEATURES) for _ in range(3)]).eval()
    for layer in model:
        keep_blocks(layer.weight, 6)  # different blocks, same density
    compiled, _ = compile_and_run(model, torch.randn(2, FEATURES), {"blocksize": 32})
    assert len(timer.calls) == 1
    assert [layer.from_cache for layer in sparse_compile.report(compiled).layers] == [False, True, True]


def test_a_cached_time_keeps_the_rows_it_was_timed_with_and_floors_by_them(monkeypatch):
    # Rows 200 and 150 share a rows bucket (256), so the second layer reads the first's time: its
    # dense floor scales that time down to its own rows, a bound a matmul's time (a fixed cost
    # plus a cost per row) cannot fall below; with more rows than timed it stays the time itself.
    timer = RecordedTimer({"dense": 2.0, "bsr32": 0.5})
    monkeypatch.setattr(measure, "timer", timer)
    weight = keep_blocks(torch.randn(FEATURES, FEATURES), 6)
    first = decide(weight, SparseOptions(blocksize=32), rows=200)
    second = decide(weight, SparseOptions(blocksize=32), rows=150)
    third = decide(weight, SparseOptions(blocksize=32), rows=250)
    assert len(timer.calls) == 1 and second.from_cache and third.from_cache
    assert first.dense_floor_ms == 2.0 and third.dense_floor_ms == 2.0
    assert second.dense_floor_ms == pytest.approx(2.0 * 150 / 200)
    # In a new process the rows come from the file.
    measure.forget_loaded_caches()
    assert decide(weight, SparseOptions(blocksize=32), rows=130).dense_floor_ms == pytest.approx(2.0 * 130 / 200)
    assert len(timer.calls) == 1
    # A caller that does not know the rows gets no floor.
    assert decide(weight, SparseOptions(blocksize=32)).dense_floor_ms is None


def test_floor_of_a_time_without_its_rows_is_unknown():
    timed = measure.Timed(DENSE, 3.0, from_cache=True)
    assert timed.floor_ms(64) is None
    assert measure.Timed(DENSE, 3.0, from_cache=True, rows=128).floor_ms(32) == pytest.approx(0.75)


def test_dense_times_of_another_mode_are_kept_apart(monkeypatch):
    # mode="max-autotune" compiles dense otherwise (a GEMM search): its dense times, and its
    # one-op compiles, must not be reused by a default-mode compile, nor the other way round.
    layer = measure.LayerSpec(384, 1536, torch.float32, 256, torch.device("cpu"))
    bsr = Candidate("bsr", 32, 0.1)
    default_dense, default_bsr = measure.cache_key(layer, DENSE), measure.cache_key(layer, bsr)
    with torch._inductor.config.patch(max_autotune=True):
        tuned_dense, tuned_bsr = measure.cache_key(layer, DENSE), measure.cache_key(layer, bsr)
    assert tuned_dense == default_dense + " | max-autotune"
    assert tuned_bsr == default_bsr  # our op runs the same in every mode
    compiles = []
    monkeypatch.setattr(measure, "_dense_compiled", {})
    monkeypatch.setattr(measure, "_compile_dense", lambda *args: compiles.append(args) or (lambda x: x))
    x = torch.randn(8, 16)
    measure.inductor_dense(32, x)
    measure.inductor_dense(32, x)
    with torch._inductor.config.patch(max_autotune_gemm=True):
        measure.inductor_dense(32, x)
    assert len(compiles) == 2


def test_cache_key_names_everything_a_time_depends_on():
    layer = measure.LayerSpec(768, 3072, torch.bfloat16, 394, torch.device("cpu"))
    key = measure.cache_key(layer, Candidate("bsr", 32, 0.102))
    for part in (f"torch {torch.__version__}", "triton ", "768x3072", "bfloat16", "rows 512", "bsr32", "density 0.10"):
        assert part in key
    assert key.startswith(measure.device_name(torch.device("cpu")))
    assert measure.cache_key(layer, DENSE).endswith("| dense")
    # Same bucket, same key; next bucket, another.
    assert key == measure.cache_key(layer, Candidate("bsr", 32, 0.11))
    assert key != measure.cache_key(layer, Candidate("bsr", 32, 0.13))


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(measure.CACHE_ENV, str(tmp_path / "here"))
    assert measure.cache_dir() == tmp_path / "here"
    monkeypatch.delenv(measure.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert measure.cache_dir() == tmp_path / "xdg" / "sparse_compile"


@pytest.mark.parametrize("content", ["{not json", '{"version": 1, "entries": [1, 2]}', '{"version": 99, "entries": {}}', ""])
def test_corrupt_cache_file_is_rebuilt_with_a_warning(monkeypatch, content):
    timer = RecordedTimer(RECORDED)
    monkeypatch.setattr(measure, "timer", timer)
    path = measure.cache_dir() / measure.CACHE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    with pytest.warns(UserWarning, match=r"timing cache .* is corrupt \(.*\); ignoring it"):
        compiled, _ = compile_and_run(FourDensities().eval(), torch.randn(2, FEATURES), {"blocksize": 32})
    assert timer.timed == 8
    assert [layer.format for layer in sparse_compile.report(compiled).layers] == EXPECTED
    entries = json.loads(path.read_text())["entries"]
    assert all(isinstance(ms, float) for ms in entries.values())
    # 5 layer timings (dense, BSR at 4 densities), the rows each was timed with and BSR's 4
    # spreads, and the whole-graph verdict's 6 entries (sparse ms, dense ms, ratio, spread, keep,
    # floor: whether the floor shortcut decided).
    layer_entries = [key for key in entries if " | graph " not in key]
    assert len([key for key in layer_entries if not key.endswith((" | spread", " | rows"))]) == 5
    assert len([key for key in layer_entries if key.endswith(" | rows")]) == 5
    assert len([key for key in layer_entries if key.endswith(" | spread")]) == 4
    assert len([key for key in entries if " | graph " in key]) == 6


def _write_entries(directory, worker, count):
    cache = measure.TimingCache(directory)
    for i in range(count):
        cache.put({f"worker {worker} entry {i}": float(i)})


def test_concurrent_writers_keep_every_entry(tmp_path):
    # Processes writing at once (DDP ranks compiling together) must not lose each other's
    # entries nor leave a half-written file.
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_write_entries, args=(tmp_path, w, 25)) for w in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unreadable file would warn
        entries = measure.TimingCache(tmp_path)._read()
    assert entries == {f"worker {w} entry {i}": float(i) for w in range(4) for i in range(25)}
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_numeric_threshold_times_nothing(monkeypatch):
    timer = RecordedTimer(RECORDED)
    monkeypatch.setattr(measure, "timer", timer)
    compiled, _ = compile_and_run(FourDensities().eval(), torch.randn(2, FEATURES), {"blocksize": 32, "density_threshold": 0.4})
    assert timer.calls == []
    layers = sparse_compile.report(compiled).layers
    assert [layer.format for layer in layers] == ["bsr", "bsr", "dense", "dense"]
    assert all(layer.time_ms is None and layer.from_cache is None for layer in layers)
    assert "expected speedup" not in str(sparse_compile.report(compiled))


def test_cpu_timer_times_every_candidate_round_robin(monkeypatch):
    monkeypatch.setattr(measure, "CPU_HOPELESS", float("inf"))  # none dropped, however the calls vary
    calls = []
    fns = [lambda name=name: calls.append(name) for name in "abc"]
    times = measure._time_cpu(fns)
    assert len(times) == 3 and all(t >= 0 for t in times)
    # Warm-up, then rounds of a, b, c (interleaved, so load hits all alike).
    assert calls[-3:] == ["a", "b", "c"] and len(calls) >= 3 * (measure.CPU_WARMUP + measure.CPU_MIN_REPS)


def test_cuda_timer_warms_up_before_do_bench(monkeypatch):
    import triton.testing

    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    monkeypatch.setattr(
        triton.testing, "do_bench",
        lambda fn, warmup, rep, return_mode: events.append(("bench", return_mode)) or 0.25,
    )
    times = measure._time_cuda([lambda: events.append("call")], torch.device("cuda"))
    # The first call (autotuning) is finished before do_bench starts timing.
    assert events == ["call", "sync", ("bench", "median")] and times == [0.25]


def test_the_cpu_variant_travels_in_the_call_not_in_process_state():
    weight = keep_blocks(torch.randn(64, 64), 10, b=16)  # density 10/16: the fixed rule rebuilds
    bsr = BsrWeight.from_dense(weight, 16)
    x = torch.randn(5, 64)
    values, crow = bsr.values, bsr.crow_indices
    assert bsr_linear_module._cpu_variant(x, values, crow, "auto") == "rebuild"
    assert bsr_linear_module._cpu_variant(x, values, crow, "tiles") == "tiles"
    assert not hasattr(bsr_linear_module, "_CPU_VARIANTS") and not hasattr(bsr_linear_module, "set_cpu_variant")
    reference = x.double() @ weight.double().t()
    for variant in ("auto", "tiles", "gather", "rebuild"):
        torch.testing.assert_close(bsr_linear_module.bsr_linear(x, bsr, variant=variant).double(), reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="gather"):
        bsr_linear_module.bsr_linear(x, bsr, variant="fast")


class Mixer(nn.Module):
    """timm Mixer's token mixing: 16 tokens -> 384 -> 16, applied across tokens."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 384), nn.Linear(384, 16)

    def forward(self, x):  # x: [batch, channels, tokens=16]
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


@pytest.mark.parametrize("options", [{"blocksize": 32}, {}, {"blocksize": 32, "density_threshold": 0.4}])
def test_narrow_linears_are_converted(options):
    # 384x16 and 16x384 at block 32: 12 zero-padded blocks each, 11 pruned.
    model = Mixer().eval()
    prune_linear_blocks_(model, 0.9, 32)
    x = torch.randn(2, 24, 16)
    compiled, out = compile_and_run(model, x, options)
    report = sparse_compile.report(compiled)
    assert [layer.format for layer in report.layers] == ["bsr", "bsr"], str(report)
    assert all(layer.density <= 0.1 for layer in report.layers)
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)


def test_dense_narrow_linear_says_why():
    decision = decide(torch.randn(10, 512), SparseOptions(blocksize=16))
    assert decision.format == "dense" and "no block to skip" in decision.reason
    assert "smaller than" not in decision.reason


# --------------------------------------------------------------------------------------------
# The tie rule: sparse runs only when it beats dense by more than the spread and the minimum


def measured_timer(dense_ms, sparse_ms, spread):
    """Dense ``dense_ms``; every sparse candidate ``sparse_ms`` with ``spread`` (a fraction of dense)."""

    def timer(requests):
        return [
            measure.Measured(dense_ms) if r.candidate.kind == "dense" else measure.Measured(sparse_ms, spread)
            for r in requests
        ]

    return timer


@pytest.mark.parametrize(
    "dense_ms, sparse_ms, spread, min_saving, expected",
    [
        (1.0, 0.9, 0.15, "auto", "measured_tie"),  # 0.1 ms faster, within the spread of 0.15 ms
        (1.0, 0.9, 0.05, "auto", "bsr"),  # beyond the spread (0.05 ms) and the minimum (0.02 ms)
        (0.176, 0.160, 0.0, "auto", "measured_tie"),  # 0.016 ms faster: below the CPU minimum, 0.02 ms
        (0.176, 0.160, 0.0, 0.01, "bsr"),  # ... and above a minimum of 0.01 ms
        (0.176, 0.133, 0.3, "auto", "measured_tie"),  # issue 21's GPT-2 c_proj: 0.043 ms, within 30% of dense
        (0.176, 0.133, 0.1, "auto", "bsr"),
        (1.0, 1.2, 0.0, 0.0, "measured_faster"),
        (1.0, 1.0, 0.0, 0.0, "measured_faster"),  # an exact tie
    ],
)
def test_tie_band(monkeypatch, dense_ms, sparse_ms, spread, min_saving, expected):
    monkeypatch.setattr(measure, "timer", measured_timer(dense_ms, sparse_ms, spread))
    weight = keep_blocks(torch.randn(256, 256), 16)  # block density 0.25 at block 32
    decision = decide(weight, SparseOptions(blocksize=32, formats=("bsr",), min_saving_ms=min_saving), rows=48)
    if expected == "bsr":
        assert decision.format == "bsr" and decision.time_ms == sparse_ms and decision.dense_ms == dense_ms
        return
    assert decision.format == "dense" and decision.reason_code.value == expected, decision.reason
    assert decision.time_ms == dense_ms and dense_ms in dict(decision.timings).values()
    if expected == "measured_tie":
        band = max(spread * dense_ms, 0.02 if min_saving == "auto" else min_saving)
        assert decision.reason.startswith(
            f"a tie: BSR at block 32 (density 0.25) measured {sparse_ms:.3g} ms vs {dense_ms:.3g} ms dense, "
            f"{dense_ms - sparse_ms:.3g} ms faster, needed more than {band:.3g} ms (spread {100 * spread:.0f}% of dense"
        ), decision.reason


def test_a_candidate_beyond_its_band_wins_over_a_faster_one_within_its_own(monkeypatch):
    # bsr16 is fastest but within its spread (0.5 of dense); bsr32 saves less, beyond its spread.
    table = {"dense": 1.0, "bsr16": measure.Measured(0.6, 0.5), "bsr32": measure.Measured(0.7, 0.1), "bsr64": 0.9, "bsr128": 0.95}
    monkeypatch.setattr(measure, "timer", RecordedTimer(table))
    weight = keep_blocks(torch.randn(256, 256), 4)  # 4 blocks of 32: some to skip at 16 and 32
    decision = decide(weight, SparseOptions(blocksize="auto", formats=("bsr",)), rows=48)
    assert decision.format == "bsr" and decision.blocksize == 32 and decision.time_ms == 0.7


def test_a_dense_layer_that_inductor_cannot_compile_is_timed_eagerly(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(measure, "_compile_dense", broken)
    x, bias = torch.randn(5, 33), torch.randn(17)
    run = measure._DenseRun(x, bias)
    out = run()
    assert out.shape == (5, 17)
    reference = x.double() @ run._fn.weight.double().t() + bias.double()
    torch.testing.assert_close(out.double(), reference, atol=1e-4, rtol=1e-4)


def test_a_tie_says_so_in_the_report_and_the_counters_and_the_spread_is_cached(monkeypatch):
    from torch._dynamo.utils import counters

    counters.clear()
    timer = RecordedTimer({"dense": 1.0, "bsr32": measure.Measured(0.8, 0.25)})  # 0.2 ms faster, 0.25 needed
    monkeypatch.setattr(measure, "timer", timer)
    model = nn.Sequential(nn.Linear(FEATURES, FEATURES)).eval()
    keep_blocks(model[0].weight, 6)
    x = torch.randn(3, FEATURES)
    compiled, out = compile_and_run(model, x, {"blocksize": 32})
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)
    text = str(sparse_compile.report(compiled))
    assert "a tie: BSR at block 32" in text and "needed more than 0.25 ms (spread 25% of dense" in text, text
    assert counters["sparse_compile"]["dense_measured_tie"] == 1
    # A new process reads the time and the spread from the cache, and decides the same.
    measure.forget_loaded_caches()
    torch._dynamo.reset()
    sparse_compile.clear_reports()
    compiled, _ = compile_and_run(model, x, {"blocksize": 32})
    assert timer.timed == 2
    (layer,) = sparse_compile.report(compiled).layers
    assert layer.format == "dense" and layer.from_cache and "spread 25% of dense" in layer.reason


def test_spread_is_half_the_iqr_of_paired_ratios():
    # Dense's calls vary (load), the candidate's follow them at 0.5-0.8 of dense in each round.
    dense = [1.0, 2.0, 4.0, 3.0, 1.5]
    ratios = [0.5, 0.6, 0.8, 0.7, 0.65]
    samples = {0: dense, 1: [d * r for d, r in zip(dense, ratios)], 2: [0.9] * 5}
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
    assert measure._spread(samples, 1, 0) == pytest.approx((high - low) / 2)
    assert measure._spread(samples, 0, 0) == 0.0  # dense itself
    assert measure._spread(samples, 1, None) == 0.0  # nothing to pair with
    assert measure._spread({0: dense}, 1, 0) == 0.0  # dropped as hopeless: only warm-up calls
    # A candidate that is steady while dense varies: the spread shows dense's noise.
    assert measure._spread(samples, 2, 0) > 0.1


# --------------------------------------------------------------------------------------------
# Dense as Inductor compiles it


def test_inductor_dense_computes_the_layer_and_compiles_once_per_shape():
    from torch._dynamo.utils import counters

    x = torch.randn(7, 96)
    before = {name: dict(counter) for name, counter in counters.items()}
    compiles = measure.spent.dense_compiles
    run = measure.inductor_dense(40, x, bias=True)
    out = run(x)
    reference = torch.nn.functional.linear(x.double(), run.weight.double(), run.bias.double())
    torch.testing.assert_close(out.double(), reference, atol=1e-4, rtol=1e-4)
    assert measure.spent.dense_compiles == compiles + 1
    assert measure.inductor_dense(40, x, bias=True) is run  # cached in the process
    assert {name: dict(counter) for name, counter in counters.items()} == before  # the user's counters untouched
    no_bias = measure.inductor_dense(40, x, bias=False)
    assert no_bias is not run and no_bias.bias is None
    torch.testing.assert_close(no_bias(x).double(), x.double() @ no_bias.weight.double().t(), atol=1e-4, rtol=1e-4)


def test_inductor_dense_compiles_just_in_time_inside_an_aotinductor_compile():
    # Packaging (sparse_compile.aoti_compile_and_package) times the layers inside AOTInductor's
    # compile, whose flag sent the one-op compile down the export path: it failed ("None does not
    # have the attribute 'allow_non_fake_inputs'") and the layer was timed as eager F.linear.
    from torch._inductor.virtualized import V

    x = torch.randn(5, 72)
    with V.set_aot_compilation(True):
        run = measure.inductor_dense(24, x, bias=True)
        out = run(x)
    reference = torch.nn.functional.linear(x.double(), run.weight.double(), run.bias.double())
    torch.testing.assert_close(out.double(), reference, atol=1e-4, rtol=1e-4)


def test_dense_compiled_inside_the_backend_does_not_recurse_nor_count(monkeypatch):
    from torch._dynamo.utils import counters

    calls = []

    def preparing_timer(requests):
        calls.append([r.candidate.label for r in requests])
        for request in requests:
            if request.prepare is not None:
                before = {name: dict(counter) for name, counter in counters.items()}
                request.prepare()
                assert {name: dict(counter) for name, counter in counters.items()} == before
            out = request.run()
            assert out.shape == (request.layer.rows, request.layer.out_features)
        return conftest_modelled(requests)

    from conftest import modelled_timer as conftest_modelled

    monkeypatch.setattr(measure, "timer", preparing_timer)
    model = nn.Sequential(nn.Linear(FEATURES, 2 * FEATURES), nn.Linear(2 * FEATURES, FEATURES)).eval()  # no C++ kernel to build
    prune_linear_blocks_(model, 0.9, 32)
    x = torch.randn(2, 5, FEATURES)
    compiles = measure.spent.dense_compiles
    compiled, out = compile_and_run(model, x, {"blocksize": 32, "check_graph": False})
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)
    # One timing run per layer: the helper graphs' compiles did not run the backend's pass.
    assert calls == [["dense", "bsr32"], ["dense", "bsr32"]]
    assert measure.spent.dense_compiles == compiles + 2
    report = sparse_compile.report(compiled)
    assert [layer.format for layer in report.layers] == ["bsr", "bsr"], str(report)
    assert counters["sparse_compile"]["bsr_layers"] == 2


def test_round_robin_rounds_order_drops_and_stops():
    """The one timing loop (per-layer timing, the whole-graph check and the benchmarks use it):
    a stand-in round timer sees each round's calls in order; None drops a function; stop ends it."""
    seen = []

    def time_round(calls):
        names = [fn() for fn in calls]
        seen.append(names)
        return [None if (name == "b" and len(seen) == 2) else float(len(seen)) for name in names]

    fns = {name: (lambda name=name: name) for name in "abc"}
    times = measure.round_robin(fns, 5, time_round, rotate=True, stop=lambda done, elapsed, times: done == 4)
    assert seen == [["a", "b", "c"], ["b", "c", "a"], ["a", "c"], ["c", "a"]]
    assert times == {"a": [1.0, 2.0, 3.0, 4.0], "c": [1.0, 2.0, 3.0, 4.0]}
