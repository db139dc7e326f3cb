"""The whole-graph check (issue 21, item 2): the rewritten graph is timed against the graph as
Inductor alone compiles it, and kept only when it wins beyond the noise.

A stand-in graph timer (``sparse_compile.measure.graph_timer``) decides; nothing here depends on
how fast this machine is. The per-layer timer is the suite's modelled one (tests/conftest.py):
ThreeLinears' two pruned layers run BSR, the third stays dense (untimed: it has no empty block);
dense takes 1 ms a layer, so the plain graph's dense floor (its timed linear layers' dense times,
summed) is DENSE_FLOOR_MS. Where the timed comparison is under test, the stand-in's rewritten
graph takes no less than the floor (so the floor shortcut cannot decide) and its plain graph no
less than the floor, as a real one.
"""

import math

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import sparse_compile
from sparse_compile import measure
from sparse_compile.pruning import prune_blocks_

from compile_helpers import TileKernelCalls, compile_and_run, float64_reference


pytestmark = pytest.mark.usefixtures("fresh_compiler", "fresh_counters")


@pytest.fixture
def fresh_counters():
    counters["sparse_compile"].clear()
    yield


class ThreeLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 96), nn.Linear(96, 80), nn.Linear(80, 48)
        with torch.no_grad():
            prune_blocks_(self.a.weight, 0.8, 16)
            prune_blocks_(self.b.weight, 0.8, 16)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


#: ThreeLinears' dense floor under the modelled timer: its two timed linear layers, 1 ms each.
DENSE_FLOOR_MS = 2.0


class GraphTimer:
    """Every call of the rewritten graph takes ``sparse_ms``, of the plain graph ``dense_ms``.

    ``comparisons`` counts the timed comparisons of both graphs, ``alone`` the rewritten graph
    timed alone (the floor shortcut)."""

    def __init__(self, sparse_ms, dense_ms, calls=5):
        self.sparse_ms, self.dense_ms, self.n = sparse_ms, dense_ms, calls
        self.comparisons = self.alone = 0

    def __call__(self, fns, device):
        if len(fns) == 1:
            self.alone += 1
        else:
            self.comparisons += 1
        for fn in fns:  # the real timer runs them: so does the stand-in, so a broken graph fails here
            fn()
        return [[self.sparse_ms] * self.n, [self.dense_ms] * self.n][: len(fns)]

    @property
    def calls(self):
        return self.comparisons + self.alone


@pytest.fixture
def sparse_calls():
    """Calls of the CPU tile kernel's op (what a converted layer runs) from now on."""
    return TileKernelCalls()


def test_slower_whole_graph_falls_back_to_dense(monkeypatch, sparse_calls):
    timer = GraphTimer(sparse_ms=4.40, dense_ms=3.42)
    monkeypatch.setattr(measure, "graph_timer", timer)
    model, x = ThreeLinears().eval(), torch.randn(2, 24, 64)
    compiled, out = compile_and_run(model, x)
    assert timer.comparisons == 1 and timer.alone == 1
    report = sparse_compile.report(compiled)
    text = str(report)
    assert "kept dense: the whole graph measured 0.78x with 2 of 3 linear layers run as BSR" in text
    assert "4.4 ms vs 3.42 ms for Inductor alone (medians), measured" in text
    assert [layer.format for layer in report.layers] == ["dense"] * 3
    assert all(layer.reason.startswith("whole graph measured 0.78x") for layer in report.layers[:2])
    assert "per layer bsr measured" in report.layers[0].reason
    stats = counters["sparse_compile"]
    assert stats["graphs_kept_dense"] == 1 and stats["graph_checks"] == 1
    assert stats["bsr_layers"] == 0 and stats["bsr_weights"] == 0 and stats["dense_whole_graph_slower"] == 2
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)
    # What runs now is the plain graph: no call of the sparse op.
    before = len(sparse_calls)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)
    assert len(sparse_calls) == before


def test_faster_whole_graph_keeps_the_rewrite(monkeypatch, sparse_calls):
    timer = GraphTimer(sparse_ms=3.0, dense_ms=4.5)
    monkeypatch.setattr(measure, "graph_timer", timer)
    model, x = ThreeLinears().eval(), torch.randn(2, 24, 64)
    compiled, out = compile_and_run(model, x)
    text = str(sparse_compile.report(compiled))
    assert timer.comparisons == 1
    assert "2 of 3 linear layers run as BSR" in text
    assert "whole graph 1.50x over Inductor alone (3 ms vs 4.5 ms for Inductor alone (medians), measured, needed 3% faster)" in text
    stats = counters["sparse_compile"]
    assert stats["graphs_kept_sparse"] == 1 and stats["bsr_layers"] == 2
    before = len(sparse_calls)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)
    assert len(sparse_calls) == before + 2


