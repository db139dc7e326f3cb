"""GPU readiness without a GPU: every config the autotuner may try compiles well for sm80 and sm90.

One run of ``python -m benchmarks.inspect_kernels`` per session (module-scoped fixture), in a
subprocess: the test suite sets TRITON_INTERPRET=1 (conftest), which turns every ``@triton.jit``
function into an interpreted one that cannot be compiled; the subprocess runs without it.

Which subset, and why: both archs, every kernel, every block size and every config the
autotuner may try, for fp16, fp32 with TF32 and fp32 without (the three code paths: half
tensor cores, TF32 tensor cores, FMAs). bf16 is left to the full command: it compiles to the
same tiles and instructions as fp16 (inspected: equal shared memory in all 49 configs, registers
within 2, no spills in either), and leaving it out saves a quarter of the ~130 compiles.
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import inspect_kernels as ik

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI_DTYPES = ["fp16", "fp32-tf32", "fp32-ieee"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.inspect_kernels", "--dtype", ",".join(CI_DTYPES), "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [ik.Result(ik.Case(**r.pop("case")), **r) for r in json.loads(out.read_text())]


def test_every_arch_dtype_and_block_has_configs_to_try(results):
    seen = {(r.case.arch, r.case.kernel, r.case.dtype, r.case.block) for r in results}
    expected = {
        (arch, spec.name, dtype, block)
        for arch in ik.ARCHS for spec in ik._specs().values() for dtype in CI_DTYPES for block in spec.blocksizes
    }
    assert seen == expected
    assert not any(r.case.pruned for r in results)  # pruned configs are not compiled by default


@pytest.mark.parametrize("arch", list(ik.ARCHS))
def test_every_config_compiles_without_spills_within_shared_memory(results, arch):
    problems = [
        f"{r.case.kernel} {r.case.dtype} b={r.case.block} {r.case.config}: {'; '.join(ik.failures(r))}"
        for r in results if r.case.arch == arch and ik.failures(r)
    ]
    assert not problems, "\n".join(problems)


def test_half_and_tf32_use_the_archs_tensor_core_instruction(results):
    for r in results:
        if r.case.dtype == "fp32-ieee":
            assert r.tensor_cores == "none", r  # true fp32 must not use TF32 tensor cores
        elif r.case.arch == "sm80":
            assert r.tensor_cores == "mma", r
        else:
            # wgmma needs a warp group (4 warps) per 64 rows; 2-warp and 16-row tiles use mma.
            assert r.tensor_cores in ("wgmma", "mma"), r
    sm90_half = [r for r in results if r.case.arch == "sm90" and r.case.dtype == "fp16"]
    assert sum(r.tensor_cores == "wgmma" for r in sm90_half) >= len(sm90_half) / 2


def test_main_loop_loads_asynchronously(results):
    assert all(r.async_loads in ("cp.async", "TMA") for r in results)


def test_a_config_that_fails_to_compile_fails_the_command(monkeypatch, capsys):
    case = ik.Case("sm80", "bsr_linear", "fp16", 32, "BLOCK_M=16 GROUP_M=8 w2 s2", None)
    monkeypatch.setattr(ik, "all_cases", lambda *args: [case])
    monkeypatch.setattr(ik, "_check_not_interpreted", lambda: None)
    monkeypatch.setattr(ik, "run_cases", lambda cases, jobs: [ik.Result(case, error="CompilationError: boom")])
    assert ik.main(["--jobs", "1"]) == 1
    captured = capsys.readouterr()
    assert "FAILED: CompilationError: boom" in captured.out
    assert "1 config(s) failed to compile" in captured.err


def test_compiles_with_a_launchs_specialisation(results):
    """Unit strides become constants and aligned pointers and sizes divisible by 16 get
    tt.divisibility, as JITFunction.run gives them: without that nothing pipelines."""
    for r in results:
        assert {"stride_xk", "stride_vk", "stride_on"} <= set(r.specialised_constants), r
        assert {"x_ptr", "values_ptr", "out_ptr", "K", "N", "stride_xm"} <= set(r.divisible_by_16), r
