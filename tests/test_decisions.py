"""Decisions as data: each dense decision carries a reason code with its text, and the code (not
the text) is what the counters count; the kernel a layer runs is named once, in its record."""

import pathlib
import types

import pytest
import torch
from torch._dynamo.utils import counters

from sparse_compile import backend, measure
from sparse_compile.analysis import decide
from sparse_compile.formats.base import Reason, ReasonCode, combine_reasons
from sparse_compile.formats.bsr import BSR
from sparse_compile.options import SparseOptions
from sparse_compile.pruning import prune_blocks_
from sparse_compile.report import DENSE_KERNEL, CompileReport, GraphReport, LayerRecord

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "inference.md"  # the counters table


def block_sparse(rows=64, cols=64, sparsity=0.5, b=16):
    weight = torch.randn(rows, cols)
    prune_blocks_(weight, sparsity, b)
    return weight


def fixed_timer(dense_ms, sparse_ms):
    def timer(requests):
        return [dense_ms if r.candidate.kind == "dense" else sparse_ms for r in requests]

    return timer


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(measure.CACHE_ENV, str(tmp_path))
    measure.forget_loaded_caches()
    yield
    measure.forget_loaded_caches()


def test_unsupported_dtype():
    decision = decide(block_sparse().double(), SparseOptions())
    assert decision.reason_code is ReasonCode.UNSUPPORTED_DTYPE and "float64" in decision.reason


def test_above_threshold():
    decision = decide(block_sparse(sparsity=0.5), SparseOptions(blocksize=16, density_threshold=0.1))
    assert decision.reason_code is ReasonCode.ABOVE_THRESHOLD and "threshold 0.10" in decision.reason


def test_no_block_to_skip_times_nothing(monkeypatch, fresh_cache):
    monkeypatch.setattr(measure, "timer", lambda requests: pytest.fail("nothing should be timed"))
    decision = decide(torch.randn(64, 64), SparseOptions(blocksize=16, formats=("bsr",)))
    assert decision.reason_code is ReasonCode.NO_BLOCK_TO_SKIP and "no block to skip" in decision.reason


def test_measured_faster(monkeypatch, fresh_cache):
    monkeypatch.setattr(measure, "timer", fixed_timer(dense_ms=1.0, sparse_ms=2.0))
    decision = decide(block_sparse(), SparseOptions(blocksize=16, formats=("bsr",)))
    assert decision.reason_code is ReasonCode.MEASURED_FASTER and decision.reason.startswith("dense measured faster")


def test_not_2_4():
    decision = decide(torch.randn(64, 64), SparseOptions(formats=("2:4",), density_threshold=0.5))
    assert decision.reason_code is ReasonCode.NOT_2_4 and decision.reason.startswith("not 2:4")


def test_no_kernel_for_device(monkeypatch):
    monkeypatch.setattr(BSR, "unavailable_reason", lambda device: "no Triton kernel: install triton")
    decision = decide(block_sparse(), SparseOptions(formats=("bsr",), density_threshold=0.5))
    assert decision.reason_code is ReasonCode.NO_KERNEL_FOR_DEVICE and "install triton" in decision.reason


def test_sparse_decision_has_no_code_and_names_its_kernel():
    decision = decide(block_sparse(sparsity=0.75), SparseOptions(blocksize=16, density_threshold=0.5))
    assert decision.is_sparse and decision.reason_code is None and decision.reason == ""
    assert decision.kernel == BSR.kernel("cpu", torch.float32)


def test_combined_reason_keeps_every_text_and_the_first_code_in_enum_order():
    # One reason per format: what was measured outranks a format that had no kernel.
    reasons = [
        Reason(ReasonCode.MEASURED_FASTER, "dense measured faster"),
        Reason(ReasonCode.NO_KERNEL_FOR_DEVICE, "no 2:4 kernel"),
        None,
        Reason(ReasonCode.NOT_2_4, "not 2:4: row 3"),
    ]
    combined = combine_reasons(reasons)
    assert combined.code is ReasonCode.MEASURED_FASTER
    assert combined.text == "dense measured faster; no 2:4 kernel; not 2:4: row 3"
    assert combine_reasons([reasons[3], reasons[1]]).code is ReasonCode.NO_KERNEL_FOR_DEVICE
    assert combine_reasons([None]) is None


def record(name, code: ReasonCode | None, kernel=DENSE_KERNEL):
    return LayerRecord(
        name=name, out_features=64, in_features=64, dtype="float32", format="dense" if code else "bsr",
        blocksize=16, density=0.5, reason=f"{name} because" if code else "", reason_code=code, kernel=kernel,
    )


def test_codes_round_trip_into_the_counters_and_the_report():
    counters.clear()
    layers = [record(f"layer{i}", code) for i, code in enumerate(ReasonCode)]
    layers.append(record("sparse_layer", None, kernel="tile kernel (cpu)"))
    graph = GraphReport(graph_id=0, layers=layers)
    backend._log_and_count(graph, types.SimpleNamespace(formats=[BSR], weights_converted={"bsr": 1}))
    stats = counters["sparse_compile"]
    assert stats["dense_layers"] == len(ReasonCode) and stats["bsr_layers"] == 1
    for code in ReasonCode:
        assert stats[f"dense_{code.value}"] == 1, code
    text = str(CompileReport([graph]))
    for layer in layers:
        row = next(line for line in text.splitlines() if line.startswith(layer.name + " "))
        assert layer.kernel in row and layer.reason in row


def test_a_record_without_a_code_counts_as_other():
    counters.clear()
    graph = GraphReport(graph_id=0, layers=[LayerRecord("a", 8, 8, "float32", "dense", None, None, reason="?")])
    backend._log_and_count(graph, types.SimpleNamespace(formats=[], weights_converted={}))
    assert counters["sparse_compile"]["dense_other"] == 1


def test_docs_list_every_counted_code():
    text = DOCS.read_text()
    for code in ReasonCode:
        if code is not ReasonCode.NOT_TILE_MASKED:  # training graphs: recorded, not counted
            assert f"`dense_{code.value}`" in text, code
