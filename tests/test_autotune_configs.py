"""Which configs the autotuners may try: per kernel, per arch, per dtype and block, per device."""

import os
import subprocess
import sys
import types

import pytest
import torch

from sparse_compile.kernels import autotune_configs as ac


class FakeCudaTensor:
    """What prune_configs reads of x: its device and element size."""

    def __init__(self, elem_bytes):
        self.device = types.SimpleNamespace(type="cuda", index=0)
        self._elem = elem_bytes

    def element_size(self):
        return self._elem


def prune(monkeypatch, capability, smem, elem_bytes, blocksize, m_bucket=4096, precision="ieee", hook=None):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(ac, "shared_memory_per_block", lambda device: smem)
    named = dict(x_ptr=FakeCudaTensor(elem_bytes), m_bucket=m_bucket)
    return (hook or ac.prune_configs)(ac.all_configs(), named, BLOCKSIZE=blocksize, INPUT_PRECISION=precision)


def key(cfg):
    return (cfg.kwargs["BLOCK_M"], cfg.num_warps, cfg.num_stages)


# (elem bytes, input precision) of fp16, bf16, fp32 with TF32, fp32 without.
DTYPE_CASES = [(2, "ieee"), (2, "ieee"), (4, "tf32"), (4, "ieee")]


def smem_estimate(cfg, blocksize, elem_bytes):
    return cfg.num_stages * (cfg.kwargs["BLOCK_M"] * blocksize + blocksize**2) * elem_bytes


def test_shared_memory_limit_comes_from_the_device_not_the_major_version(monkeypatch):
    # sm86 (A10, RTX 30xx) has 99 KiB per block where sm80 has 163 KiB: with a table keyed on
    # the major version, fp32 block 64 kept configs that cannot launch there.
    kept_sm86 = prune(monkeypatch, (8, 6), 99 * 1024, 4, 64)
    kept_sm80 = prune(monkeypatch, (8, 0), 163 * 1024, 4, 64)
    assert all(smem_estimate(c, 64, 4) <= 99 * 1024 for c in kept_sm86)
    assert any(smem_estimate(c, 64, 4) > 99 * 1024 for c in kept_sm80)
    assert len(kept_sm86) < len(kept_sm80)


def test_shared_memory_per_block_reads_the_device_property(monkeypatch):
    props = types.SimpleNamespace(shared_memory_per_block_optin=101376)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert ac.shared_memory_per_block(0) == 101376


@pytest.mark.parametrize("capability", sorted(ac.SMEM_PER_BLOCK_FALLBACK))
def test_offline_fallback_covers_the_archs_we_document(capability):
    assert ac.SMEM_PER_BLOCK_FALLBACK[capability] in (99 * 1024, 163 * 1024, 227 * 1024)


