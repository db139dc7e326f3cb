"""bsr_linear: Triton kernel (interpreter on CPU, compiled on GPU), CPU op, fake impl, errors.

Every result is checked against a float64 reference written out by hand:
``x.double() @ W.double().T + bias.double()`` with ``W`` the dense weight of the block pattern.
"""

import importlib
import warnings

import pytest
import torch

from sparse_compile.kernels import BsrWeight, bsr_linear, bsr_linear_triton

# The package exports the function `bsr_linear`, which shadows the submodule of that name.
bsr_linear_module = importlib.import_module("sparse_compile.kernels.bsr_linear")

# Output magnitudes are O(1) (see _case), so atol and rtol are on the same scale.
# bf16 under the interpreter: its fp32 -> bf16 cast truncates instead of rounding to nearest
# (seen: 100% of outputs equal the truncated reference), so allow a full bf16 ulp (2**-7).
DTYPE_TOLS = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 1e-2, 1e-2),
    (torch.bfloat16, 2e-2, 2e-2),
]

# (M, N, K, blocksize, density, bias). Ragged M, N and K not multiples of b, empty rows
# (density 0 and ~0.1 leave block rows with no blocks), density 1.
CASES = [
    (1, 48, 64, 16, 0.5, True),
    (7, 100, 70, 16, 0.1, True),
    (33, 64, 130, 32, 0.5, False),
    (130, 96, 96, 32, 1.0, True),
    (64, 77, 45, 16, 0.0, True),
    (5, 40, 40, 16, 0.0, False),
    (40, 130, 200, 64, 0.5, True),
    (17, 64, 33, 64, 1.0, False),
]


