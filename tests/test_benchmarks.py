"""Smoke tests for the benchmarks: tiny CPU settings, a few seconds each.

They check that each benchmark runs end to end, prints every row and column, catches wrong
answers, and turns bad flags into argparse errors. They say nothing about speed: the ViT
benchmark's round-robin timer is a stand-in here (every call 1 ms, so every row ties), and the
tests of its verdicts give it made-up times.
"""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import common, cpu_op, kernels, vit

ROOT = pathlib.Path(__file__).resolve().parents[1]

CPU = ["--device", "cpu", "--warmup", "0", "--reps", "2"]
TINY_VIT = CPU + [
    "--model", "tiny", "--image-size", "32", "--patch-size", "16", "--num-layers", "1",
    "--hidden-dim", "64", "--mlp-dim", "128", "--num-heads", "2", "--batch-size", "2",
    "--sparsity", "0.75", "--blocksize", "32",
]
TINY_KERNELS = CPU + ["--shapes", "64x128", "--batch-size", "1", "--tokens", "40", "--sparsity", "0.5", "--blocksize", "32"]

REAL_TIME_CALL_MS = common.time_call_ms


def one_ms_per_call(fn, device):
    """Stand-in for :func:`common.time_call_ms`: runs the call, says it took 1 ms."""
    fn()
    return 1.0


@pytest.fixture(autouse=True)
def _vit_without_real_timings_or_files(monkeypatch, tmp_path):
    """No test may depend on how fast a row really was, nor write into the checkout."""
    monkeypatch.setattr(common, "time_call_ms", one_ms_per_call)
    monkeypatch.setattr(vit, "OUT_DIR", tmp_path / "out")


def table_lines(text: str, first_column: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(first_column)]


def test_vit_prints_every_row_and_column(capsys, tmp_path):
    output = tmp_path / "result.md"
    assert vit.main(TINY_VIT + ["--output", str(output), "--no-plot"]) == 0
    captured = capsys.readouterr()
    text = captured.out
    for header in vit.HEADERS:
        assert header in text
    for fact in ("device", "torch", "triton", "model", "sparsity", "block sizes", "fp32 matmul"):
        assert fact in text
    rows = {line.split("  ")[0]: line for line in text.splitlines() if "  " in line}
    for variant in ("dense eager", "dense torch.compile", "torch.sparse BSR (eager)", 'torch.compile backend="sparse"'):
        assert variant in rows, text
        assert rows[variant].rstrip().endswith("ok"), rows[variant]
    assert vit.NM_LABEL in rows and "needs a GPU" in rows[vit.NM_LABEL], text
    # One encoder block: attention in/out projections and two MLP linears, of 5 with the head.
    assert "4/5" in rows['torch.compile backend="sparse"']
    assert "4/5" in rows["torch.sparse BSR (eager)"]
    written = output.read_text()
    assert "python -m benchmarks.vit" in written and "Raw per-call times" in written
    assert 'torch.compile backend="sparse"' in written
    # Progress on stderr, one line per row built and per timed round; stdout keeps the tables
    # and ends with the verdict.
    assert "[vit" not in text
    assert "compiled 5/7 torch.compile backend=\"sparse\" 75% / 32" in captured.err, captured.err
    assert "timed round 2/2 (6 rows)" in captured.err
    verdict = text.strip().splitlines()[-1]
    assert verdict.startswith('verdict: backend="sparse" at 75% / block 32, float32: 1.00x dense torch.compile'), verdict
    assert "tie" in verdict and f"table: {output}" in verdict and "total" in verdict and "plot" not in verdict
    assert verdict in written


