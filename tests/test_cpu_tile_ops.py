"""The CPU tile kernel's torch operators (``kernels/cpu_tile_ops.cpp``): ``tile_linear`` on tiles
packed once (``tile_pack_blocks``), the op a converted layer of a compiled CPU graph calls without
Python. Against float64 references of ``x @ W^T + bias``; shapes, dtypes, packed layouts the host
can run, errors that name the problem, the op's fake implementation (``opcheck``), and the
backend's graph calling it (its call counter).
"""

import pytest
import torch
from torch import nn

import sparse_compile
from sparse_compile.kernels import BsrWeight, cpu_tile_mm

from compile_helpers import TileKernelCalls, float64_reference

pytestmark = pytest.mark.skipif(
    cpu_tile_mm.unavailable_reason() is not None, reason="no C++ compiler for the CPU tile kernel"
)

tile_linear = torch.ops.sparse_compile.tile_linear.default if cpu_tile_mm.unavailable_reason() is None else None

# Packed layouts this host runs: fp32 always, bf16 pairs where the CPU has bf16 dot products.
FORMATS = [0] + ([1] if cpu_tile_mm.unavailable_reason() is None and cpu_tile_mm.native_bfloat16() else [])


def block_sparse(n, k, t, density, dtype=torch.float32):
    keep = torch.rand(-(-n // t), -(-k // t)) < density
    keep.view(-1)[0], keep.view(-1)[-1] = True, False  # at least one block kept, one dropped
    return (torch.randn(n, k) * keep.repeat_interleave(t, 0).repeat_interleave(t, 1)[:n, :k]).to(dtype)


def converted(w, t, x_dtype):
    """What the backend's BSR format stores for ``w``: packed tiles and the BSR index lists."""
    bsr = BsrWeight.from_dense(w, t)
    packed, packed_format = cpu_tile_mm.pack_bsr_values(bsr.values, x_dtype)
    return packed, bsr.crow_indices, bsr.col_indices, packed_format


def reference(x, w, bias):
    out = x.double() @ w.double().t()
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("lead", [(7,), (2, 3), (2, 1, 5)])
@pytest.mark.parametrize("n,k,t", [(96, 160, 32), (72, 100, 16), (64, 64, 64)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_tile_linear_fp32_matches_float64(lead, n, k, t, with_bias):
    w, x = block_sparse(n, k, t, 0.4), torch.randn(*lead, k)
    bias = torch.randn(n) if with_bias else None
    packed, crow, col, packed_format = converted(w, t, x.dtype)
    out = tile_linear(x, packed, crow, col, bias, n, k, t, packed_format)
    assert out.shape == (*lead, n) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(x, w, bias), atol=1e-4, rtol=1e-4)


# The fp32 path's vector widths this host runs: 8 floats always, 16 where the kernel was built for
# AVX-512 (its default there).
FP32_WIDTHS = [8] + ([16] if cpu_tile_mm.unavailable_reason() is None and cpu_tile_mm.native_wide_fp32() else [])


@pytest.fixture(params=FP32_WIDTHS, ids=[f"{w}-wide" for w in FP32_WIDTHS])
def fp32_width(request):
    before = cpu_tile_mm.use_wide_fp32(request.param == 16)
    yield request.param
    cpu_tile_mm.use_wide_fp32(before)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_both_fp32_vector_widths_match_float64(fp32_width, threads, out_dtype):
    # Every shape the fp32 path's register blocks meet: tiles of 16 (one vector of 16 columns),
    # 32, 48 (32 + 16 columns) and 64; N cut inside a tile; K cut inside a tile; row counts below,
    # at and past the 6-row block; a strided input; with and without bias; each activation; fp32
    # and bf16 outputs (bf16 activations in: converted to fp32 rows first). Against float64.
    for rows, n, k, t in [(1, 48, 64, 16), (5, 100, 96, 32), (13, 96, 144, 48), (97, 136, 128, 64), (6, 40, 70, 32)]:
        # Any tile size through the masked op's packing (BSR takes powers of two only).
        w = block_sparse(n, k, t, 0.6, out_dtype)
        nb, kb = -(-n // t), -(-k // t)
        padded = torch.zeros(nb * t, kb * t)
        padded[:n, :k] = w.float()
        tile_mask = (padded.view(nb, t, kb, t).abs().sum((1, 3)) > 0).float()
        kept = int(tile_mask.sum())
        packed, row_ptr, col_idx = torch.ops.sparse_compile.tile_pack_masked(w, tile_mask, t, kept, 0, False)
        x = (torch.randn(k, rows).t() * 2).to(out_dtype)  # strided rows
        for bias, activation in [(torch.randn(n), "none"), (None, "gelu"), (torch.randn(n), "relu")]:
            wide_calls = cpu_tile_mm.wide_fp32_calls()
            out = tile_linear(x, packed, row_ptr, col_idx, bias, n, k, t, 0, activation)
            assert cpu_tile_mm.wide_fp32_calls() - wide_calls == int(fp32_width == 16)  # the width asked for ran
            expected = reference(x, w, bias)
            if activation != "none":
                expected = ACTIVATIONS[activation](expected)
            assert out.dtype == out_dtype
            if out_dtype == torch.float32:
                torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
            else:
                torch.testing.assert_close(out.double(), expected, atol=1e-3, rtol=2**-7)


def test_both_fp32_vector_widths_give_the_same_sums():
    # The 16-wide path does the 8-wide one's arithmetic in the same order (fused multiply-adds
    # over the kept tiles, tile by tile): the same bits where both run.
    if len(FP32_WIDTHS) < 2:
        pytest.skip("one fp32 vector width on this host (no AVX-512)")
    n, k, t = 136, 160, 32
    w, x, bias = block_sparse(n, k, t, 0.5), torch.randn(50, k), torch.randn(n)
    packed, crow, col, _ = converted(w, t, torch.float32)
    results = []
    for wide in (False, True):
        before = cpu_tile_mm.use_wide_fp32(wide)
        try:
            wide_calls = cpu_tile_mm.wide_fp32_calls()
            results.append(tile_linear(x, packed, crow, col, bias, n, k, t, 0, "gelu"))
            assert cpu_tile_mm.wide_fp32_calls() - wide_calls == int(wide)
        finally:
            cpu_tile_mm.use_wide_fp32(before)
    torch.testing.assert_close(results[1], results[0], atol=0, rtol=0)


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.bfloat16, 3e-2, 2e-2), (torch.float16, 5e-3, 5e-3)])
def test_tile_linear_half_in_half_out(dtype, atol, rtol):
    n, k, t = 96, 130, 32
    w, x, bias = block_sparse(n, k, t, 0.5, dtype), torch.randn(4, 6, k, dtype=dtype), torch.randn(n, dtype=dtype)
    packed, crow, col, packed_format = converted(w, t, dtype)
    assert packed_format == (1 if dtype == torch.bfloat16 and 1 in FORMATS else 0)
    out = tile_linear(x, packed, crow, col, bias, n, k, t, packed_format)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), reference(x, w, bias), atol=atol, rtol=rtol)


