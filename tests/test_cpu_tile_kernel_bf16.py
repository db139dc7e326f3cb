"""The CPU tile kernel in bfloat16: bf16 activations in, bf16 out, kept tiles rounded to bf16,
products accumulated in fp32 — on the CPU's bf16 dot products where the host has them (AVX-512
BF16), in fp32 registers otherwise. Both paths are tested where the host can run them (the fp32
one everywhere), each against a float64 reference of what bf16 autocast computes.
"""

import pytest
import torch

from sparse_compile.kernels import cpu_tile_mm

pytestmark = pytest.mark.skipif(
    cpu_tile_mm.unavailable_reason() is not None, reason="no C++ compiler for the CPU tile kernel"
)

# The paths this host can run: the fp32 one always; the bf16 dot products where the CPU has them.
PATHS = [False] + ([True] if cpu_tile_mm.unavailable_reason() is None and cpu_tile_mm.native_bfloat16() else [])
PATH_IDS = ["fp32-registers", "bf16-dot-products"][: len(PATHS)]
BF16_ULP = 2**-8  # half an ulp of bf16, relative: the output's rounding


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            line = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[-1].split())


def expand(tile_mask, shape, t):
    return tile_mask.repeat_interleave(t, 0).repeat_interleave(t, 1)[: shape[0], : shape[1]]


def random_tile_mask(n, k, t, density):
    mask = (torch.rand(-(-n // t), -(-k // t)) < density).float()
    mask.view(-1)[0], mask.view(-1)[-1] = 1.0, 0.0  # at least one kept, one dropped
    return mask


def reference(x, w, mask, bias, t):
    """float64 of bf16 autocast's linear: ``W ⊙ M`` rounded to bf16, exact products, fp32 bias."""
    w_eff = (w.double() * expand(mask.double(), w.shape, t)).to(torch.bfloat16).double()
    out = x.double() @ w_eff.t()
    return out if bias is None else out + bias.double()


def assert_bf16_close(out, expected):
    assert out.dtype == torch.bfloat16
    # bf16 output rounding (relative) plus fp32 accumulation slack on results near zero.
    torch.testing.assert_close(out.double(), expected, rtol=BF16_ULP, atol=1e-4)


@pytest.mark.skipif(not cpu_flags(), reason="no /proc/cpuinfo to read the CPU's flags from")
def test_bf16_dot_products_follow_the_cpu_flags():
    # The kernel is compiled with -march=native: it has the bf16 path exactly when the CPU does.
    has = {"avx512_bf16", "avx512bw", "avx512vl"} <= cpu_flags()
    assert cpu_tile_mm.native_bfloat16() == has


@pytest.mark.parametrize("native", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "m,n,k,t",
    [
        (7, 40, 56, 16),  # one register block of rows, partial column blocks
        (200, 96, 81, 32),  # three row chunks of 96, last K tile 17 deep (odd)
        (13, 70, 75, 7),  # odd tile: the last pair of each tile holds one value
        (9, 64, 33, 64),  # one tile deeper than K
    ],
)
def test_tile_mm_bf16_equals_autocast_reference(native, weight_dtype, m, n, k, t):
    w = torch.randn(n, k).to(weight_dtype)
    mask = random_tile_mask(n, k, t, 0.4)
    bias = torch.randn(n).to(torch.bfloat16).float()
    # `a` a view into wider rows whose extra column is NaN: a kernel reading past K would show it.
    wide = torch.full((m, k + 1), float("nan"), dtype=torch.bfloat16)
    wide[:, :k] = torch.randn(m, k)
    x = wide[:, :k]
    kept = int(mask.count_nonzero())
    out = cpu_tile_mm.tile_mm(x, w, mask, bias, t, kept, native_bf16=native)
    assert_bf16_close(out, reference(x, w, mask, bias, t))
    # The input gradient's view: W^T and the mask's transpose as strided views, no bias.
    dy = torch.randn(m, n).to(torch.bfloat16)
    grad = cpu_tile_mm.tile_mm(dy, w.t(), mask.t(), None, t, kept, native_bf16=native)
    expected = dy.double() @ (w.double() * expand(mask.double(), w.shape, t)).to(torch.bfloat16).double()
    assert_bf16_close(grad, expected)


@pytest.mark.parametrize("native", PATHS, ids=PATH_IDS)
def test_tile_mm_bf16_rounds_results_like_torch(native):
    # One kept tile, products exact in fp32 and sums of few terms: the fp32 accumulator holds the
    # exact sum, so the bf16 result must be exactly torch's rounding of it (ties to even).
    t, n, k, m = 16, 16, 16, 32
    w = torch.randint(-8, 9, (n, k)).float() / 8
    x = (torch.randint(-64, 65, (m, k)).float() / 64).to(torch.bfloat16)
    mask = torch.ones(1, 1)
    bias = torch.randn(n).to(torch.bfloat16).float()
    out = cpu_tile_mm.tile_mm(x, w, mask, bias, t, 1, native_bf16=native)
    exact = x.double() @ w.double().t() + bias.double()
    assert torch.equal(out, exact.float().to(torch.bfloat16))


@pytest.mark.parametrize("native", PATHS, ids=PATH_IDS)
def test_bsr_mm_bf16_values(native):
    # bf16 BSR values with bf16 activations: packed once per values tensor and layout.
    from torch._dynamo.utils import counters

    n, k, b, m = 96, 160, 32, 50
    w = torch.randn(n, k).to(torch.bfloat16)
    mask = random_tile_mask(n, k, b, 0.3)
    w = w * expand(mask, w.shape, b).to(torch.bfloat16)
    bsr = w.to_sparse_bsr((b, b))
    x = torch.randn(m, k).to(torch.bfloat16)
    bias = torch.randn(n).to(torch.bfloat16).float()
    values = bsr.values()  # one tensor: bsr.values() makes a new one per call
    counters.clear()
    for _ in range(2):
        out = cpu_tile_mm.bsr_mm(x, values, bsr.crow_indices(), bsr.col_indices(), bias, n, native_bf16=native)
        assert_bf16_close(out, x.double() @ w.double().t() + bias.double())
    assert counters["sparse_compile"]["cpu_bsr_blocks_packed"] == 1


def test_native_path_refused_where_the_build_lacks_it(monkeypatch):
    monkeypatch.setattr(cpu_tile_mm, "native_bfloat16", lambda: False)
    x, w, mask = torch.randn(4, 32).to(torch.bfloat16), torch.randn(32, 32), torch.ones(1, 1)
    with pytest.raises(RuntimeError, match="AVX-512 BF16"):
        cpu_tile_mm.tile_mm(x, w, mask, None, 32, 1, native_bf16=True)


def test_other_dtypes_are_refused_with_the_fix():
    x, w, mask = torch.randn(4, 32).half(), torch.randn(32, 32), torch.ones(1, 1)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        cpu_tile_mm.tile_mm(x, w, mask, None, 32, 1)
