"""The masked linear op: Triton kernel (interpreter), CPU implementation, autograd, tile_masked_weight.

Reference everywhere: ``x @ (W * expand(M))^T + b`` written out in float64, with float64 autograd
for the gradients (of x, W, the tile mask and the bias).
"""

import importlib

import pytest
import torch
from torch._dynamo.utils import counters

from sparse_compile.kernels.masked_linear import (
    masked_linear,
    masked_linear_input_grad,
    masked_mm_triton,
    tile_masked_weight,
)

# (dtype, atol, rtol) against float64: fp32 accumulates in fp32; the half types round inputs and output.
DTYPES = [(torch.float32, 1e-4, 1e-4), (torch.float16, 2e-2, 1e-2), (torch.bfloat16, 1e-1, 2e-2)]


def expand(tile_mask, shape, t):
    """Hand-written expansion: every tile entry repeated t x t, cut to the weight's shape."""
    return tile_mask.repeat_interleave(t, 0).repeat_interleave(t, 1)[: shape[0], : shape[1]]


def random_tile_mask(n, k, t, density, dtype=torch.float32):
    """Exactly round(density * tiles) kept tiles at random places (at least one kept, one dropped)."""
    shape = (-(-n // t), -(-k // t))
    tiles = shape[0] * shape[1]
    kept = round(density * tiles) if density in (0.0, 1.0) else min(max(1, round(density * tiles)), tiles - 1)
    mask = torch.zeros(tiles, dtype=dtype)
    mask[torch.randperm(tiles)[:kept]] = 1
    return mask.view(shape)


def reference(x, w, mask, bias, t):
    w_eff = w.double() * expand(mask.double(), w.shape, t)
    out = x.double() @ w_eff.t()
    return out if bias is None else out + bias.double()


# --------------------------------------------------------------------------------------------
# Triton kernel through the interpreter


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize(
    "m,n,k,t,density",
    [(37, 70, 50, 16, 0.5), (5, 64, 96, 32, 0.3), (16, 48, 32, 16, 0.0), (33, 32, 48, 16, 1.0)],
)
def test_triton_forward_and_input_grad(dtype, atol, rtol, m, n, k, t, density):
    x, w, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype)
    mask = random_tile_mask(n, k, t, density)
    out = masked_mm_triton(x, w, mask, b, t)
    torch.testing.assert_close(out.double(), reference(x, w, mask, b, t), atol=atol * k, rtol=rtol)
    # Input gradient: the same kernel on W^T and M^T (views, nothing copied).
    dy = torch.randn(m, n, dtype=dtype)
    dx = masked_mm_triton(dy, w.t(), mask.t(), None, t)
    ref_dx = dy.double() @ (w.double() * expand(mask.double(), w.shape, t))
    torch.testing.assert_close(dx.double(), ref_dx, atol=atol * n, rtol=rtol)


def test_triton_mask_values_scale_tiles():
    # The op is W ⊙ expand(M) for any M, not only 0/1 (a tile with 0.5 counts half).
    x, w = torch.randn(9, 40), torch.randn(24, 40)
    mask = torch.rand(2, 3) * (torch.rand(2, 3) > 0.3)
    out = masked_mm_triton(x, w, mask, None, 16)
    torch.testing.assert_close(out.double(), reference(x, w, mask, None, 16), atol=1e-4, rtol=1e-4)


def test_triton_rejects_tiles_it_cannot_take():
    x, w = torch.randn(4, 48), torch.randn(24, 48)
    with pytest.raises(ValueError, match="power of two >= 16"):
        masked_mm_triton(x, w, torch.ones(2, 4), None, 12)


# --------------------------------------------------------------------------------------------
# The CPU tile kernel (cpu_tile_mm.cpp) and its threads


@pytest.fixture
def threads():
    """Sets torch's thread count for one test and restores it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("num_threads", [1, 2, 3, 5])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize(
    "m,n,k,t",
    [
        (40, 48, 96, 16),  # more threads than register blocks of rows (5 threads, 7 blocks of 6)
        (2, 64, 64, 32),  # fewer rows than one register block
        (61, 72, 100, 16),  # ragged: edge tiles cut at N and K
        (25, 50, 70, 24),  # a tile that is not a multiple of the kernel's 16-column block
        (30, 128, 192, 64),
        (7, 100, 96, 48),
    ],
)
def test_cpu_tile_kernel_matches_float64(threads, num_threads, with_bias, m, n, k, t):
    threads(num_threads)
    x, w = torch.randn(m, k), torch.randn(n, k)
    b = torch.randn(n) if with_bias else None
    mask = random_tile_mask(n, k, t, 0.4)
    mask[0] = 0  # a block row with no kept tile: zeros (or the bias) only
    mask[-1, 0] = 1
    counters.clear()
    out = masked_linear(x, w, mask, b, t)
    assert counters["sparse_compile"]["masked_mm_cpu_tiles"] == 1  # the kernel ran, not the dense path
    torch.testing.assert_close(out.double(), reference(x, w, mask, b, t), atol=1e-4, rtol=1e-4)
    # The input gradient runs it on views of W^T and M^T (strides, no copies).
    dy = torch.randn(m, n)
    dx = masked_linear_input_grad(dy, w, mask, t)
    assert counters["sparse_compile"]["masked_mm_cpu_tiles"] == 2
    torch.testing.assert_close(dx.double(), dy.double() @ (w.double() * expand(mask.double(), w.shape, t)), atol=1e-4, rtol=1e-4)
    assert torch.get_num_threads() == num_threads  # the caller's thread count is left as it was


def test_cpu_tile_kernel_scales_tiles_by_mask_values_and_reads_strided_inputs(threads):
    # Any M, not only 0/1 (a tile with 0.5 counts half); x with a row stride wider than K.
    threads(2)
    wide = torch.randn(33, 90)
    x, w = wide[:, 5:85], torch.randn(40, 80)
    mask = torch.rand(3, 5) * (torch.rand(3, 5) > 0.5)
    mask[0, 0] = 0.25
    out = masked_linear(x, w, mask, None, 16)
    torch.testing.assert_close(out.double(), reference(x, w, mask, None, 16), atol=1e-4, rtol=1e-4)


def test_cpu_tile_kernel_with_no_rows_or_no_kept_tiles():
    w, b = torch.randn(32, 48), torch.randn(32)
    mask = random_tile_mask(32, 48, 16, 0.3)
    assert masked_linear(torch.randn(0, 48), w, mask, b, 16).shape == (0, 32)
    x = torch.randn(9, 48)
    counters.clear()
    out = masked_linear(x, w, torch.zeros(2, 3), b, 16)
    assert counters["sparse_compile"]["masked_mm_cpu_tiles"] == 1
    torch.testing.assert_close(out, b.expand(9, 32))


def test_cpu_tile_kernel_under_inference_mode_and_with_inputs_that_require_grad(threads):
    threads(2)
    x, w = torch.randn(30, 64, requires_grad=True), torch.randn(64, 64, requires_grad=True)
    mask = random_tile_mask(64, 64, 16, 0.25)
    with torch.inference_mode():
        out = masked_linear(x, w, mask, None, 16)
    torch.testing.assert_close(out.double(), reference(x, w, mask, None, 16), atol=1e-4, rtol=1e-4)
    out = masked_linear(x, w, mask, None, 16)
    out.sum().backward()
    assert x.grad is not None and w.grad is not None


def _tile_kernel_in_child(queue, x, w, mask):
    queue.put(masked_linear(x, w, mask, None, 16).tolist())


def test_cpu_tile_kernel_works_in_a_forked_child(threads):
    # The worker pool exists in the parent; a forked child has none of its threads and must make
    # its own rather than wait forever on the parent's.
    import multiprocessing

    threads(2)
    x, w = torch.randn(20, 64), torch.randn(64, 64)
    mask = torch.zeros(4, 4)
    mask[0, 1] = mask[3, 2] = mask[2, 2] = 1
    masked_linear(x, w, mask, None, 16)  # the parent's pool now exists
    expected = reference(x, w, mask, None, 16)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_tile_kernel_in_child, args=(queue, x, w, mask))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in the tile kernel")
    assert child.exitcode == 0
    torch.testing.assert_close(torch.tensor(queue.get(timeout=5), dtype=torch.float64), expected, atol=1e-4, rtol=1e-4)


@pytest.fixture
def fresh_kernel_library(monkeypatch, tmp_path):
    """The kernel built again from nothing: an empty Inductor cache dir, the library forgotten."""
    tile_mm = importlib.import_module("sparse_compile.kernels.cpu_tile_mm")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    tile_mm._library.reset()
    yield tile_mm
    tile_mm._library.reset()  # the next test loads the one in its own cache dir


def test_cpu_tile_kernel_is_built_once_into_the_inductor_cache(fresh_kernel_library, monkeypatch, tmp_path):
    tile_mm = fresh_kernel_library
    assert tile_mm.unavailable_reason() is None
    built = list((tmp_path / "inductor" / "sparse_compile").glob("cpu_tile_ops_*.so"))
    assert len(built) == 1 and not list(built[0].parent.glob("*.tmp"))
    # Another process (here: the library forgotten) loads that file and compiles nothing.
    tile_mm._library.reset()
    def no_compiling(*args, **kwargs):
        raise AssertionError(f"compiled again: {args}")

    monkeypatch.setattr(tile_mm.subprocess, "run", no_compiling)
    assert tile_mm.unavailable_reason() is None


def test_without_a_compiler_the_op_warns_once_and_computes_densely(fresh_kernel_library, monkeypatch):
    tile_mm = fresh_kernel_library
    ml = importlib.import_module("sparse_compile.kernels.masked_linear")
    monkeypatch.setattr(tile_mm, "_compiler", lambda: "/nonexistent/c++")
    monkeypatch.setattr(ml, "_warned_no_kernel", False)
    x, w, b = torch.randn(12, 64), torch.randn(32, 64), torch.randn(32)
    mask = random_tile_mask(32, 64, 16, 0.25)
    counters.clear()
    with pytest.warns(UserWarning, match="install a C\\+\\+ compiler"):
        out = masked_linear(x, w, mask, b, 16)
    assert counters["sparse_compile"]["masked_mm_cpu_dense"] == 1
    assert counters["sparse_compile"]["masked_mm_cpu_tiles"] == 0
    torch.testing.assert_close(out.double(), reference(x, w, mask, b, 16), atol=1e-4, rtol=1e-4)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, not per call
        masked_linear(x, w, mask, b, 16)
    assert "/nonexistent/c++" in tile_mm.unavailable_reason()


# --------------------------------------------------------------------------------------------
# The op on CPU: forward and autograd


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("t,density,path", [(16, 0.2, "tiles"), (32, 0.6, "tiles"), (16, 0.9, "dense")])
def test_op_matches_float64_autograd(dtype, atol, rtol, t, density, path):
    lead, n, k = (3, 7), 72, 100
    x = torch.randn(*lead, k, dtype=dtype, requires_grad=True)
    w = torch.randn(n, k, dtype=dtype, requires_grad=True)
    b = torch.randn(n, dtype=dtype, requires_grad=True)
    mask = random_tile_mask(n, k, t, density).requires_grad_()
    counters.clear()
    out = masked_linear(x, w, mask, b, t)
    assert counters["sparse_compile"][f"masked_mm_cpu_{path}"] == 1  # the path the density asks for
    dy = torch.randn_like(out)
    out.backward(dy)

    x64, w64, b64, m64 = (t_.detach().double().requires_grad_() for t_ in (x, w, b, mask))
    ref = torch.nn.functional.linear(x64, w64 * expand(m64, w.shape, t), b64)
    ref.backward(dy.double())
    torch.testing.assert_close(out.double(), ref, atol=atol * k**0.5, rtol=rtol)
    rows = x.numel() // k
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=atol * n**0.5, rtol=rtol)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=atol * rows**0.5, rtol=rtol)
    torch.testing.assert_close(b.grad.double(), b64.grad, atol=atol * rows**0.5, rtol=rtol)
    # Dropped tiles get their gradient too (the STE needs it): sums over t*t*rows products.
    torch.testing.assert_close(mask.grad.double(), m64.grad, atol=atol * t * rows**0.5, rtol=rtol)
    assert mask.grad.dtype == mask.dtype and (mask.grad[mask == 0] != 0).any()


def test_op_grads_only_for_inputs_that_need_them():
    x, w = torch.randn(6, 40, requires_grad=True), torch.randn(20, 40)
    mask = random_tile_mask(20, 40, 16, 0.3)
    masked_linear(x, w, mask, None, 16).sum().backward()
    expected = torch.ones(6, 20, dtype=torch.float64) @ (w.double() * expand(mask.double(), w.shape, 16))
    torch.testing.assert_close(x.grad.double(), expected, atol=1e-4, rtol=1e-4)
    assert w.grad is None and mask.grad is None


def test_input_grad_op_matches_formula():
    dy, w = torch.randn(2, 5, 40), torch.randn(40, 70)
    mask = random_tile_mask(40, 70, 32, 0.3)
    out = masked_linear_input_grad(dy, w, mask, 32)
    ref = dy.double() @ (w.double() * expand(mask.double(), w.shape, 32))
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def test_opcheck():
    x, w, b = torch.randn(5, 40), torch.randn(24, 40), torch.randn(24)
    mask = random_tile_mask(24, 40, 16, 0.3)
    torch.library.opcheck(
        torch.ops.sparse_compile.masked_linear.default,
        (x.requires_grad_(), w.requires_grad_(), mask.requires_grad_(), b.requires_grad_(), 16),
    )


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((torch.randn(3, 40), torch.randn(24, 40), torch.ones(2, 2), None, 16), ValueError, r"tile mask of shape \(2, 3\)"),
        ((torch.randn(3, 40), torch.randn(24, 40).half(), torch.ones(2, 3), None, 16), TypeError, "must have x.s dtype"),
        ((torch.randn(3, 40).bfloat16(), torch.randn(24, 40).half(), torch.ones(2, 3), None, 16), TypeError, "or float32 when x is float16"),
        ((torch.randn(3, 40).half(), torch.randn(24, 40), torch.ones(2, 3), torch.randn(24).bfloat16(), 16), TypeError, "bias torch.bfloat16"),
        ((torch.randn(3, 40), torch.randn(24, 40), torch.ones(2, 3, dtype=torch.bool), None, 16), TypeError, "float"),
        ((torch.randn(3, 41), torch.randn(24, 40), torch.ones(2, 3), None, 16), ValueError, r"x \[\.\.\., K\]"),
        ((torch.randn(3, 40).double(), torch.randn(24, 40).double(), torch.ones(2, 3), None, 16), TypeError, "one of"),
    ],
)
def test_bad_inputs_name_the_problem(args, error, match):
    with pytest.raises(error, match=match):
        masked_linear(*args)


# --------------------------------------------------------------------------------------------
# tile_masked_weight: what Supermask builds its weight with


@pytest.mark.parametrize("shape,t", [((40, 70), 16), ((8, 6, 3, 3), 2)])
def test_tile_masked_weight_is_the_old_formula_with_the_same_gradients(shape, t):
    w = torch.randn(shape, requires_grad=True)
    mask = (torch.rand([-(-d // t) for d in shape]) > 0.5).float().requires_grad_()
    out = tile_masked_weight(w, mask, t)
    dy = torch.randn(shape)
    out.backward(dy)
    # What Supermask.forward computed before the op existed, to the bit.
    w2, mask2 = w.detach().clone().requires_grad_(), mask.detach().clone().requires_grad_()
    expanded = mask2
    for dim, size in enumerate(shape):
        expanded = expanded.repeat_interleave(t, dim=dim).narrow(dim, 0, size)
    old = w2 * expanded
    old.backward(dy)
    assert torch.equal(out, old) and torch.equal(w.grad, w2.grad) and torch.equal(mask.grad, mask2.grad)


def test_tile_masked_weight_checks_the_mask_shape():
    with pytest.raises(ValueError, match=r"tile mask of shape \(3, 5\)"):
        tile_masked_weight(torch.randn(40, 70), torch.ones(3, 4), 16)


# --------------------------------------------------------------------------------------------
# GPU: the compiled (autotuned) kernel behind the op, forward and gradients


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("t", [32, 64])
def test_op_on_cuda_matches_float64_autograd(dtype, atol, rtol, t):
    torch.backends.cuda.matmul.allow_tf32 = False
    m, n, k = 300, 200, 264  # ragged edges on every dim
    x = torch.randn(m, k, dtype=dtype, device="cuda", requires_grad=True)
    w = torch.randn(n, k, dtype=dtype, device="cuda", requires_grad=True)
    b = torch.randn(n, dtype=dtype, device="cuda", requires_grad=True)
    mask = random_tile_mask(n, k, t, 0.2).cuda().requires_grad_()
    counters.clear()
    out = masked_linear(x, w, mask, b, t)
    dy = torch.randn_like(out)
    out.backward(dy)
    assert counters["sparse_compile"]["masked_mm_triton"] == 2  # forward and dx
    x64, w64, b64, m64 = (t_.detach().double().requires_grad_() for t_ in (x, w, b, mask))
    ref = torch.nn.functional.linear(x64, w64 * expand(m64, w.shape, t), b64)
    ref.backward(dy.double())
    torch.testing.assert_close(out.double(), ref, atol=atol * k**0.5, rtol=rtol)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=atol * n**0.5, rtol=rtol)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=atol * m**0.5, rtol=rtol)
    torch.testing.assert_close(mask.grad.double(), m64.grad, atol=atol * t * m**0.5, rtol=rtol)


@pytest.mark.parametrize("n,k,t", [(64, 96, 16), (72, 100, 16), (96, 64, 32)])
@pytest.mark.parametrize("transposed", [False, True])
def test_dense_paths_mask_the_weight_exactly(n, k, t, transposed):
    # The op's dense paths build W ⊙ expand(M) by broadcasting over tiles (ragged shapes: by
    # expanding); bit-identical to the hand-written expansion, on a transposed view too (dx).
    ml = importlib.import_module("sparse_compile.kernels.masked_linear")
    w = torch.randn(n, k)
    mask = random_tile_mask(n, k, t, 0.5)
    if transposed:
        w, mask = w.t(), mask.t()
    assert torch.equal(ml._masked_weight(w, mask, t), w * expand(mask, w.shape, t))