@pytest.mark.parametrize("packed_format", FORMATS)
def test_both_packed_layouts_give_the_same_bf16_result(packed_format):
    n, k, t = 64, 96, 32
    w, x = block_sparse(n, k, t, 0.5, torch.bfloat16), torch.randn(9, k, dtype=torch.bfloat16)
    bsr = BsrWeight.from_dense(w, t)
    packed = torch.ops.sparse_compile.tile_pack_blocks(bsr.values, packed_format)
    out = tile_linear(x, packed, bsr.crow_indices, bsr.col_indices, None, n, k, t, packed_format)
    torch.testing.assert_close(out.double(), reference(x, w, None), atol=3e-2, rtol=2e-2)


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


# Row schedules: the register-block paths (fp32, AVX-512 BF16), and AMX's where the CPU has it.
SCHEDULES = [(f, False) for f in FORMATS] + (
    [(1, True)] if cpu_tile_mm.unavailable_reason() is None and cpu_tile_mm.native_amx() else []
)


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("rows", [1, 5, 13, 48, 97, 394])
@pytest.mark.parametrize("packed_format,amx", SCHEDULES, ids=[f"format{f}{'-amx' if a else ''}" for f, a in SCHEDULES])
def test_every_row_is_computed_however_the_rows_split_over_threads(threads, rows, packed_format, amx):
    # The kernel cuts the rows into equal chunks, a multiple of the threads in number (a
    # multiple of the 6-row register block in size): uneven counts leave short or empty chunks.
    # On AMX, one range per thread, a multiple of 16 rows, the rows past the last 16 on AVX-512.
    dtype = torch.bfloat16 if packed_format == 1 else torch.float32
    n, k, t = 80, 96, 16
    w, x, bias = block_sparse(n, k, t, 0.5, dtype), torch.randn(rows, k, dtype=dtype), torch.randn(n, dtype=dtype)
    bsr = BsrWeight.from_dense(w, t)
    packed = torch.ops.sparse_compile.tile_pack_blocks(bsr.values, packed_format)
    before = cpu_tile_mm.use_amx(amx)
    try:
        amx_calls = cpu_tile_mm.amx_calls()
        out = tile_linear(x, packed, bsr.crow_indices, bsr.col_indices, bias, n, k, t, packed_format)
        assert cpu_tile_mm.amx_calls() - amx_calls == int(amx and rows >= 16)
    finally:
        cpu_tile_mm.use_amx(before)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.double(), reference(x, w, bias), atol=tol, rtol=tol)