def test_only_the_arch_set_is_kept(monkeypatch):
    kept = prune(monkeypatch, (9, 0), 227 * 1024, 2, 32)
    sm90 = {(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in ac.arch_configs(9)}
    assert kept and {(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in kept} <= sm90


def allowed_count(kernel, capability):
    smem = ac.SMEM_PER_BLOCK_FALLBACK[capability]
    return sum(
        len(ac.autotune_set(capability, smem, elem, b, precision, kernel))
        for elem, precision in DTYPE_CASES for b in (16, 32, 64, 128)
    )


def test_bsr_kernel_set_is_what_the_inspection_measured():
    # benchmarks/results/inspect-kernels.md: 87 configs on sm80, 88 on sm90, none spilling.
    assert allowed_count("bsr_linear", (8, 0)) == 87
    assert allowed_count("bsr_linear", (9, 0)) == 88
    assert ac.prune_configs.__name__ == "prune_bsr_linear_configs"


def test_masked_kernel_set_is_what_the_inspection_measured():
    assert allowed_count("masked_linear", (8, 0)) == 74
    assert allowed_count("masked_linear", (9, 0)) == 77


# Configs the BSR kernel's rules allow that spill in the masked kernel (inspect_kernels
# --kernel masked_linear --include-pruned): (capability, elem bytes, precision, block, config, bytes).
MASKED_SPILLED = [
    ((8, 0), 2, "ieee", 128, (16, 2, 2), 280),
    ((8, 0), 2, "ieee", 128, (64, 4, 3), 776),
    ((9, 0), 2, "ieee", 128, (16, 2, 3), 336),
    ((8, 0), 4, "tf32", 64, (128, 4, 3), 440),
    ((8, 0), 4, "tf32", 128, (16, 2, 2), 11420),
    ((9, 0), 4, "tf32", 128, (16, 2, 3), 11292),
    ((8, 0), 4, "ieee", 32, (128, 4, 3), 1188),
    ((8, 0), 4, "ieee", 64, (64, 4, 3), 17720),
    ((9, 0), 4, "ieee", 32, (64, 4, 4), 44),
    ((9, 0), 4, "ieee", 64, (128, 8, 3), 18020),
    ((9, 0), 4, "ieee", 16, (256, 8, 3), 8),  # the input-gradient launch only
]


@pytest.mark.parametrize("capability, elem, precision, blocksize, config, spilled", MASKED_SPILLED)
def test_masked_hook_prunes_what_spilled(monkeypatch, capability, elem, precision, blocksize, config, spilled):
    smem = ac.SMEM_PER_BLOCK_FALLBACK[capability]
    bsr = prune(monkeypatch, capability, smem, elem, blocksize, precision=precision)
    masked = prune(monkeypatch, capability, smem, elem, blocksize, precision=precision, hook=ac.prune_masked_configs)
    assert config in {key(c) for c in bsr}  # what the masked kernel ran before it had its own hook
    assert config not in {key(c) for c in masked}


@pytest.mark.parametrize("blocksize, precision", [(64, "ieee"), (128, "ieee"), (128, "tf32")])
def test_masked_hook_falls_back_where_every_config_spills(monkeypatch, blocksize, precision):
    kept = prune(monkeypatch, (8, 0), 163 * 1024, 4, blocksize, precision=precision, hook=ac.prune_masked_configs)
    assert [key(c) for c in kept] == [key(ac.fallback_config())] == [(16, 4, 1)]


def test_masked_hook_keeps_the_tiles_that_did_not_spill(monkeypatch):
    # fp16 b=64 on sm80: nothing spilled, the masked kernel keeps the BSR kernel's whole set.
    bsr = prune(monkeypatch, (8, 0), 163 * 1024, 2, 64)
    masked = prune(monkeypatch, (8, 0), 163 * 1024, 2, 64, hook=ac.prune_masked_configs)
    assert [key(c) for c in masked] == [key(c) for c in bsr] and masked


def test_a_kernel_without_rules_gets_no_hook():
    with pytest.raises(ValueError, match="no autotune rules for kernel 'nope'"):
        ac.make_prune_configs("nope")


def test_each_launcher_autotunes_with_its_own_hook():
    # In a subprocess: the suite runs under TRITON_INTERPRET=1, where the launchers autotune one
    # fixed config without a hook.
    code = (
        "import importlib\n"
        "from sparse_compile.kernels import autotune_configs as ac\n"
        "for mod, name, hook in [('bsr_linear', '_bsr_linear_autotuned', ac.prune_configs),\n"
        "                        ('masked_linear', '_masked_linear_autotuned', ac.prune_masked_configs)]:\n"
        "    tuner = getattr(importlib.import_module('sparse_compile.kernels.' + mod), name)\n"
        "    assert tuner.early_config_prune is hook, (mod, tuner.early_config_prune)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("hook", [ac.prune_configs, ac.prune_masked_configs])
def test_at_most_the_configs_the_environment_allows(monkeypatch, hook):
    # The GPU tests set SPARSE_COMPILE_MAX_AUTOTUNE_CONFIGS=1 (conftest): one config per launch,
    # the tallest the M bucket allows; 2 adds the smallest; unset or 0: the whole set.
    monkeypatch.delenv(ac.MAX_CONFIGS_ENV, raising=False)
    whole = [key(c) for c in prune(monkeypatch, (9, 0), 227 * 1024, 2, 64, hook=hook)]
    assert len(whole) > 2
    monkeypatch.setenv(ac.MAX_CONFIGS_ENV, "0")
    assert [key(c) for c in prune(monkeypatch, (9, 0), 227 * 1024, 2, 64, hook=hook)] == whole
    monkeypatch.setenv(ac.MAX_CONFIGS_ENV, "1")
    assert [key(c) for c in prune(monkeypatch, (9, 0), 227 * 1024, 2, 64, hook=hook)] == [max(whole)]
    monkeypatch.setenv(ac.MAX_CONFIGS_ENV, "2")
    assert [key(c) for c in prune(monkeypatch, (9, 0), 227 * 1024, 2, 64, hook=hook)] == [max(whole), min(whole)]
    # Small M: the tallest of the tiles sized to it.
    monkeypatch.setenv(ac.MAX_CONFIGS_ENV, "1")
    sized = [key(c) for c in prune(monkeypatch, (9, 0), 227 * 1024, 2, 64, m_bucket=16, hook=hook)]
    assert sized == [(32, 4, 3)]
    # Every config pruned: the fallback, whatever the limit.
    fallback = prune(monkeypatch, (8, 0), 163 * 1024, 4, 128, hook=ac.prune_masked_configs)
    assert [key(c) for c in fallback] == [(16, 4, 1)]
    monkeypatch.setenv(ac.MAX_CONFIGS_ENV, "all")
    with pytest.raises(ValueError, match="SPARSE_COMPILE_MAX_AUTOTUNE_CONFIGS='all'"):
        prune(monkeypatch, (9, 0), 227 * 1024, 2, 64, hook=hook)



def test_fp32_master_weights_count_four_bytes_and_the_tf32_register_bound():
    # The masked kernel under autocast: x in bf16, weight fp32. The weight block's shared memory
    # is counted at 4 bytes and its registers at the fp32 (TF32) path's bound, so the set is a
    # subset of the all-half one, and every config kept fits the mixed estimate. On a 99 KiB
    # device at block 64 the 4-byte weight drops one config; at block 128 the register bound
    # drops all (the hook's fallback runs there).
    capability, smem, b = (8, 6), 99 * 1024, 64
    half = ac.autotune_set(capability, smem, 2, b, "ieee", "masked_linear")
    mixed = ac.autotune_set(capability, smem, 2, b, "ieee", "masked_linear", weight_elem_bytes=4)
    assert {key(c) for c in mixed} < {key(c) for c in half}
    assert ac.autotune_set((9, 0), ac.SMEM_PER_BLOCK_FALLBACK[(9, 0)], 2, 128, "ieee", "masked_linear", weight_elem_bytes=4) == []
    for c in mixed:
        need = c.num_stages * (c.kwargs["BLOCK_M"] * b * 2 + b * b * 4)
        assert need <= smem and b * b // (32 * c.num_warps) <= 64, key(c)
    dropped = [c for c in half if key(c) not in {key(m) for m in mixed}]
    reasons = {ac.pruned_reason(c, capability, smem, 2, b, "ieee", "masked_linear", 4) for c in dropped}
    assert all(r.startswith(("shared memory", "registers")) for r in reasons), reasons


def test_mixed_dtype_inspection_cases_are_the_masked_kernels_only():
    from benchmarks import inspect_kernels as ik

    cases = ik.all_cases(["sm80"], dtypes=["bf16-w32"])
    assert cases and {c.kernel for c in cases} == set(ik.MIXED_DTYPE_KERNELS)