def test_vit_runs_only_the_variants_picked(capsys, tmp_path):
    # The GPU session's seed setting: dense eager vs backend="sparse", nothing else compiled.
    # No --output, no --plot: both are written by default (vit.OUT_DIR, a temporary one here).
    assert vit.main(TINY_VIT + ["--variants", "eager,sparse"]) == 0
    text = capsys.readouterr().out
    table, png = tmp_path / "out" / "vit-cpu.md", tmp_path / "out" / "vit-cpu.png"
    assert "Raw per-call times" in table.read_text()
    verdict = text.strip().splitlines()[-1]
    assert "1.00x dense eager" in verdict and f"table: {table}" in verdict  # the baseline without dense compile
    if importlib.util.find_spec("matplotlib"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {png}" in verdict
    rows = {line.split("  ")[0]: line for line in text.splitlines() if "  " in line}
    assert "dense eager" in rows and 'torch.compile backend="sparse"' in rows
    for absent in ("dense torch.compile", "torch.sparse BSR (eager)", vit.NM_LABEL, "Supermask layout incl. in_proj"):
        assert absent not in rows, text
    cells = re.split(r"\s{2,}", rows['torch.compile backend="sparse"'].strip())
    assert cells[vit.HEADERS.index("vs eager")].endswith("x")  # found by name, not by position
    assert cells[vit.HEADERS.index("vs compile")] == "-" and cells[-1] == "ok"
    assert cells[vit.HEADERS.index("verdict")] == "tie"  # against dense eager, the baseline here


def test_vit_model_output_is_not_trivially_zero():
    # torchvision zeroes the classifier head; a zero output would make every row "match".
    args = vit.parse_args(TINY_VIT)
    with torch.no_grad():
        out = vit.build_model(args)(torch.randn(2, 3, 32, 32))
    assert out.abs().min() > 0


def test_torch_sparse_path_matches_dense():
    args = vit.parse_args(TINY_VIT)
    model, names = vit.pruned_copy(vit.build_model(args), sparsity=0.75, blocksize=32)
    # The encoder block's attention in/out projections and two MLP linears; not the head.
    assert len(names) == 4 and not any(name.startswith("heads") for name in names)
    sparse_model, converted = vit.to_torch_sparse(model, blocksize=32)
    assert converted == 4
    layouts = {m.weight.layout for m in sparse_model.modules() if isinstance(m, vit.BsrLinear)}
    assert layouts == {torch.sparse_bsr}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(sparse_model(x), model(x), atol=1e-5, rtol=1e-5)


def test_kernels_prints_every_row_and_column(capsys):
    assert kernels.main(TINY_KERNELS) == 0
    text = capsys.readouterr().out
    for header in kernels.HEADERS:
        assert header in text
    lines = table_lines(text, "64x128")
    assert len(lines) == 5
    for line, variant in zip(lines, ["dense F.linear", "torch.sparse BSR", "sparse_compile bsr_linear"]):
        assert variant in line and line.rstrip().endswith("ok"), line
    # The 2:4 rows say why they have no number on a CPU instead of failing the run.
    for line, variant in zip(lines[3:], ["2:4 (cuSPARSELt)", "2:4 (CUTLASS)"]):
        assert variant in line and "needs a GPU" in line and "ok" not in line.split(), line


def test_a_reference_path_that_cannot_run_gets_a_row_saying_why(capsys):
    # torch's CPU BSR matmul has no bf16 kernel: a fact about torch, shown in its row.
    kernels.main(TINY_KERNELS + ["--dtype", "bf16"])
    lines = table_lines(capsys.readouterr().out, "64x128")
    assert "not run: NotImplementedError" in lines[1]
    assert lines[2].rstrip().endswith("ok")


def test_a_row_of_ours_that_cannot_run_fails_the_kernel_run(capsys, monkeypatch):
    def broken(x, bsr, bias):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(kernels, "bsr_linear", broken)
    assert kernels.main(TINY_KERNELS) == 1
    captured = capsys.readouterr()
    assert "not run: RuntimeError: kernel exploded" in table_lines(captured.out, "64x128")[2]
    assert "a row of sparse_compile did not run" in captured.err


def test_a_row_of_ours_that_cannot_run_fails_the_vit_run(capsys, monkeypatch):
    def broken(model, setup, blocksize):
        raise RuntimeError("backend exploded")

    monkeypatch.setattr(vit, "sparse_backend", broken)
    assert vit.main(TINY_VIT + ["--no-plot"]) == 1
    captured = capsys.readouterr()
    assert "not run: RuntimeError: backend exploded" in captured.out
    assert "a row of sparse_compile did not run" in captured.err


def test_a_fast_wrong_answer_is_caught(capsys, monkeypatch):
    monkeypatch.setattr(kernels, "bsr_linear", lambda x, bsr, bias: torch.zeros(x.shape[0], bsr.out_features))
    assert kernels.main(TINY_KERNELS) == 1
    captured = capsys.readouterr()
    wrong = table_lines(captured.out, "64x128")[2]
    assert "WRONG" in wrong and "x" not in wrong.split()[8]  # no speedup shown for it
    assert "differs from dense" in captured.err


def test_list_flags_are_comma_separated_or_repeated():
    args = kernels.parse_args(CPU + ["--sparsity", "0.8", "--sparsity", "0.9,0.8", "--dtype", "bf16,float32"])
    assert args.sparsity == [0.8, 0.9]
    assert args.dtype == [torch.bfloat16, torch.float32]
    assert args.blocksize == kernels.DEFAULTS["cpu"]["blocksize"]


@pytest.mark.parametrize(
    "module, flags, message",
    [
        (vit, ["--sparsity", "1.5"], "outside [0, 1)"),
        (vit, ["--blocksize", "48"], "not supported"),
        (vit, ["--dtype", "float64"], "unknown dtype"),
        (vit, ["--model", "resnet50"], "invalid choice"),
        (vit, ["--model", "vit_b_16", "--num-layers", "2"], "applies to --model tiny only"),
        (vit, ["--image-size", "30"], "not a multiple of the patch size"),
        (vit, ["--batch-size", "0"], "positive integer"),
        (vit, ["--variants", "eager,dense"], "unknown variant 'dense'"),
        (kernels, ["--shapes", "768x"], "KxN"),
        (kernels, ["--reps", "-1"], "positive integer"),
    ],
)
def test_bad_flags_are_argparse_errors(module, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(CPU + flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_relative_error_is_scaled_by_the_output():
    ref = torch.tensor([10.0, -20.0])
    assert common.relative_error(ref + 0.2, ref) == pytest.approx(0.01, rel=1e-5)
    assert common.relative_error(torch.zeros(2), torch.zeros(2)) == 0.0


def test_cpu_timing_goes_through_torch_utils_benchmark(monkeypatch):
    from torch.utils import benchmark

    made = []
    real_timer = benchmark.Timer

    def recording_timer(*args, **kwargs):
        made.append(kwargs)
        return real_timer(*args, **kwargs)

    monkeypatch.setattr(benchmark, "Timer", recording_timer)
    calls = []
    timing = common.measure(lambda: calls.append(1), torch.device("cpu"), warmup=2, reps=5)
    assert made and made[0]["num_threads"] == torch.get_num_threads()
    assert timing.reps == 5 and all(t > 0 for t in timing.times_ms)
    assert len(calls) == 2 + 5 * 3  # our warm-up calls, then per timed call Timer's 2 untimed ones


def test_cuda_timing_goes_through_do_bench_with_every_time(monkeypatch):
    import triton.testing

    seen = {}

    def fake_do_bench(fn, warmup, rep, return_mode):
        seen.update(warmup=warmup, rep=rep, return_mode=return_mode)
        fn()
        return [0.5, 0.25, 0.75]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(common, "synchronize", lambda device: None)
    monkeypatch.setattr(common, "_l2_clear_s", lambda device: 0.001)
    timing = common.measure(lambda: None, torch.device("cuda"), warmup=1, reps=3)
    assert seen["rep"] >= 3 * 0.001 * 1e3  # the budget covers 3 calls with their L2 clears
    assert seen["return_mode"] == "all"  # raw times, kept in the results files
    assert timing.times_ms == (0.5, 0.25, 0.75) and timing.median_ms == 0.5


def test_round_robin_times_one_call_of_each_per_round_in_turn():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = iter(range(1, 100))
    timings, errors = common.time_round_robin(fns, torch.device("cpu"), warmup=1, rounds=3,
                                              call_ms=lambda fn, device: (fn(), float(next(times)))[1])
    assert not errors
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")  # warm-up, then each round one later
    assert timings["a"].times_ms == (1.0, 6.0, 8.0) and timings["c"].times_ms == (3.0, 5.0, 7.0)


def test_round_robin_drops_a_function_that_fails_and_times_the_others():
    def broken():
        raise RuntimeError("boom")

    timings, errors = common.time_round_robin({"ok": lambda: None, "broken": broken}, torch.device("cpu"), 0, 3,
                                              call_ms=lambda fn, device: (fn(), 2.0)[1])
    assert timings["ok"].times_ms == (2.0, 2.0, 2.0) and "broken" not in timings
    assert str(errors["broken"]) == "boom"


def test_a_round_robin_call_is_timed_by_torch_utils_benchmark(monkeypatch):
    from torch.utils import benchmark

    made, real_timer = [], benchmark.Timer
    monkeypatch.setattr(benchmark, "Timer", lambda *a, **kw: made.append(kw) or real_timer(*a, **kw))
    calls = []
    assert REAL_TIME_CALL_MS(lambda: calls.append(1), torch.device("cpu")) > 0
    assert made[0]["num_threads"] == torch.get_num_threads() and len(calls) == 3  # Timer's 2 untimed + 1


def test_a_round_robin_call_on_cuda_is_timed_by_events_after_an_l2_clear(monkeypatch):
    # No GPU here: stand-ins record the order in which the call, the L2 clear and the events happen.
    import types

    import triton

    log = []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            log.append("record")

        def elapsed_time(self, other):
            return 0.75

    driver = types.SimpleNamespace(clear_cache=lambda cache: log.append(f"clear {cache}"))
    monkeypatch.setattr(triton.runtime, "driver", types.SimpleNamespace(active=driver))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(common, "synchronize", lambda device: log.append("sync"))
    monkeypatch.setattr(common, "_l2_cache", lambda device: "buffer")
    assert REAL_TIME_CALL_MS(lambda: log.append("call"), torch.device("cuda")) == 0.75
    assert log == ["sync", "clear buffer", "record", "call", "record", "sync"]


@pytest.mark.parametrize("row_ms, verdict", [
    ([5, 5, 5, 5, 5], "faster"),
    ([9, 11, 10, 10.5, 9.5], "tie"),  # per-round ratios 0.91-1.11: 1.0 inside the spread
    ([12, 12.5, 11.5, 12, 12], "slower"),
])
def test_speedup_verdict_is_decided_by_the_spread_of_per_round_ratios(row_ms, verdict):
    speedup = common.paired_speedup(common.Timing((10.0,) * 5), common.Timing(tuple(map(float, row_ms))))
    assert speedup.verdict == verdict
    assert speedup.low <= speedup.median <= speedup.high


def test_speedups_pair_the_calls_of_one_round():
    # Load that slows one round slows every row in it: round by round the row is 2x faster,
    # although its median alone (20) equals the baseline's.
    baseline = common.Timing((10.0, 40.0, 40.0))
    row = common.Timing((5.0, 20.0, 20.0))
    assert common.paired_speedup(baseline, row).median == 2.0
    with pytest.raises(ValueError, match="same rounds"):
        common.paired_speedup(baseline, common.Timing((1.0,)))


def fake_rows(times_ms: dict[str, list[float]]) -> list:
    """vit rows as the timing leaves them, with made-up per-round times (no model, no compile)."""
    rows = []
    for label, times in times_ms.items():
        dense = label.startswith("dense")
        ours = label.startswith(("torch.compile", "Supermask"))
        row = vit.Row(label, None if dense else 0.9, None if dense else 32, ours=ours,
                      rel_err=0.0, tol=1e-3, timing=common.Timing(tuple(map(float, times))))
        rows.append(row)
    vit.compare(rows)
    return rows


def test_vit_flags_a_row_of_ours_slower_than_dense_beyond_the_spread():
    rows = fake_rows({
        "dense eager": [20, 20, 20, 20],
        "dense torch.compile": [10, 10, 10, 10],
        "torch.sparse BSR (eager)": [30, 30, 30, 30],  # slower, but not ours: no flag
        vit.SPARSE_LABEL: [12, 12.5, 11.5, 12],  # 0.83x in every round
        "Supermask layout incl. in_proj": [9, 11, 10, 10.5],  # within the spread: a tie
        "Supermask layout excl. in_proj": [5, 5, 5, 5],
    })
    cells = {row[0]: row for row in vit.table_rows(rows, torch.device("cpu"))}
    verdict = vit.HEADERS.index("verdict")
    assert [cells[label][verdict] for label in cells] == ["slower", "baseline", "slower", "SLOWER", "tie", "faster"]
    assert cells[vit.SPARSE_LABEL][vit.HEADERS.index("vs compile")] == "0.83x"
    # Quartiles of the ratios 0.91, 0.95, 1.0, 1.11:
    assert cells["Supermask layout incl. in_proj"][vit.HEADERS.index("spread")] == "0.94-1.03"
    assert [row.slower for row in rows] == [False, False, False, True, False, False]


def test_vit_run_fails_when_a_row_of_ours_is_slower(capsys, monkeypatch):
    # End to end with made-up times: the sparse backend's row 0.8x dense torch.compile in every round.
    made_up = {"dense torch.compile": 10.0, vit.SPARSE_LABEL + " 75% / 32": 12.5}
    real = common.time_round_robin

    def made_up_round_robin(fns, device, warmup, rounds, progress=None, call_ms=None):
        tagged = {}
        for key, fn in fns.items():
            tagged[key] = lambda fn=fn: fn()
            tagged[key].ms = made_up[key]
        return real(tagged, device, warmup, rounds, progress, call_ms=lambda fn, device: (fn(), fn.ms)[1])

    monkeypatch.setattr(common, "time_round_robin", made_up_round_robin)
    assert vit.main(TINY_VIT + ["--variants", "compile,sparse", "--no-plot"]) == 1
    captured = capsys.readouterr()
    row = next(line for line in captured.out.splitlines() if line.startswith(vit.SPARSE_LABEL))
    assert "0.80x" in row and "SLOWER" in row and row.rstrip().endswith("ok")
    flagged = f"slower than dense beyond the measured spread: float32 {vit.SPARSE_LABEL} 75% / 32: 0.80x"
    assert flagged in captured.err
    verdict = captured.out.strip().splitlines()[-1]
    assert "0.80x dense torch.compile (spread 0.80-0.80, slower)" in verdict
    assert "rows of sparse_compile slower than dense beyond the spread: 1 of 1" in verdict


def test_progress_goes_to_stderr_and_beats_during_a_long_step(capsys):
    progress = common.Progress("test", every_s=0.05)
    with progress.heartbeat("compiling something"):
        time.sleep(0.3)
    progress("done")
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len([line for line in lines if "still compiling something" in line]) >= 2
    assert re.fullmatch(r"\[test +\d+ s\] done", lines[-1]), lines[-1]


def test_kernel_table_shows_the_gpu_floor_on_cpu(capsys):
    assert kernels.main(TINY_KERNELS + ["--floor-gpu", "a100"]) == 0
    text = capsys.readouterr().out
    assert "A100 data-sheet peaks" in text
    floor_col = kernels.HEADERS.index("floor ms")
    # The dense row, M = 40, K = 64, N = 128 in fp32 (no TF32): A100's 19.5 TFLOP/s on CUDA
    # cores and 2039 GB/s; FLOP/B = 10.2 > 19.5e12 / 2.039e12, so the FLOPs set the floor.
    m, k, n = 40, 64, 128
    flops, nbytes = 2 * m * n * k, (m * k + m * n + n * k + n) * 4
    assert flops / 19.5e12 > nbytes / 2.039e12
    cells = re.split(r"\s{2,}", table_lines(text, "64x128")[0].strip())
    assert float(cells[floor_col]) == pytest.approx(flops / 19.5e12 * 1e3, rel=1e-2)
    assert cells[floor_col + 1] == "-"  # % of floor: only against a GPU's own time


def test_vit_table_shows_the_linears_floor(capsys):
    assert vit.main(TINY_VIT + ["--no-plot"]) == 0
    text = capsys.readouterr().out
    assert "linears floor ms" in text and "H100 data-sheet peaks" in text
    dense = next(line for line in text.splitlines() if line.startswith("dense eager"))
    sparse = next(line for line in text.splitlines() if line.startswith('torch.compile backend="sparse"'))
    floor_col = vit.HEADERS.index("linears floor ms")
    dense_floor = float(re.split(r"\s{2,}", dense.strip())[floor_col])
    sparse_floor = float(re.split(r"\s{2,}", sparse.strip())[floor_col])
    assert 0 < sparse_floor < dense_floor


@pytest.mark.parametrize("module, flags", [(kernels, TINY_KERNELS), (vit, TINY_VIT)])
def test_plot_writes_a_png(module, flags, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "speedup.png"
    assert module.main(flags + ["--sparsity", "0.5,0.75", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmarks_import_matplotlib_only_for_a_plot():
    code = "import sys, benchmarks.vit, benchmarks.kernels; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_cpu_op_benchmark_checks_and_times_every_candidate(capsys):
    assert cpu_op.main(["--m", "8", "--k", "64", "--n", "64", "--blocksize", "32", "--sparsity", "0.5",
                        "--warmup", "0", "--reps", "1"]) == 0
    text = capsys.readouterr().out
    for name in ("dense+addmm", "gather+bmm+index_add", "tile kernel", "torch.sparse BSR", "F.linear, dense W kept"):
        assert name in text
    assert "b=32, 50% sparse" in text


def test_cpu_op_benchmark_masked_candidates(capsys):
    # Every candidate is checked against float64 before it is timed (a wrong one raises).
    assert cpu_op.main(["--op", "masked", "--m", "13", "--k", "96", "--n", "64", "--blocksize", "32",
                        "--sparsity", "0.6", "--warmup", "0", "--reps", "1"]) == 0
    text = capsys.readouterr().out
    assert "b=32, 60% sparse" in text
    for name in ("W ⊙ M + addmm", "tile kernel", "tile kernel, W column-major"):
        assert name in text


def test_cpu_op_benchmark_overhead_rows(capsys):
    # Each call is checked against float64 first; the table has every call with its ratio to addmm.
    assert cpu_op.main(["--op", "overhead", "--blocksize", "32", "--warmup", "1", "--reps", "2"]) == 0
    text = capsys.readouterr().out
    for name in ("aten.addmm", "tile_linear (C++ op)", "bsr_linear (Python op), tiles"):
        assert name in text
    assert "1.00x" in text and "us per call" in text


def run_gpu_session(tmp_path, *args, python3_cases="", env=None):
    """gpu_session.sh with stand-ins for python3 and nvidia-smi: every call exits 0 unless
    ``python3_cases``, shell ``case`` lines run first, say otherwise; a benchmark writes "table"
    to its --output file. Every python3 call is logged in tmp_path/calls.txt; output under
    tmp_path/out. The script's stderr goes to its stdout (and its session log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text(
        f'#!/bin/sh\necho "$*" >> {tmp_path / "calls.txt"}\n' + python3_cases
        + 'case "$*" in -c*get_device_name*) echo h100; echo "NVIDIA H100 80GB HBM3 (sm90); torch 2.11.0";; esac\n'
        + 'case "$*" in -m\\ benchmarks.*) for a; do last=$a; done; echo table > "$last";; esac\nexit 0\n'
    )
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho NVIDIA H100 80GB HBM3, 550.90, 81559 MiB\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"), **(env or {})}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def python3_calls(tmp_path) -> list[str]:
    """The modules the script ran (``-m NAME``), in order, with their flags."""
    lines = (tmp_path / "calls.txt").read_text().splitlines()
    return [line.removeprefix("-m ") for line in lines if line.startswith(("-m benchmarks.", "-m pytest"))]


def summary_rows(tmp_path) -> dict[str, list[str]]:
    """<gpu>-summary.md's step table: step -> [cap s, ran s, status, file]."""
    lines = (tmp_path / "out" / "h100-summary.md").read_text().splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    return {row[0]: row[1:] for row in rows[1:]}


# A pytest run with two failures: the script must print the first one whole, not the second.
FAKE_PYTEST = """\
....F..F
=================================== FAILURES ===================================
_________________________________ test_one[a] __________________________________
    def test_one():
>       assert kernel() == 1
_ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _ _
    def kernel():
E       AssertionError: first failure, the end of its traceback
_________________________________ test_two ____________________________________
E       AssertionError: second failure
============================= slowest 15 durations =============================
3.00s call tests/test_x.py::test_one[a]
=========================== short test summary info ============================
FAILED tests/test_x.py::test_one[a] - AssertionError: first failure
FAILED tests/test_x.py::test_two - AssertionError: second failure
========================= 2 failed, 6 passed in 3.00s ==========================
"""


def test_gpu_session_first_runs_every_step_and_keeps_the_first_failure(tmp_path):
    """The default (`first`): every step in order of importance, at issue 19's settings, each
    even after one before it failed; the exit status is the first failure's (pytest's 1 here,
    not the ViT's 3); pytest's first failure printed whole; results and a summary under $OUT."""
    fail = (
        f"case \"$*\" in -m\\ pytest*) cat <<'EOF'\n{FAKE_PYTEST}EOF\n exit 1;; "
        "-m\\ benchmarks.vit*bfloat16*) echo vit exploded; exit 3;; esac\n"
    )
    done = run_gpu_session(tmp_path, python3_cases=fail)
    assert done.returncode == 1, done.stdout
    calls = python3_calls(tmp_path)
    assert [call.split()[0] for call in calls] == [
        "pytest", "benchmarks.kernels", "benchmarks.vit", "benchmarks.vit", "benchmarks.train_step"
    ]
    assert "-m gpu" in calls[0] and "--tb=long" in calls[0] and "-x" not in calls[0].split()
    assert "--dtype bfloat16,float32 --sparsity 0.9,0.5 --blocksize 64" in calls[1]
    assert "--dtype bfloat16 --sparsity 0.9 --blocksize 64 --variants eager,compile,sparse" in calls[2]
    assert "--dtype float32 --sparsity 0.8 --blocksize 64 --variants eager,sparse" in calls[3]
    assert "--batch-size 64 --sparsity 0.9 --blocksize 64 --variants dense-compile,sparse" in calls[4]
    first = done.stdout.split("--- the first failure")[1]
    assert "the end of its traceback" in first and "second failure" not in first.split("=== [")[0]
    rows = summary_rows(tmp_path)
    assert list(rows) == ["setup", "tests", "kernels", "vit-bf16", "vit-fp32", "train-step"]
    assert [row[2] for row in rows.values()] == ["ok", "FAILED (exit 1)", "ok", "FAILED (exit 3)", "ok", "ok"]
    assert rows["kernels"][3] == "h100-kernels.md"
    assert rows["vit-bf16"][3] == "none (h100-vit-bf16.md not written)"  # the stand-in died first
    out = tmp_path / "out"
    files = sorted(path.name for path in out.iterdir())
    assert files == sorted(["h100-session.log", "h100-summary.md", "h100-pytest-gpu.txt", "h100-kernels.md",
                            "h100-vit-fp32.md", "h100-train-step.md"])
    # What comes back from the device machine: at most 8 plain files, named in [A-Za-z0-9._-].
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files)
    assert all((out / name).is_file() for name in files)
    assert (out / "h100-pytest-gpu.txt").read_text() == FAKE_PYTEST
    log = (out / "h100-session.log").read_text()
    assert "vit exploded" in log and "NVIDIA H100 80GB HBM3, 550.90" in log and "| train-step |" in log
    assert "NVIDIA H100 80GB HBM3 (sm90); torch 2.11.0" in (out / "h100-summary.md").read_text()
    # Right after the run, on the development machine: one results file, the raw output beside it.
    results = tmp_path / "results"
    made = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"), "report", str(out), str(results)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0 and f"wrote {results / 'h100.md'}" in made.stdout, made.stdout + made.stderr
    assert sorted(path.name for path in results.iterdir()) == ["h100-pytest-gpu.txt", "h100-session.log", "h100.md"]
    report = (results / "h100.md").read_text()
    assert report.startswith((out / "h100-summary.md").read_text())
    for part in ("## Targets (issue 19)", ">= 2.5x dense torch.compile", "## pytest -m gpu", "2 failed, 6 passed",
                 "the end of its traceback"):
        assert part in report, part
    assert report.count("\ntable\n") == 3  # kernels, vit-fp32, train-step (vit-bf16 wrote none)


def test_gpu_session_kills_a_step_at_its_cap_and_runs_the_next(tmp_path):
    """A step that runs long costs only itself: killed at its cap, reported, the next one runs.
    pytest gets SIGINT at its cap (then it still writes the failures so far)."""
    hang = (
        """case "$*" in -m\\ pytest*) trap 'echo summary written on SIGINT; exit 2' INT; sleep 60;; """
        "-m\\ benchmarks.kernels*) sleep 60;; esac\n"
    )
    caps = {"GPU_SESSION_CAP_SETUP": "1", "GPU_SESSION_CAP_TESTS": "1", "GPU_SESSION_CAP_KERNELS": "1",
            "GPU_SESSION_KILL_GRACE": "1"}
    start = time.monotonic()
    done = run_gpu_session(tmp_path, python3_cases=hang, env=caps)
    assert time.monotonic() - start < 30, done.stdout
    assert done.returncode == 124, done.stdout
    rows = summary_rows(tmp_path)
    assert rows["tests"][2] == "TIMED OUT: killed at its cap"
    assert "summary written on SIGINT" in (tmp_path / "out" / "h100-pytest-gpu.txt").read_text()
    assert rows["kernels"][2] == "TIMED OUT: killed at its cap" and int(rows["kernels"][1]) <= 5
    assert [rows[step][2] for step in ("vit-bf16", "vit-fp32", "train-step")] == ["ok"] * 3
    assert [call.split()[0] for call in python3_calls(tmp_path)][-3:] == [
        "benchmarks.vit", "benchmarks.vit", "benchmarks.train_step"
    ]


def test_gpu_session_first_fits_nine_minutes():
    """The caps of `first` (and the last step's kill grace) add up to less than 9 minutes."""
    script = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    caps = dict(re.findall(r"\[([\w-]+)\]=(\d+)", re.search(r"declare -A CAP=\((.*)\)", script).group(1)))
    first = re.search(r'FIRST_STEPS="([^"]*)"', script).group(1).split()
    grace = int(re.search(r"GRACE=\$\{GPU_SESSION_KILL_GRACE:-(\d+)\}", script).group(1))
    assert first == ["tests", "kernels", "vit-bf16", "vit-fp32", "train-step"]
    assert int(caps["setup"]) + sum(int(caps[step]) for step in first) + grace < 9 * 60


def test_gpu_session_fails_when_pytest_fails(tmp_path):
    """pytest exits 1, all else 0."""
    done = run_gpu_session(tmp_path, "quick", python3_cases='case "$*" in -m\\ pytest*) echo "1 failed"; exit 1;; esac\n')
    assert done.returncode == 1, done.stdout
    assert "step tests: FAILED (exit 1)" in done.stdout
    assert (tmp_path / "out" / "h100-pytest-gpu.txt").read_text().strip() == "1 failed"
    assert list(summary_rows(tmp_path)) == ["setup", "tests", "kernels"]


def test_gpu_session_runs_the_steps_it_is_given(tmp_path):
    """Re-running what failed: the steps named, in the order given, at the settings of `first`."""
    done = run_gpu_session(tmp_path, "train-step", "kernels")
    assert done.returncode == 0, done.stdout
    calls = python3_calls(tmp_path)
    assert [call.split()[0] for call in calls] == ["benchmarks.train_step", "benchmarks.kernels"]
    assert "--sparsity 0.9 --blocksize 64" in calls[0]  # issue 10's GPU target row
    wrong = run_gpu_session(tmp_path, "kernel")
    assert wrong.returncode == 2 and "unknown step 'kernel'" in wrong.stderr


def test_gpu_defaults_are_the_seed_setting():
    # The GPU run itself is not tested here (no CUDA in CI); its defaults are.
    cuda = vit.DEFAULTS["cuda"]
    assert (cuda["model"], cuda["batch_size"], cuda["image_size"]) == ("vit_b_16", 256, 224)
    assert cuda["dtype"] == [torch.float32, torch.bfloat16]
    assert (cuda["sparsity"], cuda["blocksize"]) == ([0.8, 0.9], [32, 64])
    assert kernels.DEFAULTS["cuda"]["shapes"] == [(768, 3072), (3072, 768), (768, 2304), (768, 768)]


def train_step_rows_ok(rows, text, masked):
    """The dense rows and the three rows of the ``masked`` model (eager, torch.compile,
    backend="sparse") appear once each and end "ok"; returns them by label."""
    labels = ("dense model, eager", "dense model, torch.compile", f"{masked}, eager", f"{masked}, torch.compile",
              f'{masked}, backend="sparse"')
    found = {}
    for label in labels:
        matching = [row for row in rows if row.startswith(f"| {label} ")]
        assert len(matching) == 1 and matching[0].rstrip(" |").endswith("ok"), (label, text)
        found[label] = matching[0]
    return found


@pytest.mark.parametrize("amp", [False, True])
def test_train_step_runs_every_variant_with_the_attention_masked(capsys, tmp_path, amp):
    # One encoder block, every linear masked (MLP, out_proj and, with the flag, in_proj): the
    # sparse row must say all four run masked, and every row's gradients must match eager; with
    # --amp under bf16 autocast (the seed recipe's flag), the masked op taking fp32 master weights.
    from benchmarks import train_step

    output = tmp_path / "train.md"
    argv = CPU[:2] + [
        "--warmup", "0", "--reps", "1", "--model", "small", "--image-size", "16", "--patch-size", "8",
        "--num-layers", "1", "--hidden-dim", "64", "--mlp-dim", "128", "--num-heads", "2", "--batch-size", "2",
        "--sparsity", "0.9", "--blocksize", "16", "--attention-in-proj", "--output", str(output),
    ] + (["--amp"] if amp else [])
    assert train_step.main(argv) == 0
    assert (", autocast bfloat16" in output.read_text()) == amp
    text = output.read_text()
    rows = table_lines(text, "|")
    train_step_rows_ok(rows, text, "Supermask")
    sparse_row = next(row for row in rows if 'backend="sparse"' in row)
    assert "| 4/4 " in sparse_row, sparse_row
    assert "attention in_proj" in text


def test_train_step_flags_pick_rows_and_autocast():
    from benchmarks import train_step

    args = train_step.parse_args(CPU[:2])
    assert args.variants == list(train_step.VARIANTS) and not args.amp
    args = train_step.parse_args(CPU[:2] + ["--variants", "dense-compile,sparse", "--amp"])
    assert args.variants == ["dense-compile", "sparse"] and args.dtype == [torch.float32]
    with pytest.raises(SystemExit):
        train_step.parse_args(CPU[:2] + ["--amp", "--dtype", "bf16"])
    with pytest.raises(SystemExit):
        train_step.parse_args(CPU[:2] + ["--variants", "eager"])


def test_train_step_runs_only_the_compiled_rows_picked(tmp_path):
    # The GPU session runs backend="sparse" and dense torch.compile only (each compile of ViT-B's
    # forward and backward costs tens of seconds); the eager rows stay as gradient references.
    from benchmarks import train_step

    output = tmp_path / "train.md"
    argv = CPU[:2] + [
        "--warmup", "0", "--reps", "1", "--model", "small", "--image-size", "16", "--patch-size", "8",
        "--num-layers", "1", "--hidden-dim", "64", "--mlp-dim", "128", "--num-heads", "2", "--batch-size", "2",
        "--sparsity", "0.9", "--blocksize", "16", "--variants", "sparse", "--output", str(output),
    ]
    assert train_step.main(argv) == 0
    rows = table_lines(output.read_text(), "|")
    labels = [row.split("|")[1].strip() for row in rows[2:]]
    assert labels == ["dense model, eager", "Supermask, eager", 'Supermask, backend="sparse"'], rows
    sparse = [cell.strip() for cell in rows[-1].strip(" |").split("|")]
    assert sparse[train_step.HEADERS.index("vs eager")].endswith("x") and sparse[-1] == "ok", rows[-1]
    assert sparse[train_step.HEADERS.index("vs inductor")] == "-"


def test_train_step_bimask_rows(tmp_path):
    # Issue 20's rows: Bi-Mask 2:4 bidirectional eager, torch.compile and backend="sparse" against
    # the dense model; --no-supermask leaves the Supermask rows out. Gradients must match eager.
    from benchmarks import train_step

    output = tmp_path / "train.md"
    argv = CPU[:2] + [
        "--warmup", "0", "--reps", "1", "--model", "small", "--image-size", "16", "--patch-size", "8",
        "--num-layers", "1", "--hidden-dim", "64", "--mlp-dim", "128", "--num-heads", "2", "--batch-size", "2",
        "--bimask", "2:4", "--no-supermask", "--attention-in-proj", "--output", str(output),
    ]
    assert train_step.main(argv) == 0
    text = output.read_text()
    rows = table_lines(text, "|")
    for label, row in train_step_rows_ok(rows, text, "Bi-Mask 2:4").items():
        if label.startswith("Bi-Mask"):
            assert "| 2:4 " in row and "| 50% " in row, row
    assert not any(row.startswith("| Supermask") for row in rows)
    assert "Bi-Mask rows: bidirectional N:M" in text


# benchmarks/export.py: a sparse AOTInductor package against backend="sparse" and a dense package.
TINY_EXPORT = [
    "--image-size", "32", "--patch-size", "16", "--num-layers", "1", "--hidden-dim", "64", "--mlp-dim", "128",
    "--num-heads", "2", "--batch-size", "2", "--sparsity", "0.75", "--blocksize", "32", "--warmup", "0",
    "--reps", "2", "--load-runs", "1",
]


def test_export_benchmark_runs_every_row_and_loads_in_a_fresh_process(capsys, tmp_path):
    from benchmarks import export as export_bench

    output = tmp_path / "export.md"
    code = export_bench.main(TINY_EXPORT + ["--work-dir", str(tmp_path / "work"), "--output", str(output)])
    text = capsys.readouterr().out
    assert code == 0, text
    for header in export_bench.HEADERS:
        assert header in text
    rows = {line.split("  ")[0]: line for line in text.splitlines() if "  " in line}
    for label in (export_bench.PACKAGE, export_bench.BACKEND, export_bench.DENSE_PACKAGE):
        assert rows[label].rstrip().endswith("ok"), rows[label]
    # The package converted some layer (the encoder's 4 linears are 75% pruned): the sparse path is in it.
    assert not rows[export_bench.PACKAGE].split()[3].startswith("0/"), rows[export_bench.PACKAGE]
    assert "nothing compiled" in text and "load + first call" in text
    verdict = text.strip().splitlines()[-1]
    assert verdict.startswith("verdict: ok;") and "the dense package" in verdict, verdict
    assert "python -m benchmarks.export" in output.read_text()


def test_export_benchmark_fails_when_the_package_fails(capsys, monkeypatch, tmp_path):
    from benchmarks import export as export_bench

    def broken(*args):
        raise RuntimeError("no package today")

    def eager(model, x, args, work_dir):
        return (lambda: model(x)), "-"

    monkeypatch.setattr(export_bench, "build_sparse_package", broken)
    monkeypatch.setattr(export_bench, "build_backend", eager)
    monkeypatch.setattr(export_bench, "build_dense_package", eager)
    assert export_bench.main(TINY_EXPORT + ["--work-dir", str(tmp_path)]) == 1
    text = capsys.readouterr().out
    assert "RuntimeError: no package today" in text and "FAILED" in text.strip().splitlines()[-1]


def test_gpu_session_export_cuda_step_runs_the_cuda_package_round_trip(tmp_path):
    """Issue 22's CUDA package round trip is a step of its own (an AOTInductor CUDA compile does
    not fit the tests step's minutes), run by name, not in `first`."""
    done = run_gpu_session(tmp_path, "export-cuda")
    assert done.returncode == 0, done.stdout
    calls = python3_calls(tmp_path)
    assert [call.split()[0] for call in calls] == ["benchmarks.export_cuda"]
    assert "--dtype float16 --sparsity 0.9 --blocksize 64" in calls[0]
    assert summary_rows(tmp_path)["export-cuda"][2:] == ["ok", "h100-export-cuda.md"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a GPU")
def test_export_cuda_says_it_needs_a_gpu(capsys):
    from benchmarks import export_cuda

    assert export_cuda.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out