def test_tile_linear_reads_a_strided_input_and_no_rows():
    n, k, t = 64, 96, 32
    w = block_sparse(n, k, t, 0.5)
    packed, crow, col, packed_format = converted(w, t, torch.float32)
    x_t = torch.randn(k, 10).t()  # column-major rows
    out = tile_linear(x_t, packed, crow, col, None, n, k, t, packed_format)
    torch.testing.assert_close(out.double(), reference(x_t, w, None), atol=1e-4, rtol=1e-4)
    empty = tile_linear(torch.randn(0, k), packed, crow, col, None, n, k, t, packed_format)
    assert empty.shape == (0, n)


def test_tile_linear_errors_name_the_problem():
    n, k, t = 64, 96, 32
    w = block_sparse(n, k, t, 0.5)
    packed, crow, col, packed_format = converted(w, t, torch.float32)
    with pytest.raises(RuntimeError, match="in_features=96"):
        tile_linear(torch.randn(3, 95), packed, crow, col, None, n, k, t, packed_format)
    with pytest.raises(RuntimeError, match="row pointers"):
        tile_linear(torch.randn(3, k), packed, crow[:-1], col, None, n, k, t, packed_format)
    with pytest.raises(RuntimeError, match="packed layout"):
        tile_linear(torch.randn(3, k), packed.to(torch.bfloat16), crow, col, None, n, k, t, 0)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        tile_linear(torch.randn(3, k).double(), packed, crow, col, None, n, k, t, packed_format)
    with pytest.raises(RuntimeError, match="packed_format must be 0"):
        tile_linear(torch.randn(3, k), packed, crow, col, None, n, k, t, 7)
    if 1 in FORMATS:
        pairs = torch.ops.sparse_compile.tile_pack_blocks(BsrWeight.from_dense(w, t).values, 1)
        with pytest.raises(RuntimeError, match="needs bfloat16 x"):
            tile_linear(torch.randn(3, k), pairs, crow, col, None, n, k, t, 1)