def _case(m, n, k, b, density, with_bias, dtype, empty_rows=True):
    """Random x, block-sparse W (and its BsrWeight), bias; all in `dtype`, values O(1)."""
    keep = torch.rand(-(-n // b), -(-k // b)) < density
    if density >= 1:
        keep[:] = True
    elif empty_rows and keep.shape[0] > 1 and density > 0:
        keep[keep.shape[0] // 2] = False  # a block row with no blocks
    full = keep.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :k]
    w = (torch.randn(n, k) * full / k**0.5).to(dtype)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    return x, w, BsrWeight.from_dense(w, b), bias


def _reference(x, w, bias):
    out = x.double() @ w.double().T
    return out + bias.double() if bias is not None else out


def _check(out, x, w, bias, atol, rtol):
    assert out.dtype == x.dtype
    assert out.shape == (*x.shape[:-1], w.shape[0])
    torch.testing.assert_close(out.double(), _reference(x, w, bias), atol=atol, rtol=rtol)


# --- Triton kernel through the interpreter (CPU) -------------------------------------------


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
@pytest.mark.parametrize("m, n, k, b, density, with_bias", CASES)
def test_triton_kernel_interpreted(m, n, k, b, density, with_bias, dtype, atol, rtol):
    x, w, bw, bias = _case(m, n, k, b, density, with_bias, dtype)
    out = bsr_linear_triton(x, bw.values, bw.crow_indices, bw.col_indices, bias, n, k)
    _check(out, x, w, bias, atol, rtol)


def test_triton_kernel_strided_input():
    # A non-contiguous x (column slice) goes through its strides, not a copy.
    _, w, bw, bias = _case(9, 48, 80, 16, 0.5, True, torch.float32)
    x = torch.randn(9, 100)[:, 10:90]
    assert not x.is_contiguous()
    out = bsr_linear_triton(x, bw.values, bw.crow_indices, bw.col_indices, bias, 48, 80)
    _check(out, x, w, bias, 1e-5, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_kernel_empty_m(dtype):
    _, w, bw, bias = _case(1, 40, 40, 16, 0.5, True, dtype)
    out = bsr_linear_triton(torch.empty(0, 40, dtype=dtype), bw.values, bw.crow_indices, bw.col_indices, bias, 40, 40)
    assert out.shape == (0, 40) and out.dtype == dtype


# --- the op on CPU (torch ops) -------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLS)
@pytest.mark.parametrize("m, n, k, b, density, with_bias", CASES + [(0, 64, 64, 32, 0.5, True)])
@pytest.mark.parametrize("path", ["op", "dense", "gather", "tiles"])
def test_cpu_op(m, n, k, b, density, with_bias, dtype, atol, rtol, path):
    x, w, bw, bias = _case(m, n, k, b, density, with_bias, dtype)
    args = (x, bw.values, bw.crow_indices, bw.col_indices, bias, n)
    if path == "op":
        out = bsr_linear(x, bw, bias)
    elif path == "dense":
        out = bsr_linear_module._bsr_linear_torch(*args)
    elif path == "gather":
        out = bsr_linear_module._bsr_linear_gather_bmm(*args)
    else:
        out = bsr_linear_module._bsr_linear_tiles(*args)
    _check(out, x, w, bias, atol, rtol)


@pytest.mark.parametrize("density,kernel_built,expected", [
    (0.3, True, "tiles"), (0.6, True, "rebuild"),  # the tile kernel up to half the blocks
    (0.2, False, "gather"), (0.3, False, "rebuild"),  # without it: gather+bmm up to a quarter
])
def test_cpu_fixed_rule_and_the_path_it_runs(monkeypatch, density, kernel_built, expected):
    tile_mm = importlib.import_module("sparse_compile.kernels.cpu_tile_mm")
    if not kernel_built:
        monkeypatch.setattr(tile_mm, "unavailable_reason", lambda: "no compiler (test)")
    keep = torch.zeros(3 * 5)  # 96 x 160 in 32 x 32 blocks: exactly round(density * 15) kept
    keep[torch.randperm(15)[: round(density * 15)]] = 1
    w = torch.randn(96, 160) * keep.view(3, 5).repeat_interleave(32, 0).repeat_interleave(32, 1)
    x, bias, bw = torch.randn(9, 160), torch.randn(96), BsrWeight.from_dense(w, 32)
    assert bsr_linear_module._cpu_variant(x, bw.values, bw.crow_indices, "auto") == expected
    ran = []
    for name in ("_bsr_linear_tiles", "_bsr_linear_gather_bmm", "_bsr_linear_torch"):
        real = getattr(bsr_linear_module, name)
        monkeypatch.setattr(bsr_linear_module, name, lambda *a, real=real, name=name: ran.append(name) or real(*a))
    _check(bsr_linear(x, bw, bias), x, w, bias, 1e-5, 1e-5)
    assert ran == [{"tiles": "_bsr_linear_tiles", "gather": "_bsr_linear_gather_bmm", "rebuild": "_bsr_linear_torch"}[expected]]


def test_cpu_tile_path_packs_the_blocks_once_per_weight():
    # At inference the values are graph constants: packed at the first call, reused after; an
    # in-place change packs again (the result follows it); the packed copy goes with the tensor.
    import gc

    from torch._dynamo.utils import counters

    tile_mm = importlib.import_module("sparse_compile.kernels.cpu_tile_mm")
    x, w, bw, bias = _case(10, 96, 160, 32, 0.3, True, torch.float32)
    values = bw.values
    args = (values, bw.crow_indices, bw.col_indices, bias, 96)
    counters.clear()
    for _ in range(3):
        _check(bsr_linear_module._bsr_linear_tiles(x, *args), x, w, bias, 1e-5, 1e-5)
    assert counters["sparse_compile"]["cpu_bsr_blocks_packed"] == 1
    with torch.no_grad():
        values.mul_(2)
    _check(bsr_linear_module._bsr_linear_tiles(x, *args), x, 2 * w, bias, 1e-5, 1e-5)
    assert counters["sparse_compile"]["cpu_bsr_blocks_packed"] == 2
    key = (id(values), tile_mm._FP32)
    assert key in tile_mm._packed_bsr
    del values, args, bw
    gc.collect()
    assert key not in tile_mm._packed_bsr


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float16, 1e-2, 1e-2), (torch.bfloat16, 2e-2, 2e-2)])
def test_cpu_tile_path_converts_half_blocks_once(dtype, atol, rtol):
    # Half values are converted to fp32 while they are packed, once per values tensor: before,
    # each call converted them into a new tensor, which the packed-blocks cache never matched.
    from torch._dynamo.utils import counters

    x, w, bw, bias = _case(10, 96, 160, 32, 0.3, True, dtype)
    args = (bw.values, bw.crow_indices, bw.col_indices, bias, 96)
    counters.clear()
    for _ in range(3):
        out = bsr_linear_module._bsr_linear_tiles(x, *args)
        assert out.dtype == dtype
        _check(out, x, w, bias, atol, rtol)
    assert counters["sparse_compile"]["cpu_bsr_blocks_packed"] == 1


