"""GPU readiness without a GPU: every config the autotuner may try compiles well for sm80 and sm90.

One run of ``python -m benchmarks.inspect_kernels`` per session (module-scoped fixture), in a
subprocess: the test suite sets TRITON_INTERPRET=1 (conftest), which turns every ``@triton.jit``
function into an interpreted one that cannot be compiled; the subprocess runs without it.

Which subset, and why: both archs, every kernel (the masked kernel twice: its forward and its
input-gradient launch), every block size and every config the autotuner may try (and the
hook's fallback where it tries none), for fp16, fp32 with TF32 and
fp32 without (the three code paths: half tensor cores, TF32 tensor cores, FMAs). bf16 is left
to the full command: it compiles to the same tiles and instructions as fp16 (inspected: equal
shared memory in all 49 configs, registers within 2, no spills in either), and leaving it out
saves a quarter of the ~470 compiles. 90 s with an empty Triton cache on 2 shared cores.

A second run compiles pruned configs too, for the masked kernel on sm80 in fp16 and TF32 at
blocks 64 and 128: the cells where the BSR kernel's rules let spilling configs through (fp16
b=128, TF32 b=64 BLOCK_M=128 4 warps, TF32 b=128 2 warps). Each config its register rules
prune must still spill, or the rule is stale. ~20 s on one core with an empty Triton cache.
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import inspect_kernels as ik

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI_DTYPES = ["fp16", "fp32-tf32", "fp32-ieee"]


# Where the masked kernel spilled under the BSR kernel's rules (sm80; see autotune_configs).
MASKED_SPILL_CELLS = ["--kernel", "masked_linear", "--arch", "sm80", "--dtype", "fp16,fp32-tf32",
                      "--blocksize", "64,128", "--include-pruned"]


def inspect(tmp_path_factory, *args):
    out = tmp_path_factory.mktemp("inspect") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.inspect_kernels", *args, "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [ik.Result(ik.Case(**r.pop("case")), **r) for r in json.loads(out.read_text())]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return inspect(tmp_path_factory, "--dtype", ",".join(CI_DTYPES))


@pytest.fixture(scope="module")
def masked_with_pruned(tmp_path_factory):
    return inspect(tmp_path_factory, *MASKED_SPILL_CELLS)


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
    # The fallback has one stage: nothing to pipeline.
    assert all(r.async_loads in ("cp.async", "TMA") for r in results if not r.case.fallback)


def test_a_config_that_fails_to_compile_fails_the_command(monkeypatch, capsys):
    case = ik.Case("sm80", "bsr_linear", "fp16", 32, "BLOCK_M=16 GROUP_M=8 w2 s2", None)
    monkeypatch.setattr(ik, "all_cases", lambda *args: [case])
    monkeypatch.setattr(ik, "_check_not_interpreted", lambda: None)
    monkeypatch.setattr(ik, "run_cases", lambda cases, jobs: [ik.Result(case, error="CompilationError: boom")])
    assert ik.main(["--jobs", "1"]) == 1
    captured = capsys.readouterr()
    assert "FAILED: CompilationError: boom" in captured.out
    assert "1 config(s) failed to compile" in captured.err


# Per kernel: (unit strides made constants, arguments marked divisible by 16).
SPECIALISED = {
    "bsr_linear": ({"stride_xk", "stride_vk", "stride_on"}, {"x_ptr", "values_ptr", "out_ptr", "K", "N", "stride_xm"}),
    "masked_linear": (
        {"stride_xk", "stride_wk", "stride_tk", "stride_on"},
        {"x_ptr", "w_ptr", "tile_mask_ptr", "kept_ptr", "count_ptr", "out_ptr", "K", "N", "stride_xm", "stride_wn"},
    ),
    "masked_linear_dx": (  # the weight and tile mask read through their transposes
        {"stride_xk", "stride_wn", "stride_tn", "stride_on"},
        {"x_ptr", "w_ptr", "tile_mask_ptr", "kept_ptr", "count_ptr", "out_ptr", "K", "N", "stride_xm", "stride_wk"},
    ),
}


def test_compiles_with_a_launchs_specialisation(results):
    """Unit strides become constants and aligned pointers and sizes divisible by 16 get
    tt.divisibility, as JITFunction.run gives them: without that nothing pipelines."""
    assert {r.case.kernel for r in results} == set(SPECIALISED)
    for r in results:
        constants, divisible = SPECIALISED[r.case.kernel]
        assert constants <= set(r.specialised_constants), r
        assert divisible <= set(r.divisible_by_16), r


def test_fallback_runs_only_where_every_config_is_pruned(results):
    """The masked kernel's fp32 "ieee" b=64/128 and TF32 b=128 have no config left: the hook's
    fallback (one stage) runs there, in both launches, and must not spill either."""
    fallbacks = {(r.case.arch, r.case.kernel, r.case.dtype, r.case.block) for r in results if r.case.fallback}
    assert fallbacks == {
        (arch, kernel, dtype, block)
        for arch in ik.ARCHS for kernel in ("masked_linear", "masked_linear_dx")
        for dtype, block in [("fp32-ieee", 64), ("fp32-ieee", 128), ("fp32-tf32", 128)]
    }
    for r in results:
        if r.case.fallback:
            assert r.spill_bytes == 0 and r.shared_bytes <= ik.smem_limit(r.case.arch), r


def test_masked_configs_pruned_for_registers_do_spill(masked_with_pruned):
    """The masked kernel's register rules prune only what ptxas spills, and what they let through
    does not spill: the configs that spilled under the BSR kernel's rules are pruned now."""
    by_reason = {}
    for r in masked_with_pruned:
        assert not r.error, r
        if r.case.pruned and r.case.pruned.startswith("registers"):
            by_reason[(r.case.dtype, r.case.block, r.case.config)] = r.spill_bytes
        elif not r.case.pruned:
            assert r.spill_bytes == 0, r
    assert by_reason and all(by_reason.values()), by_reason
    assert {
        ("fp16", 128, "BLOCK_M=16 GROUP_M=8 w2 s2"),
        ("fp16", 128, "BLOCK_M=64 GROUP_M=8 w4 s3"),
        ("fp32-tf32", 64, "BLOCK_M=128 GROUP_M=8 w4 s3"),
        ("fp32-tf32", 128, "BLOCK_M=16 GROUP_M=8 w2 s2"),
    } <= set(by_reason)