def test_tile_linear_schema_and_fake_implementation():
    n, k, t = 64, 96, 32
    packed, crow, col, packed_format = converted(block_sparse(n, k, t, 0.5), t, torch.float32)
    args = (torch.randn(2, 5, k), packed, crow, col, torch.randn(n), n, k, t, packed_format)
    torch.library.opcheck(tile_linear, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    torch.library.opcheck(tile_linear, (*args, "gelu"), test_utils=("test_schema", "test_faketensor"))


def gelu_float64(v):
    return 0.5 * v * (1 + torch.erf(v / 2**0.5))


ACTIVATIONS = {"gelu": gelu_float64, "relu": torch.relu}


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("packed_format,amx", SCHEDULES, ids=[f"format{f}{'-amx' if a else ''}" for f, a in SCHEDULES])
def test_tile_linear_applies_the_activation_to_its_fp32_sums(activation, packed_format, amx):
    # The activation of the layer's output (GELU exact, ReLU), applied before rounding: against
    # float64 of activation(x @ W^T + b). Shapes with partial row and column blocks on every path.
    dtype = torch.bfloat16 if packed_format == 1 else torch.float32
    for rows, n, k, t in [(50, 70, 96, 32), (7, 48, 64, 16), (37, 96, 128, 64)]:
        w = block_sparse(n, k, t, 0.5, dtype)
        x, bias = (torch.randn(rows, k) * 2).to(dtype), torch.randn(n)
        bsr = BsrWeight.from_dense(w, t)
        packed = torch.ops.sparse_compile.tile_pack_blocks(bsr.values, packed_format)
        before = cpu_tile_mm.use_amx(amx)
        try:
            amx_calls = cpu_tile_mm.amx_calls()
            out = tile_linear(x, packed, bsr.crow_indices, bsr.col_indices, bias, n, k, t, packed_format, activation)
            assert cpu_tile_mm.amx_calls() - amx_calls == int(amx and rows >= 16)
        finally:
            cpu_tile_mm.use_amx(before)
        expected = ACTIVATIONS[activation](reference(x, w, bias))
        if dtype == torch.float32:  # fp32 sums (the activation's own error: the test below)
            torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
        else:  # one rounding to bf16 (half an ulp), fp32 sums
            torch.testing.assert_close(out.double(), expected, atol=1e-3, rtol=2**-8)


def test_tile_linear_gelu_matches_torch_over_the_whole_range():
    # GELU of single values through an identity tile: the approximated erf against float64 from
    # -12 to 12 (both tails, the steep middle) and special values.
    eye = torch.eye(16).unsqueeze(0).contiguous()
    packed = torch.ops.sparse_compile.tile_pack_blocks(eye, 0)
    row_ptr, col = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32)
    values = torch.linspace(-12, 12, 16 * 4001)
    out = tile_linear(values.view(-1, 16), packed, row_ptr, col, None, 16, 16, 16, 0, "gelu").view(-1)
    torch.testing.assert_close(out.double(), gelu_float64(values.double()), atol=1e-6, rtol=1e-6)
    special = torch.tensor([float("nan"), 0.0, -0.0, 1e-30, -1e-30, 100.0, -100.0, float("-inf")])
    x = torch.zeros(len(special), 16)
    x[:, 0] = special  # one value per row: NaN and inf stay in their own row
    out = tile_linear(x, packed, row_ptr, col, None, 16, 16, 16, 0, "gelu")[:, 0]
    assert out[0].isnan() and out[-1].isnan()  # as torch: -inf * (1 + erf(-inf)) = -inf * 0
    torch.testing.assert_close(out[1:-1], torch.nn.functional.gelu(special[1:-1]), atol=1e-30, rtol=1e-6)


# Every path by the dtype of its output: SCHEDULES' (fp32 out on the fp32 path, bf16 on the bf16 pairs
# ones) and the fp32 path with bf16 activations in and out.
OUTPUT_PATHS = [(f, amx, torch.bfloat16 if f == 1 else torch.float32) for f, amx in SCHEDULES] + [
    (0, False, torch.bfloat16)
]
OUTPUT_PATH_IDS = [f"format{f}{'-amx' if a else ''}-{str(d)[6:]}" for f, a, d in OUTPUT_PATHS]


