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

__all__ = [
    "INTERPRET_CONFIG", "SMEM_PER_BLOCK_FALLBACK", "all_configs", "arch_configs", "autotune_set",
    "prune_configs", "pruned_reason", "shared_memory_per_block",
]

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

#: Largest dynamic shared memory one block may opt into (bytes), per compute capability, for
#: the offline inspection only (``benchmarks.inspect_kernels``: no device to ask). On a GPU,
#: :func:`shared_memory_per_block` reads the device's own ``shared_memory_per_block_optin``.
#: From the CUDA C++ Programming Guide, "Technical Specifications per Compute Capability",
#: row "Maximum amount of shared memory per thread block": 163 KB on 8.0 (A100) and 8.7,
#: 99 KB on 8.6 (RTX 30xx, A10, A40) and 8.9 (L4, L40, RTX 40xx), 227 KB on 9.0 (H100/H200).
SMEM_PER_BLOCK_FALLBACK = {
    (8, 0): 163 * 1024,
    (8, 6): 99 * 1024,
    (8, 7): 163 * 1024,
    (8, 9): 99 * 1024,
    (9, 0): 227 * 1024,
}

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


def shared_memory_per_block(device) -> int:
    """The most shared memory one block of a kernel may use on ``device`` (bytes, opt-in).

    What Triton itself checks a launch against; sm86/sm89 have 99 KiB where sm80 has 163 KiB,
    so a table keyed on the major capability would let configs through that cannot launch.
    """
    import torch

    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


# Most fp32 values of the [BLOCK_M, b] accumulator one thread may hold. Measured with
# `python -m benchmarks.inspect_kernels --include-pruned` (ptxas of triton 3.6, sm80 and sm90):
# with tensor cores (fp16, bf16, TF32) 64 per thread compiles without spills and 128 spills
# (fp16 b=128 BLOCK_M=128 4 warps: 255 registers + 108 B of spill stores on sm80); without
# them (fp32 "ieee": tl.dot becomes FMAs whose operands also live in registers) 32 per thread
# fits in 168-254 registers and 64 spills (b=64 BLOCK_M=128 4 warps: 8 B on sm80, 20 B on
# sm90; b=128 BLOCK_M=128 4 warps: ~64 KB).
_MAX_ACC_PER_THREAD = {True: 64, False: 32}
# fp32 "ieee" configs under that bound that ptxas still spills (12 B on sm80, 8 B on sm90, at
# 96 registers), found by the same inspection: (major, blocksize, (BLOCK_M, warps, stages)).
_FMA_SPILLS = {
    (8, 32, (64, 4, 3)),
    (8, 32, (64, 4, 4)),
    (9, 64, (32, 4, 3)),
}


def pruned_reason(
    cfg: triton.Config, capability: tuple[int, int], smem_bytes: int, elem_bytes: int, blocksize: int,
    input_precision: str,
) -> str | None:
    """Why the autotuner must not try ``cfg`` for this launch, or ``None`` if it may."""
    if _key(cfg) not in {_key(c) for c in arch_configs(capability[0])}:
        return f"not in the sm{capability[0]}x set"
    bm = cfg.kwargs["BLOCK_M"]
    # Each pipeline stage holds one x tile [BLOCK_M, b] and one weight block [b, b]. An upper
    # bound: triton 3.6 allocated at most this in all 224 configs inspected, mostly
    # (stages - 1) / stages of it.
    need = cfg.num_stages * (bm * blocksize + blocksize * blocksize) * elem_bytes
    if need > smem_bytes:
        return f"shared memory: needs ~{need // 1024} KiB, block limit {smem_bytes // 1024} KiB"
    tensor_cores = elem_bytes < 4 or input_precision == "tf32"
    per_thread = bm * blocksize // (32 * cfg.num_warps)
    if per_thread > _MAX_ACC_PER_THREAD[tensor_cores]:
        return f"registers: {per_thread} accumulator values per thread spill"
    if not tensor_cores and (capability[0], blocksize, _key(cfg)) in _FMA_SPILLS:
        return "registers: ptxas spills it (measured)"
    return None


def autotune_set(
    capability: tuple[int, int], smem_bytes: int, elem_bytes: int, blocksize: int, input_precision: str
) -> list[triton.Config]:
    """The configs the autotuner may try on a GPU of ``capability`` for one dtype and block size."""
    return [
        c for c in all_configs()
        if pruned_reason(c, capability, smem_bytes, elem_bytes, blocksize, input_precision) is None
    ]


def prune_configs(configs, named_args, **kwargs):
    """``early_config_prune`` hook: keep this GPU's set, within shared memory, sized to M."""
    import torch

    args = {**named_args, **kwargs}  # Triton passes positional args in named_args, the rest in kwargs
    x = args["x_ptr"]
    if x.device.type == "cuda":
        capability = torch.cuda.get_device_capability(x.device)
        smem = shared_memory_per_block(x.device)
    else:  # only reached by tests that call the hook with CPU tensors
        capability, smem = (8, 0), SMEM_PER_BLOCK_FALLBACK[(8, 0)]
    allowed = {
        _key(c)
        for c in autotune_set(capability, smem, x.element_size(), args["BLOCKSIZE"], args["INPUT_PRECISION"])
    }
    kept = [c for c in configs if _key(c) in allowed]
    m_bucket = args["m_bucket"]
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
