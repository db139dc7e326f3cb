"""The CPU tile kernel: ``cpu_tile_mm.cpp``, compiled at first use and called through ctypes.

It serves two ops. :func:`tile_mm` (the masked op, training) computes
``a @ (W ⊙ expand(mask))^T + bias`` in fp32 from the kept tiles only; :func:`bsr_mm` (the BSR op
on CPU, inference) does the same from BSR tensors, whose stored blocks are the kept tiles. One C
call packs the kept tiles (transposed, scaled by their mask value; BSR blocks once per weight
tensor, see ``_packed_bsr``), a second computes the product with its rows split over
``torch.get_num_threads()`` OpenMP threads: torch's own pool, since the library links the
``libgomp.so.1`` torch loaded (see the source's header).
In a forked child (a DataLoader worker) it runs on one thread: GNU OpenMP cannot start a
parallel region in a child of a process that used one.

Building: the source is compiled once per machine with the C++ compiler Inductor uses (the
``sparse`` backend needs one for Inductor anyway: ``CXX`` picks it) into Inductor's cache
directory (``TORCHINDUCTOR_CACHE_DIR``), named by a hash of the source, compiler and flags, so
that processes share it and a changed source rebuilds. If it cannot be built,
:func:`unavailable_reason` says why: the masked op computes densely (and warns once), the BSR op
runs gathered block matmuls or torch ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import threading
import weakref
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from torch._dynamo.utils import counters

__all__ = ["bsr_mm", "native_bfloat16", "tile_mm", "unavailable_reason"]

SOURCE = Path(__file__).with_name("cpu_tile_mm.cpp")
# The kernel's register block is 16 columns wide: packed tile rows are padded to a multiple.
_PACKED_COLUMNS = 16
# Tried in order: the host's vector instructions, then the compiler's default target; without
# OpenMP last (a compiler without it, such as Apple's clang: one thread).
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"],
    ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17"],
    ["-O3", "-shared", "-fPIC", "-std=c++17"],
)

_P = ctypes.c_void_p
_I = ctypes.c_int64


class _KernelLibrary:
    """The compiled kernel, built or found in the cache on first use; or why it is not there."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lib: Optional[ctypes.CDLL] = None
        self._reason: Optional[str] = None
        self._tried = False

    def get(self) -> Optional[ctypes.CDLL]:
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    self._lib = _declare(ctypes.CDLL(str(_build())))
                except (OSError, RuntimeError) as error:
                    self._reason = str(error)
            return self._lib

    def reason(self) -> Optional[str]:
        self.get()
        return self._reason

    def reset(self) -> None:
        """Forget the loaded library (tests: build again under another cache dir or compiler)."""
        with self._lock:
            self._lib, self._reason, self._tried = None, None, False


def _compiler() -> str:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return get_cpp_compiler()
    except Exception:  # an Inductor without it, or no compiler found: let the build say so
        return os.environ.get("CXX", "c++")


def _cache_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "sparse_compile"