def run_path(packed_format, amx, x, bsr, bias, n, k, t, activation):
    """tile_linear on one path; asserts AMX ran where it was asked to (and the shape allows)."""
    packed = torch.ops.sparse_compile.tile_pack_blocks(bsr.values, packed_format)
    before = cpu_tile_mm.use_amx(amx)
    try:
        amx_calls = cpu_tile_mm.amx_calls()
        out = tile_linear(x, packed, bsr.crow_indices, bsr.col_indices, bias, n, k, t, packed_format, activation)
        assert cpu_tile_mm.amx_calls() - amx_calls == int(amx and x.shape[0] >= 16 and t % 16 == 0 and k % t == 0)
    finally:
        cpu_tile_mm.use_amx(before)
    return out


@pytest.mark.parametrize("activation", ["none", "gelu", "relu"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("packed_format,amx,dtype", OUTPUT_PATHS, ids=OUTPUT_PATH_IDS)
def test_an_output_tile_that_keeps_no_tile_is_the_activated_bias(activation, with_bias, packed_format, amx, dtype):
    # Where a row of output tiles keeps no tile of W, the kernel computes activation(bias) once and
    # copies it down the rows: those columns, and the kept ones beside them, against float64.
    # Block rows 1 and 3 (the last, cut by N at 4 columns) empty; 50 rows = 48 on AMX tiles + 2.
    n, k, t, rows = 100, 96, 32, 50
    w = torch.randn(n, k)
    w[32:64], w[96:] = 0, 0
    w[0:32, 32:64] = 0  # block row 0 keeps two of its three tiles, block row 2 all three
    w = w.to(dtype)
    bsr = BsrWeight.from_dense(w, t)
    assert bsr.crow_indices.diff().tolist() == [2, 0, 3, 0]
    x = (torch.randn(rows, k) * 2).to(dtype)
    bias = torch.randn(n) * 2 if with_bias else None
    out = run_path(packed_format, amx, x, bsr, bias, n, k, t, activation)
    expected = reference(x, w, bias)
    if activation != "none":
        expected = ACTIVATIONS[activation](expected)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    else:  # one rounding to bf16, fp32 sums (and GELU's erf to bf16 precision)
        torch.testing.assert_close(out.double(), expected, atol=1e-3, rtol=2**-7)
    empty_columns = torch.cat([torch.arange(32, 64), torch.arange(96, 100)])
    assert (out[:, empty_columns] == out[:1, empty_columns]).all()


def bf16_values_up_to(limit):
    """Every finite bfloat16 value in [-limit, limit], padded with zeros to a multiple of 16."""
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    values = values[values.float().isfinite() & (values.float().abs() <= limit)]
    return torch.cat([values, values.new_zeros(-len(values) % 16)])


@pytest.mark.parametrize(
    "packed_format,amx,dtype",
    [p for p in OUTPUT_PATHS if p[2] == torch.bfloat16],
    ids=[i for p, i in zip(OUTPUT_PATHS, OUTPUT_PATH_IDS) if p[2] == torch.bfloat16],
)
def test_the_gelu_of_a_bf16_output_over_every_bf16_value(packed_format, amx, dtype):
    # A bf16 output gets GELU with an erf good to bf16 (a rational function, cheaper than the fp32
    # path's): every bf16 input from -12 to 12 through an identity tile (exact sums), against
    # float64. Within two bf16 ulps where |GELU| >= 1e-4, within 2e-6 below (x < -3.9, where
    # 1 + erf cancels), and the nearest bf16 value of float64's almost everywhere.
    eye = torch.eye(16, dtype=torch.bfloat16)
    bsr = BsrWeight.from_dense(eye, 16)
    values = bf16_values_up_to(12)
    out = run_path(packed_format, amx, values.view(-1, 16), bsr, None, 16, 16, 16, "gelu").view(-1)
    expected = gelu_float64(values.double())
    error = (out.double() - expected).abs()
    large = expected.abs() >= 1e-4
    assert (error[large] <= 2**-6 * expected[large].abs()).all()  # two ulps: 2 x 2^-7 relative at most
    assert (error[~large] <= 2e-6).all()
    exact = out == expected.to(torch.bfloat16)
    assert exact[large].float().mean() > 0.97, exact[large].float().mean()
    special = torch.tensor([float("nan"), 0.0, -0.0, 100.0, -100.0, float("inf"), float("-inf")])
    x = torch.zeros(16, 16)
    x[: len(special), 0] = special  # one value per row
    out = run_path(packed_format, amx, x.to(torch.bfloat16), bsr, None, 16, 16, 16, "gelu")[: len(special), 0]
    # NaN stays NaN, GELU(-inf) is NaN (-inf * 0) as torch's, GELU(inf) is inf (torch's fp32 GELU
    # says NaN, its bf16 one inf), and the negative tail is 0, never above.
    expected = torch.tensor([float("nan"), 0.0, 0.0, 100.0, 0.0, float("inf"), float("nan")])
    torch.testing.assert_close(out.float(), expected, atol=0, rtol=0, equal_nan=True)


def test_tile_linear_refuses_an_unknown_activation():
    n, k, t = 64, 96, 32
    packed, crow, col, packed_format = converted(block_sparse(n, k, t, 0.5), t, torch.float32)
    with pytest.raises(RuntimeError, match='activation must be "none", "gelu"'):
        tile_linear(torch.randn(3, k), packed, crow, col, None, n, k, t, packed_format, "tanh")


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(128, 256), nn.Linear(256, 128)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def compiled_two_linears(dtype):
    """Block-pruned ``TwoLinears`` in ``dtype``, its input, and the model compiled (both layers
    sparse whatever the timings) and called once, so that the next call runs compiled code."""
    torch.manual_seed(0)
    model = TwoLinears().eval()
    sparse_compile.prune_linear_blocks_(model, 0.75, 32)
    model = model.to(dtype)
    x = torch.randn(3, 7, 128, dtype=dtype)
    compiled = torch.compile(model, backend="sparse", options={"density_threshold": 1.0})
    with torch.no_grad():
        compiled(x)
    return model, x, compiled


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_graph_calls_tile_linear(fresh_compiler, dtype):
    model, x, compiled = compiled_two_linears(dtype)
    calls = TileKernelCalls()
    with torch.no_grad():
        out = compiled(x)
    assert len(calls) == 2
    report = sparse_compile.report(compiled)
    # The ReLU between the two runs inside the first call (passes/epilogues.py).
    assert [layer.kernel for layer in report.layers] == ["tile kernel (cpu) + relu", "tile kernel (cpu)"]
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=3e-2)
    torch.testing.assert_close(out.double(), float64_reference(model, x), **tol)


def test_a_bf16_layer_gets_its_bias_in_fp32_once_not_per_call(fresh_compiler):
    # The kernel adds the bias in fp32: the pass stores a frozen bf16 bias converted once, so a
    # compiled call converts nothing (before: one aten copy per layer and call, ~5 us each).
    # (float16 activations are converted to fp32 by the op itself: not checked here.)
    model, x, compiled = compiled_two_linears(torch.bfloat16)
    calls = TileKernelCalls()
    with torch.no_grad(), torch.profiler.profile() as profile:
        out = compiled(x)
    assert len(calls) == 2
    ops = [event.name for event in profile.events()]
    assert ops.count("sparse_compile::tile_linear") == 2
    assert not {"aten::_to_copy", "aten::copy_", "aten::to"} & set(ops), sorted(set(ops))  # not even a no-op to()
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=5e-2, rtol=3e-2)
