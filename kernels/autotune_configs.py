"""Autotune configs for the BSR linear and masked linear kernels, per GPU arch.

Both kernels compute a ``[BLOCK_M, blocksize]`` output tile from one x tile and one weight
block per step, so they share the config sets and the shared-memory bound. Registers are per
kernel: ptxas spills the masked kernel's configs where it does not spill the BSR kernel's, so
each kernel has its own measured limits (``_MAX_ACC_PER_THREAD``, ``_MEASURED_SPILLS``) and
its own ``early_config_prune`` hook (``prune_configs`` for BSR, ``prune_masked_configs``).

One ``triton.autotune`` holds the union of the per-arch sets; the hook keeps the set of the
GPU the kernel is launched on (so nothing queries CUDA at import) and drops tiles that cannot
fit in shared memory, that spill, or that are far taller than M.

Where the numbers come from:
* Triton tutorial 03 (matmul): BLOCK_M 64-128 with 4-8 warps and 3-5 stages on A100/H100,
  GROUP_M = 8 for L2 reuse.
* ``torch/sparse/_triton_ops_meta.py`` (A100-tuned ``bsr_dense_addmm``): blocks of 16-128,
  num_stages 1-4 and num_warps 1-8 are all winners somewhere; small problems favour few warps
  and few stages. Our kernel's N tile is the block size (fixed by the weight), so the only
  free tile dim is BLOCK_M.
* Under TRITON_INTERPRET=1 nothing can be timed: one small fixed config.

``SPARSE_COMPILE_MAX_AUTOTUNE_CONFIGS=N`` (environment, read at every launch) lets the hooks keep
at most N of the configs they would keep, the tallest tile first: the GPU tests set it to 1 (a
whole set compiles every config of every specialization, minutes over the gpu-marked tests).
Unset or 0: the whole set, what users and the benchmarks get.
"""

from __future__ import annotations

import os

import triton

__all__ = [
    "INTERPRET_CONFIG", "KERNELS", "MAX_CONFIGS_ENV", "SMEM_PER_BLOCK_FALLBACK", "all_configs", "arch_configs", "autotune_set",
    "fallback_config", "limit_configs", "make_prune_configs", "prune_configs", "prune_masked_configs", "pruned_reason",
    "shared_memory_per_block",
]

#: The kernels these configs serve, each with its own register rules below.
KERNELS = ("bsr_linear", "masked_linear")

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


def _path(elem_bytes: int, input_precision: str) -> str:
    """How ``tl.dot`` runs: "half" (fp16/bf16 tensor cores), "tf32" (TF32 tensor cores) or "fma"
    (fp32 "ieee": FMAs whose operands also live in registers)."""
    if elem_bytes < 4:
        return "half"
    return "tf32" if input_precision == "tf32" else "fma"