def test_a_rewrite_far_below_the_dense_floor_is_kept_without_the_plain_compile(monkeypatch, sparse_calls):
    # The plain graph runs the two pruned linears dense: it takes at least their 2 ms. A rewritten
    # graph of 1 ms is below that by more than the margin: the plain graph need not be compiled to know.
    plain_compiles = []
    compile_timed = measure._compile_timed
    monkeypatch.setattr(
        measure, "_compile_timed", lambda compile_dense: plain_compiles.append(1) or compile_timed(compile_dense)
    )
    timer = GraphTimer(sparse_ms=1.0, dense_ms=math.nan)  # the plain graph is never timed
    monkeypatch.setattr(measure, "graph_timer", timer)
    model, x = ThreeLinears().eval(), torch.randn(2, 24, 64)
    below_before = measure.spent.graphs_below_floor
    compiled, out = compile_and_run(model, x)
    assert timer.alone == 1 and timer.comparisons == 0 and plain_compiles == []
    assert measure.spent.graphs_below_floor == below_before + 1
    report = sparse_compile.report(compiled)
    assert [layer.dense_floor_ms for layer in report.layers] == [1.0, 1.0, None]
    text = str(report)
    assert "2 of 3 linear layers run as BSR" in text
    assert (
        "whole graph at least 2.00x over Inductor alone (1 ms (median) vs 2 ms that its linear layers alone "
        "take dense (per layer), measured; the plain graph not compiled)"
    ) in text
    stats = counters["sparse_compile"]
    assert stats["graphs_kept_sparse"] == 1 and stats["graph_checks"] == 1 and stats["bsr_layers"] == 2
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)
    before = len(sparse_calls)
    with torch.no_grad():
        compiled(x)
    assert len(sparse_calls) == before + 2
    # A new process reads the verdict from the file: nothing timed, nothing compiled.
    measure.forget_loaded_caches()
    torch._dynamo.reset()
    sparse_compile.clear_reports()
    compiled, _ = compile_and_run(model, x)
    assert timer.alone == 1 and plain_compiles == []
    assert "vs 2 ms that its linear layers alone take dense (per layer), cached; the plain graph not compiled" in str(
        sparse_compile.report(compiled)
    )


def test_a_rewrite_within_the_margin_of_the_floor_is_timed_against_the_plain_graph(monkeypatch):
    # Just above floor / margin: the per-layer floor alone cannot tell, so both graphs are timed.
    timer = GraphTimer(sparse_ms=DENSE_FLOOR_MS / measure.GRAPH_FLOOR_MARGIN * 1.01, dense_ms=2.5)
    monkeypatch.setattr(measure, "graph_timer", timer)
    compiled, _ = compile_and_run(ThreeLinears().eval(), torch.randn(2, 24, 64))
    assert timer.alone == 1 and timer.comparisons == 1
    assert "for Inductor alone (medians), measured" in str(sparse_compile.report(compiled))


def test_the_dense_floor_counts_linear_layers_with_a_known_floor():
    from sparse_compile import backend
    from sparse_compile.report import GraphReport, LayerRecord

    def layer(floor, **kw):
        return LayerRecord("l", 8, 8, "float32", "bsr", 32, 0.1, dense_ms=9.0, dense_floor_ms=floor, **kw)

    report = GraphReport(0, [
        layer(2.0), layer(0.5), layer(None),  # a linear without known rows adds nothing
        layer(5.0, kind="conv1x1"),  # the plain graph runs it as oneDNN's convolution
        layer(7.0, fused_op="aten._native_multi_head_attention"),  # inside PyTorch's fused op
    ])
    assert backend._dense_floor_ms(report) == pytest.approx(2.5)


def test_the_real_graph_timer_times_one_graph_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(measure, "_seconds", lambda fn: fn() or 1e-3)
    samples = measure.time_graphs([lambda: calls.append(1)], torch.device("cpu"))
    assert samples == [[1.0] * measure.GRAPH_ALONE_CALLS]
    assert len(calls) == measure.GRAPH_WARMUP + measure.GRAPH_ALONE_CALLS


@pytest.mark.parametrize("sparse_ms", [3.3, 3.366, 3.234])
def test_a_win_within_the_band_is_dense(monkeypatch, sparse_ms):
    # 2% faster is within the 3% minimum gain: dense; so is a tie, or slower.
    monkeypatch.setattr(measure, "graph_timer", GraphTimer(sparse_ms=sparse_ms, dense_ms=3.3))
    compiled, _ = compile_and_run(ThreeLinears().eval(), torch.randn(4, 64))
    assert counters["sparse_compile"]["graphs_kept_dense"] == 1
    assert "kept dense" in str(sparse_compile.report(compiled))


def test_spread_widens_the_band():
    quiet = measure.judge([0.95] * 8, [1.0] * 8)
    noisy = measure.judge([0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3], [1.0] * 8)  # median 0.95 too
    assert quiet.keep and quiet.band == measure.GRAPH_MIN_GAIN and quiet.speedup == pytest.approx(1 / 0.95)
    assert not noisy.keep and noisy.spread == pytest.approx((1.125 - 0.775) / 2)


def test_rounds_are_compared_pairwise():
    # Load moved both graphs alike from round to round: the rewrite is 20% faster in every round.
    dense = [1.0, 3.0, 1.5, 5.0, 1.2]
    verdict = measure.judge([0.8 * d for d in dense], dense)
    assert verdict.keep and verdict.ratio == pytest.approx(0.8) and verdict.spread == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("verdict", ["dense", "sparse"])
