"""2:4 semi-structured: the analysis rule, the compression, the op (CPU reference; CUDA kernels
in the ``gpu`` tests), against hand-written checks and float64 references on random data."""

import pytest
import torch

from sparse_compile import formats
from sparse_compile.analysis import decide
from sparse_compile.formats.semi_structured import SEMI_STRUCTURED, incompatibility
from sparse_compile.kernels import semi_structured as kernels
from sparse_compile.options import SparseOptions
from sparse_compile.training.nm_mask import nm_mask

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (8e-2, 5e-2)}
#: Numeric threshold: no timing; an N:M weight's block density is 1, so BSR never takes it.
THRESHOLD = SparseOptions(density_threshold=0.5)


def nm_weight(rows, cols, n, m, dtype=torch.float32, device="cpu"):
    """randn (never exact zeros) with the N largest |w| of every M consecutive inputs kept."""
    weight = torch.randn(rows, cols, device=device)
    return (weight * nm_mask(weight, n, m)).to(dtype)


def groups_by_hand(weight):
    """Max nonzeros over every group of 4 consecutive inputs of every row, by loops."""
    worst = 0
    for row in weight.tolist():
        for start in range(0, len(row), 4):
            worst = max(worst, sum(value != 0 for value in row[start : start + 4]))
    return worst


# --- analysis ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (2, 8), (1, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nm_weights_are_2_4(n, m, dtype):
    weight = nm_weight(64, 128, n, m, dtype)
    assert groups_by_hand(weight) <= 2 and incompatibility(weight) == ""
    decision = decide(weight, THRESHOLD)
    assert decision.format == "2:4" and decision.kernel == "reference (cpu)", decision
    assert decision.reason == ""


def test_4_8_with_three_nonzeros_in_a_group_is_rejected():
    # A valid 4:8 weight (4 nonzeros in every 8 inputs) whose row 5, inputs 8..15, keeps 3 in
    # the first half and 1 in the second; every other group of 4 holds 2.
    weight = nm_weight(64, 128, 2, 4)
    weight[5, 8:16] = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 4.0])
    assert weight.ne(0).view(64, 16, 8).sum(-1).max() == 4 and groups_by_hand(weight) == 3
    decision = decide(weight, THRESHOLD)
    assert decision.format == "dense"
    assert "not 2:4: inputs 8-11 of row 5 hold 3 nonzeros (at most 2 in every 4)" in decision.reason


def test_4_8_with_two_per_half_is_accepted():
    # 4:8 whose kept entries fall 2 and 2 in the halves of each group of 8: 2:4 as well.
    weight = nm_weight(64, 128, 2, 4)
    assert decide(weight, THRESHOLD).format == "2:4"


def test_random_dense_weight_is_rejected_with_both_reasons():
    decision = decide(torch.randn(64, 128), THRESHOLD)
    assert decision.format == "dense"
    assert decision.reason.startswith("block density 1.00 > threshold 0.50")
    assert "not 2:4: inputs 0-3 of row 0 hold 4 nonzeros" in decision.reason


@pytest.mark.parametrize(
    "shape, words",
    [
        ((64, 30), "in_features 30 is not a multiple of 4"),
        ((64, 96), "64x96 is not a multiple of 32x64"),  # 2:4 pattern, but not the layout's multiple
        ((48, 128), "48x128 is not a multiple of 32x64"),
    ],
)
def test_shapes_the_layout_cannot_take_stay_dense(shape, words):
    weight = torch.randn(shape)
    if shape[1] % 4 == 0:
        weight = weight * nm_mask(weight, 2, 4)
    decision = decide(weight, THRESHOLD)
    assert decision.format == "dense" and words in decision.reason, decision.reason


def test_unsupported_dtype_stays_dense():
    decision = decide(nm_weight(64, 128, 2, 4).double(), THRESHOLD)
    assert decision.format == "dense" and "float64 has no sparse kernel" in decision.reason


def test_bsr_is_preferred_under_a_threshold_when_blocks_are_empty():
    # 2:4 and mostly empty 32-blocks: both formats take it, BSR first (it skips more).
    weight = nm_weight(128, 128, 2, 4)
    weight[:, 32:] = 0
    assert decide(weight, SparseOptions(blocksize=32, density_threshold=0.5)).format == "bsr"


def test_auto_times_2_4_against_dense_and_bsr():
    # Modelled timer (conftest): dense 1 ms, 2:4 0.6 ms, BSR 2 x density.
    decision = decide(nm_weight(64, 128, 2, 4), SparseOptions())
    assert decision.format == "2:4" and decision.time_ms == 0.6 and decision.dense_ms == 1.0
    assert ("2:4", 0.6) in decision.timings


def test_auto_keeps_dense_when_2_4_is_slower(monkeypatch):
    from sparse_compile import measure

    monkeypatch.setattr(measure, "timer", lambda requests: [1.0 if r.candidate.kind == "dense" else 1.5 for r in requests])
    decision = decide(nm_weight(64, 128, 2, 4), SparseOptions())
    assert decision.format == "dense"
    assert decision.reason.startswith("dense measured faster: 1 ms vs 1.5 ms for 2:4")
    assert "no block to skip" in decision.reason


def test_formats_option_switches_2_4_off():
    weight = nm_weight(64, 128, 2, 4)
    decision = decide(weight, SparseOptions(density_threshold=0.5, formats=["bsr"]))
    assert decision.format == "dense" and "2:4" not in decision.reason
    assert decide(weight, SparseOptions(density_threshold=0.5, formats=("2:4",))).format == "2:4"
    with pytest.raises(ValueError, match=r"unknown format\(s\) \['2:8'\]; valid formats are \['bsr', '2:4'\]"):
        SparseOptions(formats=("2:8",))