# Most fp32 values of the [BLOCK_M, b] accumulator one thread may hold, per kernel and path,
# and most values of the [b, b] weight block (b * b / threads). Measured with
# `python -m benchmarks.inspect_kernels --include-pruned` (ptxas of triton 3.6, sm80 and sm90).
# bsr_linear: with tensor cores (fp16, bf16, TF32) 64 accumulator values per thread compile
# without spills and 128 spill (fp16 b=128 BLOCK_M=128 4 warps: 255 registers + 108 B of spill
# stores on sm80); with FMAs 32 per thread fit in 168-254 registers and 64 spill (b=64
# BLOCK_M=128 4 warps: 8 B on sm80, 20 B on sm90; b=128 BLOCK_M=128 4 warps: ~64 KB). No limit
# on the weight block was needed.
# masked_linear (ViT-B MLP, M = 64 * 197: all 224 configs of the forward, and the allowed ones
# of the input-gradient launch): it scales the weight block in registers before tl.dot, so the
# weight block counts too, and FMAs fit far less.
# - fp16/bf16: 64 accumulator values as above; 128 weight values per thread compile (b=128
#   BLOCK_M=32 4 warps: 244 registers on sm80), 256 spill (b=128 with 2 warps: 280-336 B).
# - TF32: 64 accumulator values; 64 weight values compile (b=128 BLOCK_M=16 8 warps: 220
#   registers), 128 spill (b=128 4 warps: 1.5-9 KB) and 256 spill (~11 KB).
# - FMAs: at most 16 of each: 32 accumulator values spill (1.2 KB at b=32 BLOCK_M=128 4 warps,
#   18 KB at b=64), 32 weight values spill (b=64 with 4 warps: ~600 B). No config of the sets
#   fits at b=64 or b=128 there: the hook's fallback (below) runs.
_MAX_ACC_PER_THREAD = {
    "bsr_linear": {"half": 64, "tf32": 64, "fma": 32},
    "masked_linear": {"half": 64, "tf32": 64, "fma": 16},
}
_MAX_WEIGHT_PER_THREAD = {
    "bsr_linear": {"half": None, "tf32": None, "fma": None},
    "masked_linear": {"half": 128, "tf32": 64, "fma": 16},
}
# Configs under those bounds and within shared memory that ptxas still spills, found by the
# same inspection: (major, path, blocksize, (BLOCK_M, warps, stages)).
_MEASURED_SPILLS = {
    # fp32 "ieee": 12 B on sm80, 8 B on sm90, at 96 registers.
    "bsr_linear": {
        (8, "fma", 32, (64, 4, 3)),
        (8, "fma", 32, (64, 4, 4)),
        (9, "fma", 64, (32, 4, 3)),
    },
    # 64 accumulator + 128 weight values per thread: 776 B (fp16/bf16) on sm80, none on sm90
    # (wgmma); 64 + 32 in TF32: 440 B on sm80, none on sm90; 16 + 8 with FMAs: 40-44 B (the
    # same b=32 BLOCK_M=64 4-warp tile the BSR kernel spills on sm80). The last one spills only
    # in the input-gradient launch (W read through its transpose; 8 B at 128 registers), not in
    # the forward (185 registers): one hook prunes both launches.
    "masked_linear": {
        (8, "half", 128, (64, 4, 3)),
        (8, "tf32", 64, (128, 4, 3)),
        (8, "fma", 32, (64, 4, 3)),
        (8, "fma", 32, (64, 4, 4)),
        (9, "fma", 32, (64, 4, 4)),
        (9, "fma", 16, (256, 8, 3)),
    },
}
# What the hook returns when nothing in the set survives (e.g. b = 256 in fp32; the masked
# kernel's fp32 "ieee" b=64 and b=128 and TF32 b=128): the smallest tile, one stage. One stage
# does not pipeline the loads, but it spills in none of those masked cases (both archs: 72-186
# registers, 0 B; inspect_kernels shows it as "fallback").
_FALLBACK = (16, 4, 1)


def fallback_config() -> triton.Config:
    """The config the hooks fall back to when no config of the set may run."""
    return _cfg(*_FALLBACK)


def pruned_reason(
    cfg: triton.Config, capability: tuple[int, int], smem_bytes: int, elem_bytes: int, blocksize: int,
    input_precision: str, kernel: str = "bsr_linear", weight_elem_bytes: int | None = None,
) -> str | None:
    """Why the autotuner must not try ``cfg`` for this launch of ``kernel``, or ``None`` if it may.

    ``weight_elem_bytes``: the weight's element size when it differs from the input's (the masked
    kernel under autocast: half x, fp32 master weight rounded in registers).
    """
    if _key(cfg) not in {_key(c) for c in arch_configs(capability[0])}:
        return f"not in the sm{capability[0]}x set"
    bm = cfg.kwargs["BLOCK_M"]
    weight_bytes = weight_elem_bytes or elem_bytes
    # Each pipeline stage holds one x tile [BLOCK_M, b] and one weight block [b, b]. An upper
    # bound: triton 3.6 allocated at most this in all 224 configs inspected, for each kernel
    # (the masked kernel: at most 94% of it), mostly (stages - 1) / stages of it.
    need = cfg.num_stages * (bm * blocksize * elem_bytes + blocksize * blocksize * weight_bytes)
    if need > smem_bytes:
        return f"shared memory: needs ~{need // 1024} KiB, block limit {smem_bytes // 1024} KiB"
    path = _path(elem_bytes, input_precision)
    per_thread = bm * blocksize // (32 * cfg.num_warps)
    if per_thread > _MAX_ACC_PER_THREAD[kernel][path]:
        return f"registers: {per_thread} accumulator values per thread spill"
    weight_per_thread = blocksize * blocksize // (32 * cfg.num_warps)
    # An fp32 weight block takes twice the registers of a half one before it is rounded: held
    # to the fp32 (TF32) path's bound.
    limit = _MAX_WEIGHT_PER_THREAD[kernel]["tf32" if weight_bytes > elem_bytes else path]
    if limit is not None and weight_per_thread > limit:
        return f"registers: {weight_per_thread} weight values per thread spill"
    if (capability[0], path, blocksize, _key(cfg)) in _MEASURED_SPILLS[kernel]:
        return "registers: ptxas spills it (measured)"
    return None