def test_second_compile_reuses_the_verdict(monkeypatch, verdict):
    timer = GraphTimer(sparse_ms=4.0 if verdict == "dense" else 3.0, dense_ms=3.5)
    monkeypatch.setattr(measure, "graph_timer", timer)
    model, x = ThreeLinears().eval(), torch.randn(2, 64)
    compile_and_run(model, x)
    measure.forget_loaded_caches()  # a new process: the verdict comes from the file
    torch._dynamo.reset()
    sparse_compile.clear_reports()
    counters["sparse_compile"].clear()
    compiled, out = compile_and_run(model, x)
    assert timer.comparisons == 1 and timer.alone == 1, "the second compile timed the graph again"
    text = str(sparse_compile.report(compiled))
    assert "for Inductor alone (medians), cached" in text
    assert counters["sparse_compile"]["graph_checks_cached"] == 1
    assert counters["sparse_compile"]["bsr_layers"] == (0 if verdict == "dense" else 2)
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)


def test_option_off_means_no_check(monkeypatch):
    timer = GraphTimer(sparse_ms=5.0, dense_ms=1.0)
    monkeypatch.setattr(measure, "graph_timer", timer)
    compiled, _ = compile_and_run(ThreeLinears().eval(), torch.randn(2, 64), {"check_graph": False})
    assert timer.calls == 0
    assert counters["sparse_compile"]["graph_checks_off"] == 1 and counters["sparse_compile"]["bsr_layers"] == 2
    assert "whole graph" not in str(sparse_compile.report(compiled))


def test_numeric_threshold_checks_nothing(monkeypatch):
    timer = GraphTimer(sparse_ms=5.0, dense_ms=1.0)
    monkeypatch.setattr(measure, "graph_timer", timer)
    compile_and_run(ThreeLinears().eval(), torch.randn(2, 64), {"density_threshold": 0.5})
    assert timer.calls == 0 and counters["sparse_compile"]["bsr_layers"] == 2


def test_graph_writing_its_inputs_is_not_run_again(monkeypatch):
    # BatchNorm in train mode under no_grad updates its statistics: timing would update them again.
    timer = GraphTimer(sparse_ms=5.0, dense_ms=1.0)
    monkeypatch.setattr(measure, "graph_timer", timer)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 64))
    prune_blocks_(model[3].weight.data, 0.9, 16)
    compiled, _ = compile_and_run(model, torch.randn(4, 3, 8, 8))
    assert timer.calls == 0 and int(model[1].num_batches_tracked) == 1
    assert "whole-graph check skipped: the graph writes to its inputs" in str(sparse_compile.report(compiled))
    assert counters["sparse_compile"]["graph_checks_skipped"] == 1


def test_graph_timer_runs_round_robin_and_stops_early_when_clear(monkeypatch):
    monkeypatch.setattr(measure, "GRAPH_BUDGET_S", 0.0)
    calls = []
    fns = [lambda: calls.append("sparse"), lambda: calls.append("dense")]
    # Each timed call "takes" 1 ms for the rewrite and 2 ms for the plain graph: a clear win.
    monkeypatch.setattr(measure, "_seconds", lambda fn: fn() or {"sparse": 1e-3, "dense": 2e-3}[calls[-1]])
    samples = measure.time_graphs(fns, torch.device("cpu"))
    assert [len(s) for s in samples] == [measure.GRAPH_CLEAR_ROUNDS] * 2
    assert calls[:2] == ["sparse", "dense"] * measure.GRAPH_WARMUP and calls[-2:] == ["sparse", "dense"]
    # Not clear (a tie): at least GRAPH_MIN_ROUNDS rounds.
    calls.clear()
    monkeypatch.setattr(measure, "_seconds", lambda fn: fn() or 1e-3)
    samples = measure.time_graphs(fns, torch.device("cpu"))
    assert [len(s) for s in samples] == [measure.GRAPH_MIN_ROUNDS] * 2


def test_no_check_after_inductor_failed(monkeypatch):
    # The plain compile would fail the same way: the check is skipped, the report says why.
    from torch._inductor.graph import GraphLowering

    from sparse_compile import backend

    def fail(*args, **kwargs):
        raise RuntimeError("Inductor failed (stand-in)")

    monkeypatch.setattr(GraphLowering, "compile_to_module", fail)
    monkeypatch.setattr(backend, "_warned", set())  # it warns once per process
    timer = GraphTimer(sparse_ms=5.0, dense_ms=1.0)
    monkeypatch.setattr(measure, "graph_timer", timer)
    model, x = ThreeLinears().eval(), torch.randn(2, 64)
    with pytest.warns(RuntimeWarning):
        compiled, out = compile_and_run(model, x)
    assert timer.calls == 0 and counters["sparse_compile"]["bsr_layers"] == 2
    assert "whole-graph check skipped: Inductor could not compile this graph" in str(sparse_compile.report(compiled))
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)
