"""Autotune configs for the BSR linear kernel, per GPU arch.

One ``triton.autotune`` holds the union of the per-arch sets; ``prune_configs`` keeps the
set of the GPU the kernel is launched on (so nothing queries CUDA at import) and drops tiles
that cannot fit in shared memory or are far taller than M.

Where the numbers come from:
* Triton tutorial 03 (matmul): BLOCK_M 64-128 with 4-8 warps and 3-5 stages on A100/H100,
  GROUP_M = 8 for L2 reuse.
* ``torch/sparse/_triton_ops_meta.py`` (A100-tuned ``bsr_dense_addmm``): blocks of 16-128,
  num_stages 1-4 and num_warps 1-8 are all winners somewhere; small problems favour few warps
  and few stages. Our kernel's N tile is the block size (fixed by the weight), so the only
  free tile dim is BLOCK_M.
* Under TRITON_INTERPRET=1 nothing can be timed: one small fixed config.
"""

from __future__ import annotations

import triton

__all__ = ["INTERPRET_CONFIG", "all_configs", "prune_configs", "arch_configs"]

# (BLOCK_M, num_warps, num_stages). GROUP_M is 8 everywhere (tutorial 03).
_SM80 = [
    (16, 2, 2),
    (32, 4, 3),
    (64, 4, 3),
    (64, 4, 4),
    (128, 4, 3),
    (128, 8, 3),
    (128, 8, 4),
]
# H100: larger shared memory (227 KiB) and wgmma like taller tiles and deeper pipelines.
_SM90 = [
    (16, 2, 3),
    (32, 4, 3),
    (64, 4, 4),
    (128, 4, 4),
    (128, 8, 3),
    (128, 8, 5),
    (256, 8, 3),
]
_GROUP_M = 8

# Usable shared memory per block (bytes) on each arch.
_SMEM = {8: 163 * 1024, 9: 227 * 1024}

# BLOCK_M 32: the interpreter runs programs one by one in NumPy, so fewer, taller tiles are
# faster; 32 still exercises ragged-M masking in tests with small M.
INTERPRET_CONFIG = triton.Config({"BLOCK_M": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)


def _cfg(block_m: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "GROUP_M": _GROUP_M}, num_warps=warps, num_stages=stages)


def _key(cfg: triton.Config) -> tuple[int, int, int]:
    return (cfg.kwargs["BLOCK_M"], cfg.num_warps, cfg.num_stages)


def arch_configs(major: int) -> list[triton.Config]:
    """The config set for compute capability ``major`` (8 -> sm80 set, >= 9 -> sm90 set)."""
    return [_cfg(*c) for c in (_SM90 if major >= 9 else _SM80)]


def all_configs() -> list[triton.Config]:
    """Union of every arch's set (deduplicated), what the autotuner is built with."""
    seen: dict[tuple[int, int, int], triton.Config] = {}
    for c in _SM80 + _SM90:
        seen.setdefault(c, _cfg(*c))
    return list(seen.values())


def prune_configs(configs, named_args, **kwargs):
    """``early_config_prune`` hook: keep this GPU's set, within shared memory, sized to M."""
    import torch

    args = {**named_args, **kwargs}  # Triton passes positional args in named_args, the rest in kwargs
    x = args["x_ptr"]
    major = torch.cuda.get_device_capability(x.device)[0] if x.device.type == "cuda" else 8
    wanted = {_key(c) for c in arch_configs(major)}
    blocksize = args["BLOCKSIZE"]
    elem = x.element_size()
    smem = _SMEM.get(major, _SMEM[9] if major > 9 else _SMEM[8])
    m_bucket = args["m_bucket"]

    def fits(c: triton.Config) -> bool:
        bm = c.kwargs["BLOCK_M"]
        # Each pipeline stage holds one x tile [BLOCK_M, b] and one weight block [b, b].
        return c.num_stages * (bm * blocksize + blocksize * blocksize) * elem <= smem

    kept = [c for c in configs if _key(c) in wanted and fits(c)]
    # Tiles more than twice as tall as M only add masked rows. (A symbolic M from dynamic
    # shapes is not compared: that would specialize the graph on it.)
    if not isinstance(m_bucket, int):
        return kept or [_cfg(16, 4, 1)]
    sized = [c for c in kept if c.kwargs["BLOCK_M"] <= max(16, 2 * m_bucket)]
    if sized:
        return sized
    if kept:
        return [min(kept, key=lambda c: (c.kwargs["BLOCK_M"], c.num_stages))]
    # Nothing fits (e.g. b = 256 in fp32): the smallest tile with one stage.
    return [_cfg(16, 4, 1)]
