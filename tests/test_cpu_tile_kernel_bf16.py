"""The CPU tile kernel in bfloat16: bf16 activations in, bf16 out, kept tiles rounded to bf16,
products accumulated in fp32 — on the CPU's AMX tiles or bf16 dot products where the host has
them (AMX-BF16, AVX-512 BF16), in fp32 registers otherwise. Every path the host can run is tested
(the fp32 one everywhere), each against a float64 reference of what bf16 autocast computes.
"""

import os
import subprocess
import sys

import pytest
import torch

from sparse_compile.kernels import cpu_tile_mm

pytestmark = pytest.mark.skipif(
    cpu_tile_mm.unavailable_reason() is not None, reason="no C++ compiler for the CPU tile kernel"
)

# The paths this host can run: the fp32 one always; the bf16 dot products (AMX off) where the CPU
# has them, and the AMX tiles where it has those too.
_BUILT = cpu_tile_mm.unavailable_reason() is None
PATH_IDS = (
    ["fp32-registers"]
    + (["bf16-dot-products"] if _BUILT and cpu_tile_mm.native_bfloat16() else [])
    + (["amx"] if _BUILT and cpu_tile_mm.native_amx() else [])
)
BF16_ULP = 2**-8  # half an ulp of bf16, relative: the output's rounding


@pytest.fixture(params=PATH_IDS)
def path(request):
    """One path of the kernel, by name, with AMX on only for "amx"."""
    before = cpu_tile_mm.use_amx(request.param == "amx")
    yield request.param
    cpu_tile_mm.use_amx(before)


def native_bf16(path):
    """tile_mm's ``native_bf16`` for a path: the bf16 pairs layout for both native paths."""
    return path != "fp32-registers"


def runs_on_amx(m, k, t):
    """The shapes the kernel runs on AMX tiles (the rest of its rows, or all of them, on AVX-512)."""
    return m >= 16 and t % 16 == 0 and k % t == 0


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


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "m,n,k,t",
    [
        (7, 40, 56, 16),  # one register block of rows, partial column blocks
        (200, 96, 81, 32),  # three row chunks of 96, last K tile 17 deep (odd)
        (13, 70, 75, 7),  # odd tile: the last pair of each tile holds one value
        (9, 64, 33, 64),  # one tile deeper than K
        # AMX shapes: whole tiles along K. Rows past the last 16 on AVX-512; N cut inside a tile.
        (50, 70, 96, 32),  # 32-deep steps; the last output tile 6 columns wide
        (37, 80, 64, 16),  # 16-deep steps, 16-column tiles
        (40, 64, 128, 64),  # two 32-deep steps per tile
        (33, 96, 96, 48),  # three 16-deep steps, a 32- and a 16-column block per tile
    ],
)
def test_tile_mm_bf16_equals_autocast_reference(path, weight_dtype, m, n, k, t):
    w = torch.randn(n, k).to(weight_dtype)
    mask = random_tile_mask(n, k, t, 0.4)
    bias = torch.randn(n).to(torch.bfloat16).float()
    # `a` a view into wider rows whose extra column is NaN: a kernel reading past K would show it.
    wide = torch.full((m, k + 1), float("nan"), dtype=torch.bfloat16)
    wide[:, :k] = torch.randn(m, k)
    x = wide[:, :k]
    kept = int(mask.count_nonzero())
    amx_before = cpu_tile_mm.amx_calls()
    out = cpu_tile_mm.tile_mm(x, w, mask, bias, t, kept, native_bf16=native_bf16(path))
    assert_bf16_close(out, reference(x, w, mask, bias, t))
    # The input gradient's view: W^T and the mask's transpose as strided views, no bias.
    dy = torch.randn(m, n).to(torch.bfloat16)
    grad = cpu_tile_mm.tile_mm(dy, w.t(), mask.t(), None, t, kept, native_bf16=native_bf16(path))
    expected = dy.double() @ (w.double() * expand(mask.double(), w.shape, t)).to(torch.bfloat16).double()
    assert_bf16_close(grad, expected)
    # Which path ran: AMX for the shapes it takes (the forward's K, the gradient's N), when on.
    on_amx = path == "amx"
    expected_calls = int(on_amx and runs_on_amx(m, k, t)) + int(on_amx and runs_on_amx(m, n, t))
    assert cpu_tile_mm.amx_calls() - amx_before == expected_calls


