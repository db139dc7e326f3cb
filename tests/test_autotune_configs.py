"""Which configs the BSR kernel's autotuner may try: per arch, per dtype and block, per device."""

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


def prune(monkeypatch, capability, smem, elem_bytes, blocksize, m_bucket=4096, precision="ieee"):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(ac, "shared_memory_per_block", lambda device: smem)
    named = dict(x_ptr=FakeCudaTensor(elem_bytes), m_bucket=m_bucket)
    return ac.prune_configs(ac.all_configs(), named, BLOCKSIZE=blocksize, INPUT_PRECISION=precision)


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