def test_one_source_of_truth_for_dtypes():
    assert SEMI_STRUCTURED.dtypes is kernels.SUPPORTED_DTYPES
    assert set(formats.supported_dtypes()) == {torch.float32, torch.float16, torch.bfloat16}


# --- compression ------------------------------------------------------------------------------


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (2, 8), (1, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(32, 64), (96, 128), (64, 320)])
def test_compression_round_trips(n, m, dtype, shape):
    weight = nm_weight(*shape, n, m, dtype)
    values, meta = kernels.compress_cutlass(weight)
    assert values.shape == (shape[0], shape[1] // 2) and values.dtype == dtype
    assert meta.shape == (shape[0], shape[1] // 16) and meta.dtype == torch.int16
    assert torch.equal(kernels.decompress_cutlass(values, meta), weight)
    # Every nonzero is stored once; the free slots of sparser groups hold zeros.
    assert torch.equal(values.ne(0).sum(), weight.ne(0).sum())


def test_fp16_constants_are_torchs_own_cutlass_layout():
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    weight = nm_weight(64, 128, 2, 4, torch.float16)
    ours = kernels.compress_cutlass(weight)
    theirs = sparse_semi_structured_from_dense_cutlass(weight)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    # float32 uses fp16's metadata for its 2:4 pattern.
    values32, meta32 = kernels.compress_cutlass(weight.float())
    assert torch.equal(meta32, theirs[1]) and torch.equal(values32, theirs[0].float())


# --- the op on CPU ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape", [(5, 128), (2, 7, 128), (1, 128), (0, 128)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_op_matches_float64(dtype, x_shape, with_bias):
    weight = nm_weight(64, 128, 2, 4, dtype)
    bias = torch.randn(64).to(dtype) if with_bias else None
    x = torch.randn(x_shape).to(dtype)
    values, meta = kernels.compress(weight, "cutlass")
    out = kernels.semi_structured_linear(x, values, meta, bias, 64, "cutlass")
    expected = x.double() @ weight.double().t() + (bias.double() if with_bias else 0)
    assert out.shape == (*x_shape[:-1], 64) and out.dtype == dtype
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)


def test_op_checks_its_inputs():
    values, meta = kernels.compress(nm_weight(64, 128, 2, 4), "cutlass")
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 128\]"):
        torch.ops.sparse_compile.semi_structured_linear(torch.randn(3, 64), values, meta, None, 64, 128, "cutlass")
    with pytest.raises(TypeError, match="share one dtype"):
        kernels.semi_structured_linear(torch.randn(3, 128).half(), values, meta, None, 64, "cutlass")
    with pytest.raises(ValueError, match="kernel must be one of"):
        torch.ops.sparse_compile.semi_structured_linear(torch.randn(3, 128), values, meta, None, 64, 128, "cublas")
    with pytest.raises(RuntimeError, match="opaque outside CUDA"):
        torch.ops.sparse_compile.semi_structured_linear(torch.randn(3, 128), values, None, None, 64, 128, "cusparselt")


def test_op_has_a_fake_implementation():
    values, meta = kernels.compress(nm_weight(64, 128, 2, 4), "cutlass")
    torch.library.opcheck(
        torch.ops.sparse_compile.semi_structured_linear.default,
        (torch.randn(3, 5, 128), values, meta, torch.randn(64), 64, 128, "cutlass"),
    )


# --- CUDA: torch's kernels (run by benchmarks/gpu_session.sh) ---------------------------------


def _cuda_kernels():
    return kernels.cuda_kernels()


# Shapes the kernels constrain: ViT-B's MLP and attention, the smallest multiples, ragged rows.
GPU_SHAPES = [(3072, 768, 197), (768, 3072, 5), (2304, 768, 256), (64, 128, 1), (32, 64, 13)]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["cusparselt", "cutlass"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_features, in_features, rows", GPU_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_cuda_kernel_matches_float64(kernel, dtype, out_features, in_features, rows, with_bias):
    if kernel not in _cuda_kernels():
        pytest.skip(f"torch has no {kernel} 2:4 kernel on this GPU ({torch.cuda.get_device_name()})")
    weight = nm_weight(out_features, in_features, 2, 4, dtype, "cuda")
    bias = torch.randn(out_features, device="cuda").to(dtype) if with_bias else None
    x = torch.randn(rows, in_features, device="cuda").to(dtype)
    values, meta = kernels.compress(weight, kernel)
    out = kernels.semi_structured_linear(x, values, meta, bias, out_features, kernel)
    expected = x.double() @ weight.double().t() + (bias.double() if with_bias else 0)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), expected, atol=atol * 4, rtol=rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_backend_runs_2_4(dtype):
    """An N:M model on the GPU, compiled: its linears run on torch's 2:4 kernel, output as eager."""
    import copy

    import sparse_compile

    if not _cuda_kernels():
        pytest.skip(f"torch has no 2:4 kernel on this GPU ({torch.cuda.get_device_name()})")
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(nm_mask(layer.weight, 2, 4))
    model = model.to("cuda", dtype).eval()
    x = torch.randn(4, 33, 256, device="cuda", dtype=dtype)
    compiled = torch.compile(model, backend="sparse", options={"density_threshold": 0.5})
    with torch.no_grad():
        out = compiled(x)
        expected = copy.deepcopy(model).double()(x.double())
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), expected, atol=atol * 4, rtol=rtol)
    layers = sparse_compile.report(compiled).layers
    assert [layer.format for layer in layers] == ["2:4", "2:4"], layers
    assert layers[0].kernel == _cuda_kernels()[0]