def autotune_set(
    capability: tuple[int, int], smem_bytes: int, elem_bytes: int, blocksize: int, input_precision: str,
    kernel: str = "bsr_linear", weight_elem_bytes: int | None = None,
) -> list[triton.Config]:
    """The configs the autotuner may try on a GPU of ``capability`` for one dtype and block size."""
    return [
        c for c in all_configs()
        if pruned_reason(c, capability, smem_bytes, elem_bytes, blocksize, input_precision, kernel, weight_elem_bytes)
        is None
    ]


#: Environment variable: at most this many configs per launch (unset or 0: all of them).
MAX_CONFIGS_ENV = "SPARSE_COMPILE_MAX_AUTOTUNE_CONFIGS"


def limit_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """At most ``$SPARSE_COMPILE_MAX_AUTOTUNE_CONFIGS`` of ``configs``, spread over them by tile
    (BLOCK_M, warps, stages): one is the tallest (what a large M runs, the deepest pipeline), two
    add the smallest. Unset or 0: ``configs`` unchanged."""
    text = os.environ.get(MAX_CONFIGS_ENV, "").strip()
    try:
        limit = int(text or 0)
    except ValueError:
        raise ValueError(f"{MAX_CONFIGS_ENV}={text!r}: expected a number of configs (0 or unset: all)") from None
    if limit <= 0 or len(configs) <= limit:
        return configs
    ordered = sorted(configs, key=_key)
    if limit == 1:
        return [ordered[-1]]
    last = len(ordered) - 1
    return [ordered[last - round(i * last / (limit - 1))] for i in range(limit)]


def make_prune_configs(kernel: str):
    """The ``early_config_prune`` hook of ``kernel`` (one of :data:`KERNELS`)."""
    if kernel not in KERNELS:
        raise ValueError(f"no autotune rules for kernel {kernel!r}; known: {', '.join(KERNELS)}")

    def hook(configs, named_args, **kwargs):
        return _prune_configs(kernel, configs, named_args, kwargs)

    hook.__name__ = hook.__qualname__ = f"prune_{kernel}_configs"
    hook.__doc__ = f"``early_config_prune`` hook of {kernel}: see :func:`_prune_configs`."
    return hook


def _prune_configs(kernel: str, configs, named_args, kwargs):
    """Keep this GPU's set, within shared memory and without spills for ``kernel``, sized to M
    (at most ``$SPARSE_COMPILE_MAX_AUTOTUNE_CONFIGS`` of them: :func:`limit_configs`)."""
    import torch

    args = {**named_args, **kwargs}  # Triton passes positional args in named_args, the rest in kwargs
    x = args["x_ptr"]
    if x.device.type == "cuda":
        capability = torch.cuda.get_device_capability(x.device)
        smem = shared_memory_per_block(x.device)
    else:  # only reached by tests that call the hook with CPU tensors
        capability, smem = (8, 0), SMEM_PER_BLOCK_FALLBACK[(8, 0)]
    w = args.get("w_ptr")
    allowed = {
        _key(c)
        for c in autotune_set(
            capability, smem, x.element_size(), args["BLOCKSIZE"], args["INPUT_PRECISION"], kernel,
            w.element_size() if w is not None else None,
        )
    }
    kept = [c for c in configs if _key(c) in allowed]
    m_bucket = args["m_bucket"]
    # Tiles more than twice as tall as M only add masked rows. (A symbolic M from dynamic
    # shapes is not compared: that would specialize the graph on it.)
    if not isinstance(m_bucket, int):
        return limit_configs(kept) or [fallback_config()]
    sized = [c for c in kept if c.kwargs["BLOCK_M"] <= max(16, 2 * m_bucket)]
    if sized:
        return limit_configs(sized)
    if kept:
        return [min(kept, key=lambda c: (c.kwargs["BLOCK_M"], c.num_stages))]
    return [fallback_config()]


prune_configs = make_prune_configs("bsr_linear")
prune_masked_configs = make_prune_configs("masked_linear")