def test_cpu_gather_path_chunks(monkeypatch):
    # A tiny chunk budget forces several row chunks, including a ragged last one.
    monkeypatch.setattr(bsr_linear_module, "_GATHER_CHUNK_ELEMS", 700)
    x, w, bw, bias = _case(50, 96, 128, 32, 0.2, True, torch.float32)
    out = bsr_linear_module._bsr_linear_gather_bmm(x, bw.values, bw.crow_indices, bw.col_indices, bias, 96)
    _check(out, x, w, bias, 1e-5, 1e-5)


@pytest.mark.parametrize("density", [0.1, 0.6])  # gather path / dense path
@pytest.mark.parametrize("lead", [(2, 5), (3, 0), (1, 1, 4)])
def test_cpu_op_leading_dims(lead, density):
    _, w, bw, bias = _case(1, 72, 96, 32, density, True, torch.float32)
    x = torch.randn(*lead, 96)
    out = bsr_linear(x, bw, bias)
    _check(out, x, w, bias, 1e-5, 1e-5)


def test_interpreted_kernel_matches_cpu_op_3d():
    x, w, bw, bias = _case(1, 64, 64, 16, 0.5, True, torch.float32)
    x3 = torch.randn(2, 9, 64)
    kernel_out = bsr_linear_triton(x3.reshape(-1, 64), bw.values, bw.crow_indices, bw.col_indices, bias, 64, 64)
    torch.testing.assert_close(kernel_out.view(2, 9, 64), bsr_linear(x3, bw, bias), atol=1e-5, rtol=1e-5)


# --- fake impl, opcheck, tracing -----------------------------------------------------------


def _op_args(lead=(6,), with_bias=True, dtype=torch.float32):
    _, _, bw, bias = _case(1, 50, 70, 16, 0.5, with_bias, dtype)
    x = torch.randn(*lead, 70, dtype=dtype)
    return (x, bw.values, bw.crow_indices, bw.col_indices, bias, 50, 70)


@pytest.mark.parametrize("lead", [(6,), (2, 3), (0,)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(lead, with_bias):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.library.opcheck(torch.ops.sparse_compile.bsr_linear.default, _op_args(lead, with_bias))


def test_fake_tensor_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _op_args((4, 3), True, torch.float16)
    with FakeTensorMode() as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        out = torch.ops.sparse_compile.bsr_linear(*fake_args)
    assert out.shape == (4, 3, 50) and out.dtype == torch.float16


def test_meta_device_shape():
    args = _op_args((5,), True)
    meta = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    out = torch.ops.sparse_compile.bsr_linear(*meta)
    assert out.shape == (5, 50) and out.device.type == "meta"


def test_torch_compile_cpu_aot_eager():
    # On CPU the op decomposes into its torch-op body; aot_eager checks that it traces.
    x, w, bw, bias = _case(11, 64, 48, 16, 0.5, True, torch.float32)

    def f(x):
        return torch.relu(bsr_linear(x, bw, bias))

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(out.double(), _reference(x, w, bias).relu(), atol=1e-5, rtol=1e-5)


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8])
def test_unsupported_dtype(dtype):
    x, values, crow, col, bias, n, k = _op_args(with_bias=False)
    with pytest.raises(TypeError, match="float32, float16, bfloat16"):
        torch.ops.sparse_compile.bsr_linear(x.to(dtype), values.to(dtype), crow, col, None, n, k)
    with pytest.raises(TypeError, match="float32, float16, bfloat16"):
        bsr_linear_triton(x.to(dtype), values.to(dtype), crow, col, None, n, k)


def test_mismatched_dtypes():
    x, values, crow, col, bias, n, k = _op_args()
    with pytest.raises(TypeError, match="share one dtype"):
        torch.ops.sparse_compile.bsr_linear(x, values.half(), crow, col, bias, n, k)
    with pytest.raises(TypeError, match="share one dtype"):
        torch.ops.sparse_compile.bsr_linear(x, values, crow, col, bias.bfloat16(), n, k)
    with pytest.raises(TypeError, match="share one dtype"):
        bsr_linear_triton(x.half(), values, crow, col, None, n, k)