def test_tile_mm_bf16_rounds_results_like_torch(path):
    # One kept tile, products exact in fp32 and sums of few terms: the fp32 accumulator holds the
    # exact sum, so the bf16 result must be exactly torch's rounding of it (ties to even).
    t, n, k, m = 16, 16, 16, 32
    w = torch.randint(-8, 9, (n, k)).float() / 8
    x = (torch.randint(-64, 65, (m, k)).float() / 64).to(torch.bfloat16)
    mask = torch.ones(1, 1)
    bias = torch.randn(n).to(torch.bfloat16).float()
    amx_before = cpu_tile_mm.amx_calls()
    out = cpu_tile_mm.tile_mm(x, w, mask, bias, t, 1, native_bf16=native_bf16(path))
    exact = x.double() @ w.double().t() + bias.double()
    assert torch.equal(out, exact.float().to(torch.bfloat16))
    assert cpu_tile_mm.amx_calls() - amx_before == (path == "amx")


def test_bsr_mm_bf16_values(path):
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
    amx_before = cpu_tile_mm.amx_calls()
    for _ in range(2):
        out = cpu_tile_mm.bsr_mm(x, values, bsr.crow_indices(), bsr.col_indices(), bias, n, native_bf16=native_bf16(path))
        assert_bf16_close(out, x.double() @ w.double().t() + bias.double())
    assert counters["sparse_compile"]["cpu_bsr_blocks_packed"] == 1
    assert cpu_tile_mm.amx_calls() - amx_before == (2 if path == "amx" else 0)


def test_native_path_refused_where_the_build_lacks_it(monkeypatch):
    monkeypatch.setattr(cpu_tile_mm, "native_bfloat16", lambda: False)
    x, w, mask = torch.randn(4, 32).to(torch.bfloat16), torch.randn(32, 32), torch.ones(1, 1)
    with pytest.raises(RuntimeError, match="AVX-512 BF16"):
        cpu_tile_mm.tile_mm(x, w, mask, None, 32, 1, native_bf16=True)


def test_other_dtypes_are_refused_with_the_fix():
    x, w, mask = torch.randn(4, 32).half(), torch.randn(32, 32), torch.ones(1, 1)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        cpu_tile_mm.tile_mm(x, w, mask, None, 32, 1)


@pytest.mark.skipif(not cpu_flags(), reason="no /proc/cpuinfo to read the CPU's flags from")
def test_amx_follows_the_cpu_flags():
    # Built with -march=native: the AMX path exists exactly where the CPU has AMX-BF16 (and the
    # Linux kernel grants the tile state, as every kernel since 5.16 does).
    has = {"amx_bf16", "amx_tile", "avx512_bf16", "avx512bw", "avx512vl"} <= cpu_flags()
    assert cpu_tile_mm.native_amx() == has


@pytest.mark.skipif("amx" not in PATH_IDS, reason="this CPU has no AMX-BF16 (the AMX path runs on Sapphire Rapids and later)")
def test_amx_can_be_switched_off_for_a_process():
    # SPARSE_COMPILE_CPU_AMX=0 starts a process with the AMX path off: a call then runs on AVX-512.
    code = (
        "import torch; from sparse_compile.kernels import cpu_tile_mm; cpu_tile_mm.load();"
        "x = torch.randn(32, 64).to(torch.bfloat16); w = torch.randn(64, 64); mask = torch.ones(2, 2);"
        "cpu_tile_mm.tile_mm(x, w, mask, None, 32, 4); print(cpu_tile_mm.amx_calls(), cpu_tile_mm.use_amx(True))"
    )
    for value, expected in (("0", "0 False"), ("1", "1 True")):
        env = {**os.environ, cpu_tile_mm.AMX_ENV: value}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split("\n")[-2] == expected