def _host() -> str:
    """The machine and its instruction set extensions: ``-march=native`` builds for exactly these, so
    a cache directory shared between different CPUs must not hand one's build to the other."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()} {flags.strip()}"


def _build() -> Path:
    """The shared library's path, compiling it unless this source was built with these flags before."""
    source = SOURCE.read_bytes()
    compiler = _compiler()
    host = _host().encode()
    failures = []
    for flags in _FLAG_SETS:
        digest = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(), host]))
        library = _cache_dir() / f"cpu_tile_mm_{digest.hexdigest()[:16]}.so"
        if library.exists():
            return library
        library.parent.mkdir(parents=True, exist_ok=True)
        # Built under a name of this process's own, then renamed: processes starting together
        # (DDP, DataLoader workers) never load a half-written file.
        partial = library.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            done = subprocess.run(
                [compiler, *flags, str(SOURCE), "-o", str(partial)], capture_output=True, text=True, timeout=300
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            failures.append(f"{compiler} {' '.join(flags)}: {error}")
            continue
        if done.returncode == 0:
            os.replace(partial, library)
            return library
        partial.unlink(missing_ok=True)
        failures.append(f"{compiler} {' '.join(flags)}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
    raise RuntimeError(
        "could not compile the CPU tile kernel of the masked and BSR ops (install a C++ compiler such as g++, or set CXX to one): "
        + " | ".join(failures)
    )


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i32 = ctypes.c_int32
    lib.sc_native_bf16.argtypes = []
    lib.sc_native_bf16.restype = i32
    lib.sc_pack_kept_tiles.argtypes = [_P, i32, _I, _I, _I, _I, _P, _I, _I, _I, _I, _I, _I, _I, i32, i32, _P, _P, _P]
    lib.sc_pack_kept_tiles.restype = _I
    lib.sc_pack_bsr_blocks.argtypes = [_P, i32, _I, _I, _I, i32, _P]
    lib.sc_pack_bsr_blocks.restype = None
    lib.sc_tile_mm.argtypes = [_P, i32, _I, _I, _P, i32, _P, _P, _I, _I, _I, _I, _I, _P, _P, i32, _I, ctypes.c_int]
    lib.sc_tile_mm.restype = i32
    return lib


_library = _KernelLibrary()


def unavailable_reason() -> Optional[str]:
    """``None`` when the kernel is built and loaded, else why not (building it if not tried yet)."""
    return _library.reason()


def _loaded() -> ctypes.CDLL:
    lib = _library.get()
    if lib is None:
        raise RuntimeError(f"the CPU tile kernel is unavailable: {_library.reason()}")
    return lib


def _padded(tile_size: int) -> int:
    return -(-tile_size // _PACKED_COLUMNS) * _PACKED_COLUMNS


# The packed layouts of cpu_tile_mm.cpp: fp32 [tiles, t, padded], or bf16 pairs
# [tiles, ceil(t / 2), padded, 2] for the CPU's bf16 dot products.
_FP32, _BF16_PAIRS = 0, 1
_DTYPES = (torch.float32, torch.bfloat16)


def native_bfloat16() -> bool:
    """Whether the built kernel multiplies bf16 with the CPU's own bf16 dot products (AVX-512 BF16:
    decided when the kernel is compiled for this host). Else bf16 is computed in fp32 registers."""
    lib = _library.get()
    return lib is not None and bool(lib.sc_native_bf16())


def _packed_format(a: Tensor, weight_dtype: torch.dtype, native_bf16: Optional[bool]) -> int:
    """Pairs for bf16 activations and weights (or fp32 master weights rounded to bf16) where the CPU
    has bf16 dot products; ``native_bf16=False`` forces the fp32 path (tests of the other hosts' path)."""
    if a.dtype != torch.bfloat16 or weight_dtype not in _DTYPES:
        return _FP32
    if native_bf16 is None:
        native_bf16 = native_bfloat16()
    elif native_bf16 and not native_bfloat16():
        raise RuntimeError("the CPU tile kernel was not built with bf16 dot products on this host (no AVX-512 BF16)")
    return _BF16_PAIRS if native_bf16 else _FP32


def _empty_packed(tiles: int, t: int, packed_format: int) -> Tensor:
    if packed_format == _FP32:
        return torch.empty((max(tiles, 1), t, _padded(t)), dtype=torch.float32)
    return torch.empty((max(tiles, 1), -(-t // 2), _padded(t), 2), dtype=torch.bfloat16)


def _check_dtypes(a: Tensor, *others: Tensor) -> None:
    for tensor in (a, *others):
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"the CPU tile kernel takes float32 or bfloat16 tensors, got {tensor.dtype}")


def tile_mm(
    a: Tensor, w_nk: Tensor, tile_mask_nk: Tensor, bias: Optional[Tensor], tile_size: int, kept: int,
    round_weight_to_bfloat16: bool = False, native_bf16: Optional[bool] = None,
) -> Tensor:
    """``a [M, K] @ (w_nk ⊙ expand(tile_mask_nk))^T + bias`` -> ``[M, N]`` in ``a``'s dtype, from
    the kept tiles.

    CPU tensors: ``a`` and ``w_nk`` fp32 or bf16 (``w_nk`` and ``tile_mask_nk`` may be transposed
    views), ``bias`` fp32; ``kept`` is the mask's nonzero count. Products accumulate in fp32. With
    bf16 ``a`` the kept tiles of ``w_nk ⊙ expand(mask)`` are rounded to bf16 as they are packed
    (an fp32 master weight under bf16 autocast: rounded where eager autocast rounds it), the
    products are computed with the CPU's bf16 dot products where it has them (see
    :func:`native_bfloat16`; ``native_bf16=False`` forces fp32 registers) and the result is
    rounded to bf16. ``round_weight_to_bfloat16`` rounds the kept tiles for fp32 ``a`` too. The
    caller checks :func:`unavailable_reason` first.
    """
    lib = _loaded()
    _check_dtypes(a, w_nk)
    n, k = w_nk.shape
    t = tile_size
    nb, kb = tile_mask_nk.shape
    packed_format = _packed_format(a, w_nk.dtype, native_bf16)
    round_bf16 = round_weight_to_bfloat16 or a.dtype == torch.bfloat16
    mask = tile_mask_nk.detach().to(torch.float32)
    row_ptr = torch.empty(nb + 1, dtype=torch.int32)
    col_idx = torch.empty(max(kept, 1), dtype=torch.int32)
    packed = _empty_packed(kept, t, packed_format)
    found = lib.sc_pack_kept_tiles(
        w_nk.data_ptr(), int(w_nk.dtype == torch.bfloat16), n, k, w_nk.stride(0), w_nk.stride(1),
        mask.data_ptr(), nb, kb, mask.stride(0), mask.stride(1),
        t, _padded(t), kept, packed_format, int(round_bf16), row_ptr.data_ptr(), col_idx.data_ptr(), packed.data_ptr(),
    )  # fmt: skip
    if found != kept:
        raise RuntimeError(f"tile_mm: the mask has {'more than ' if found < 0 else ''}{max(found, 0)} kept tiles, expected {kept}")
    return _multiply(lib, a, packed, packed_format, row_ptr, col_idx, n, k, t, bias)


def bsr_mm(
    a: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, bias: Optional[Tensor], out_features: int,
    native_bf16: Optional[bool] = None,
) -> Tensor:
    """``a [M, K] @ W^T + bias`` -> ``[M, out_features]`` in ``a``'s dtype for a BSR weight (the
    ``bsr_linear`` op's tensors: ``values [blocks, b, b]``, ``crow_indices``, ``col_indices``), CPU
    tensors. ``a`` fp32 or bf16, ``bias`` fp32; ``values`` fp32, fp16 or bf16, converted once per
    values tensor into the layout the kernel reads (see ``_packed_bsr``): bf16 pairs for the CPU's
    bf16 dot products when ``a`` and ``values`` are bf16 (as :func:`tile_mm`), else fp32."""
    lib = _loaded()
    _check_dtypes(a)
    blocks, t = values.shape[0], values.shape[1]
    packed_format = _packed_format(a, values.dtype, native_bf16) if values.dtype == torch.bfloat16 else _FP32
    packed = _packed_bsr_blocks(lib, values, packed_format)
    row_ptr = crow_indices.to(torch.int32).contiguous()
    col_idx = col_indices.to(torch.int32).contiguous() if blocks else torch.zeros(1, dtype=torch.int32)
    return _multiply(lib, a, packed, packed_format, row_ptr, col_idx, out_features, a.shape[1], t, bias)


# Packed blocks per BSR values tensor and layout, made at its first call and reused while the
# tensor lives unchanged: at inference the op's values are graph constants, the same tensor every
# call, and packing costs a third of a ViT-B MLP's call at 50 rows (0.16 of 0.49 ms; 2 threads,
# 90% sparse blocks of 32). Costs one more copy of the stored blocks (fp16 values become fp32,
# once, rather than on every call). Keyed by id and layout; an entry is used only for the same
# live tensor at the same version (an in-place change packs again) and dropped with it.
_packed_bsr: dict[tuple[int, int], tuple["weakref.ref[Tensor]", int, Tensor]] = {}


def _packed_bsr_blocks(lib: ctypes.CDLL, values: Tensor, packed_format: int) -> Tensor:
    try:
        version = values._version
    except RuntimeError:  # an inference-mode tensor has no version counter: pack, keep nothing
        version = None
    key = (id(values), packed_format)
    entry = _packed_bsr.get(key)
    if entry is not None and version is not None and entry[0]() is values and entry[1] == version:
        return entry[2]
    blocks, t = values.shape[0], values.shape[1]
    source = values.detach()
    if source.dtype not in _DTYPES:
        source = source.to(torch.float32)
    source = source.contiguous()
    packed = _empty_packed(blocks, t, packed_format)
    lib.sc_pack_bsr_blocks(
        source.data_ptr(), int(source.dtype == torch.bfloat16), blocks, t, _padded(t), packed_format, packed.data_ptr()
    )
    counters["sparse_compile"]["cpu_bsr_blocks_packed"] += 1
    if version is not None:
        if entry is None or entry[0]() is not values:
            weakref.finalize(values, _packed_bsr.pop, key, None)
        _packed_bsr[key] = (weakref.ref(values), version, packed)
    return packed


def _multiply(
    lib, a: Tensor, packed: Tensor, packed_format: int, row_ptr: Tensor, col_idx: Tensor, n: int, k: int, t: int, bias
) -> Tensor:
    """The kernel's matmul over packed tiles: ``[M, K]`` -> ``[M, n]`` in ``a``'s dtype."""
    m = a.shape[0]
    a = a.detach()
    if a.stride(1) != 1:
        a = a.contiguous()
    bias = bias.detach().to(torch.float32).contiguous() if bias is not None else None
    out = torch.empty((m, n), dtype=a.dtype)
    bf16 = int(a.dtype == torch.bfloat16)
    status = lib.sc_tile_mm(
        a.data_ptr(), bf16, a.stride(0), m, packed.data_ptr(), packed_format, row_ptr.data_ptr(), col_idx.data_ptr(),
        row_ptr.shape[0] - 1, n, k, t, _padded(t), bias.data_ptr() if bias is not None else None,
        out.data_ptr(), bf16, out.stride(0), 1 if _in_forked_child else torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"the CPU tile kernel cannot run layout {packed_format} with {a.dtype} in this build")
    return out


_in_forked_child = False


def _note_fork() -> None:
    global _in_forked_child
    _in_forked_child = True


os.register_at_fork(after_in_child=_note_fork)