@pytest.mark.parametrize("width", [64, 72, 80])  # narrower within the last block, wider, a block wider
def test_wrong_in_features(width):
    # Before the op took in_features, a too-narrow x read the zero padding and a too-wide one
    # had its extra features ignored: both gave an answer, a wrong one.
    x, values, crow, col, bias, n, k = _op_args()
    wrong_x = torch.randn(3, width)
    with pytest.raises(ValueError, match="expects in_features=70"):
        torch.ops.sparse_compile.bsr_linear(wrong_x, values, crow, col, bias, n, k)
    with pytest.raises(ValueError, match="expects in_features=70"):
        bsr_linear_triton(wrong_x, values, crow, col, bias, n, k)
    _, _, bw, _ = _case(1, 50, 70, 16, 0.5, True, torch.float32)
    with pytest.raises(ValueError, match="expects in_features=70"):
        bsr_linear(wrong_x, bw, bias)


def test_fake_impl_checks_in_features():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _op_args()
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake[0] = torch.empty(6, 64)
        with pytest.raises(ValueError, match="expects in_features=70"):
            torch.ops.sparse_compile.bsr_linear(*fake)


def test_bad_bsr_tensors():
    x, values, crow, col, bias, n, k = _op_args()
    with pytest.raises(TypeError, match="int32"):
        torch.ops.sparse_compile.bsr_linear(x, values, crow.long(), col, bias, n, k)
    with pytest.raises(ValueError, match="out_features"):
        torch.ops.sparse_compile.bsr_linear(x, values, crow, col, bias, n + 16, k)
    with pytest.raises(ValueError, match="bias"):
        torch.ops.sparse_compile.bsr_linear(x, values, crow, col, bias[:-1], n, k)
    with pytest.raises(ValueError, match="power of two"):
        torch.ops.sparse_compile.bsr_linear(x, values[:, :8, :8], crow, col, bias, n, k)


# --- GPU: the compiled Triton kernel -------------------------------------------------------

GPU_CASES = CASES + [(197 * 2, 3072, 768, 32, 0.1, True), (1000, 768, 3072, 64, 0.5, True), (256, 512, 512, 128, 0.3, True)]


@pytest.fixture
def _restore_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _to_cuda(x, bw, bias):
    return x.cuda(), bw.to("cuda"), None if bias is None else bias.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype, tf32, atol, rtol",
    [
        (torch.float32, False, 1e-4, 1e-4),
        (torch.float32, True, 1e-2, 1e-2),
        (torch.float16, False, 1e-2, 1e-2),
        (torch.bfloat16, False, 2e-2, 2e-2),
    ],
)
@pytest.mark.parametrize("m, n, k, b, density, with_bias", GPU_CASES)
def test_triton_kernel_cuda(m, n, k, b, density, with_bias, dtype, tf32, atol, rtol, _restore_tf32):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    x, w, bw, bias = _case(m, n, k, b, density, with_bias, dtype)
    xc, bwc, biasc = _to_cuda(x, bw, bias)
    out = bsr_linear_triton(xc, bwc.values, bwc.crow_indices, bwc.col_indices, biasc, n, k)
    _check(out.cpu(), x, w, bias, atol, rtol)
    out_op = bsr_linear(xc, bwc, biasc)
    _check(out_op.cpu(), x, w, bias, atol, rtol)


@pytest.mark.gpu
def test_triton_kernel_cuda_ignores_tf32_when_off(_restore_tf32):
    # With TF32 off, fp32 must match a float64 reference far tighter than TF32 could.
    torch.backends.cuda.matmul.allow_tf32 = False
    x, w, bw, bias = _case(256, 512, 1024, 32, 1.0, True, torch.float32)
    xc, bwc, biasc = _to_cuda(x, bw, bias)
    out = bsr_linear(xc, bwc, biasc).cpu().double()
    assert (out - _reference(x, w, bias)).abs().max().item() < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-4, 1e-4), (torch.float16, 1e-2, 1e-2), (torch.bfloat16, 2e-2, 2e-2)])
def test_op_in_torch_compile_cuda(dtype, atol, rtol, _restore_tf32):
    torch.backends.cuda.matmul.allow_tf32 = False
    x, w, bw, bias = _case(1, 384, 256, 32, 0.3, True, dtype)
    x3 = torch.randn(2, 77, 256).to(dtype)
    x3c, bwc, biasc = _to_cuda(x3, bw, bias)

    def f(x):
        return torch.nn.functional.gelu(bsr_linear(x, bwc, biasc)) * 2

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True)(x3c)
    ref = torch.nn.functional.gelu(_reference(x3, w, bias)) * 2
    assert out.dtype == dtype and out.shape == (2, 77, 384)
    torch.testing.assert_close(out.cpu().double(), ref, atol=atol, rtol=rtol)
