"""The CPU tile kernel: ``cpu_tile_mm.cpp`` with the torch operators of ``cpu_tile_ops.cpp``,
compiled at first use and loaded with ``torch.ops.load_library``.

The library registers ``torch.ops.sparse_compile.tile_linear`` (``x @ W^T + bias`` from packed
kept tiles), ``tile_pack_blocks`` (BSR values -> the packed layout) and ``tile_pack_masked`` (the
kept tiles of ``W ⊙ expand(mask)``), implemented in C++: a compiled graph calls ``tile_linear``
through the dispatcher as it calls aten's ops, with no Python or ctypes in between, and an
AOTInductor package can call it from its own runtime. Their fake implementations (shapes, for
torch.compile and export) are registered here when the library is loaded.

Two Python entry points serve the other ops: :func:`tile_mm` (the masked op, training: packs the
kept tiles on every call, since the weight changes every step) and :func:`bsr_mm` (eager calls of
the BSR op: packs a values tensor once, see ``_packed_bsr``). The sparse backend's converted
layers call ``tile_linear`` directly on tiles packed once at conversion (:func:`pack_bsr_values`).
Rows are split over ``torch.get_num_threads()`` OpenMP threads: torch's own pool, since the
library links the ``libgomp.so.1`` torch loaded (see cpu_tile_mm.cpp's header). In a forked child
(a DataLoader worker) it runs on one thread: GNU OpenMP cannot start a parallel region in a child
of a process that used one.

Building: both sources are compiled once per machine with the C++ compiler Inductor uses (``CXX``
picks it) against torch's headers into Inductor's cache directory (``TORCHINDUCTOR_CACHE_DIR``),
named by a hash of the sources, torch version, compiler, flags and CPU, so that processes share it
and a changed source rebuilds (about 15 s on two cores). ``import sparse_compile`` loads an
already built library (so that a package that calls ``tile_linear`` runs in a fresh process); the
first use builds it. If it cannot be built, :func:`unavailable_reason` says why: the masked op
computes densely (and warns once), the BSR op runs gathered block matmuls or torch ops.
"""

from __future__ import annotations

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

__all__ = [
    "amx_calls", "bsr_mm", "load", "native_amx", "native_bfloat16", "native_wide_fp32", "pack_bsr_values",
    "tile_linear_calls", "tile_mm", "unavailable_reason", "use_amx", "use_wide_fp32", "wide_fp32_calls",
]

#: ``SPARSE_COMPILE_CPU_AMX=0`` keeps the bf16 path off the CPU's AMX tiles (see :func:`use_amx`).
AMX_ENV = "SPARSE_COMPILE_CPU_AMX"

SOURCES = (Path(__file__).with_name("cpu_tile_mm.cpp"), Path(__file__).with_name("cpu_tile_ops.cpp"))
# The kernel's register block is 16 columns wide: packed tile rows are padded to a multiple.
_PACKED_COLUMNS = 16
# Tried in order: the host's vector instructions, then the compiler's default target; without
# OpenMP last (a compiler without it, such as Apple's clang: one thread).
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"],
    ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17"],
    ["-O3", "-shared", "-fPIC", "-std=c++17"],
)


def _torch_flags() -> list[str]:
    """Compiling and linking against the running torch (headers, libc10/libtorch_cpu, its C++ ABI)."""
    from torch.utils import cpp_extension

    libraries = cpp_extension.library_paths()
    return [
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{path}" for path in cpp_extension.include_paths()),
        *(f"-L{path}" for path in libraries),
        *(f"-Wl,-rpath,{path}" for path in libraries),
    ]


_LINK = ["-lc10", "-ltorch_cpu"]


class _KernelLibrary:
    """The compiled kernel, built or found in the cache and loaded on first use; or why it is not there."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._path: Optional[Path] = None
        self._reason: Optional[str] = None
        self._tried = False

    def get(self) -> Optional[Path]:
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    path = _build()
                    _load(path)
                    self._path = path
                except (OSError, RuntimeError) as error:
                    self._reason = str(error)
            return self._path

    def load_if_built(self) -> None:
        """Loads the library if this machine built it before (cheap: no compiler is run)."""
        with self._lock:
            if self._tried:
                return
            try:
                path = _built_path()
            except Exception:  # no compiler, unreadable cache dir: the first use says why
                return
            if path is not None:
                self._tried = True
                try:
                    _load(path)
                    self._path = path
                except (OSError, RuntimeError) as error:
                    self._reason = str(error)

    def reason(self) -> Optional[str]:
        self.get()
        return self._reason

    def reset(self) -> None:
        """Forget the build (tests: build again under another cache dir or compiler). Ops already
        registered in this process stay registered: a library cannot be unloaded."""
        with self._lock:
            self._path, self._reason, self._tried = None, None, False


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


def _library_paths(compiler: str) -> list[tuple[list[str], Path]]:
    """Per flag set, in the order tried: the flags and where that build lives in the cache."""
    sources = b"\0".join(source.read_bytes() for source in SOURCES)
    identity = [sources, torch.__version__.encode(), compiler.encode(), _host().encode()]
    paths = []
    for flags in _FLAG_SETS:
        digest = hashlib.sha256(b"\0".join([*identity, " ".join(flags).encode()]))
        paths.append((flags, _cache_dir() / f"cpu_tile_ops_{digest.hexdigest()[:16]}.so"))
    return paths


def _built_path() -> Optional[Path]:
    return next((path for _, path in _library_paths(_compiler()) if path.exists()), None)


def _build() -> Path:
    """The shared library's path, compiling it unless these sources were built with these flags before."""
    compiler = _compiler()
    candidates = _library_paths(compiler)
    built = next((path for _, path in candidates if path.exists()), None)
    if built is not None:
        return built
    failures = []
    torch_flags = _torch_flags()
    for flags, library in candidates:
        library.parent.mkdir(parents=True, exist_ok=True)
        # Built under a name of this process's own, then renamed: processes starting together
        # (DDP, DataLoader workers) never load a half-written file.
        partial = library.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        command = [compiler, *flags, *torch_flags, *map(str, SOURCES), *_LINK, "-o", str(partial)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
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


_loaded_path: Optional[Path] = None


def _load(path: Path) -> None:
    """Registers the ops from ``path``; a no-op once a build of these sources is loaded (loading a
    second copy would register every op twice)."""
    global _loaded_path
    if _loaded_path is None:
        torch.ops.load_library(str(path))
        _loaded_path = path
        if os.environ.get(AMX_ENV, "1").strip() == "0":
            torch.ops.sparse_compile.tile_set_amx(False)
    _register_fakes()


_fakes_registered = False


def _register_fakes() -> None:
    """Shapes of the ops for torch.compile and export (FakeTensor); once per process."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    @torch.library.register_fake("sparse_compile::tile_linear")
    def _tile_linear_fake(
        x, packed, row_ptr, col_idx, bias, out_features, in_features, tile_size, packed_format, activation="none"
    ):
        torch._check(x.shape[-1] == in_features, lambda: f"tile_linear: x has {x.shape[-1]} features, expected {in_features}")
        return x.new_empty((*x.shape[:-1], out_features))


_library = _KernelLibrary()


def unavailable_reason() -> Optional[str]:
    """``None`` when the kernel is built and loaded, else why not (building it if not tried yet)."""
    return _library.reason()


def load() -> None:
    """Builds (first use on this machine) and loads the library: registers ``torch.ops.sparse_compile.tile_*``.
    Raises ``RuntimeError`` saying why when it cannot be built."""
    if _library.get() is None:
        raise RuntimeError(f"the CPU tile kernel is unavailable: {_library.reason()}")


def load_if_built() -> None:
    """Registers the ops if this machine has built the library before, without compiling anything
    (``import sparse_compile`` calls it: a saved package that calls ``tile_linear`` then runs)."""
    _library.load_if_built()


def tile_linear_calls() -> int:
    """How many times ``tile_linear`` ran in this process (0 before the library is loaded): the
    compiled graph calls it without Python, so this is how to see that the sparse kernel ran."""
    if _loaded_path is None:
        return 0
    return int(torch.ops.sparse_compile.tile_linear_calls())


def _padded(tile_size: int) -> int:
    return -(-tile_size // _PACKED_COLUMNS) * _PACKED_COLUMNS


# The packed layouts of cpu_tile_mm.cpp: fp32 [tiles, t, padded], or bf16 pairs
# [tiles, ceil(t / 2), padded, 2] for the CPU's bf16 dot products.
_FP32, _BF16_PAIRS = 0, 1
_DTYPES = (torch.float32, torch.bfloat16)


def native_bfloat16() -> bool:
    """Whether the built kernel multiplies bf16 with the CPU's own bf16 dot products (AVX-512 BF16:
    decided when the kernel is compiled for this host). Else bf16 is computed in fp32 registers."""
    return _library.get() is not None and bool(torch.ops.sparse_compile.tile_native_bf16())


def native_amx() -> bool:
    """Whether bf16 products can run on the CPU's AMX tile unit (Sapphire Rapids and later, on a
    Linux kernel that grants the tile state): the kernel was built for AMX-BF16 here. Then calls
    with bf16 pairs, tiles of a multiple of 16 and K a multiple of the tile size run rows in
    blocks of 16 on AMX (the rest on AVX-512 BF16), unless turned off (:func:`use_amx`)."""
    return _library.get() is not None and bool(torch.ops.sparse_compile.tile_native_amx())


def use_amx(enabled: bool) -> bool:
    """Turns the AMX path on or off for later calls in this process, returning whether it was on
    (off for good where :func:`native_amx` is False). For tests of the AVX-512 BF16 path and A/B
    benchmarks on an AMX host; ``SPARSE_COMPILE_CPU_AMX=0`` starts a process with it off."""
    load()
    return bool(torch.ops.sparse_compile.tile_set_amx(bool(enabled)))


def native_wide_fp32() -> bool:
    """Whether the fp32 path computes in 16-float (AVX-512) vectors: the kernel was built for a CPU
    with AVX-512 (F, BW, VL). Else in 8-float ones. On by default where built (:func:`use_wide_fp32`)."""
    return _library.get() is not None and bool(torch.ops.sparse_compile.tile_native_wide_fp32())


def use_wide_fp32(enabled: bool) -> bool:
    """Turns the fp32 path's 16-float vectors on or off for later calls in this process, returning
    whether they were on (off for good where :func:`native_wide_fp32` is False): for tests of the
    8-float path on an AVX-512 host and A/B benchmarks."""
    load()
    return bool(torch.ops.sparse_compile.tile_set_wide_fp32(bool(enabled)))


def wide_fp32_calls() -> int:
    """How many kernel calls in this process ran the fp32 path in 16-float vectors (0 before the
    library is loaded): how a test sees which width ran."""
    if _loaded_path is None:
        return 0
    return int(torch.ops.sparse_compile.tile_wide_fp32_calls())


def amx_calls() -> int:
    """How many kernel calls in this process ran rows on AMX tiles (0 before the library is loaded)."""
    if _loaded_path is None:
        return 0
    return int(torch.ops.sparse_compile.tile_amx_calls())


def _packed_format(a_dtype: torch.dtype, weight_dtype: torch.dtype, native_bf16: Optional[bool]) -> int:
    """Pairs for bf16 activations and weights (or fp32 master weights rounded to bf16) where the CPU
    has bf16 dot products; ``native_bf16=False`` forces the fp32 path (tests of the other hosts' path)."""
    if a_dtype != torch.bfloat16 or weight_dtype not in _DTYPES:
        return _FP32
    if native_bf16 is None:
        native_bf16 = native_bfloat16()
    elif native_bf16 and not native_bfloat16():
        raise RuntimeError("the CPU tile kernel was not built with bf16 dot products on this host (no AVX-512 BF16)")
    return _BF16_PAIRS if native_bf16 else _FP32


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
    load()
    _check_dtypes(a, w_nk)
    n, k = w_nk.shape
    packed_format = _packed_format(a.dtype, w_nk.dtype, native_bf16)
    round_bf16 = round_weight_to_bfloat16 or a.dtype == torch.bfloat16
    packed, row_ptr, col_idx = torch.ops.sparse_compile.tile_pack_masked(
        w_nk.detach(), tile_mask_nk.detach(), tile_size, kept, packed_format, round_bf16
    )
    return _tile_linear(a, packed, row_ptr, col_idx, bias, n, k, tile_size, packed_format)


def _tile_linear(a, packed, row_ptr, col_idx, bias, n, k, t, packed_format) -> Tensor:
    bias = None if bias is None else bias.detach()
    return torch.ops.sparse_compile.tile_linear(a.detach(), packed, row_ptr, col_idx, bias, n, k, t, packed_format)


def pack_bsr_values(values: Tensor, activation_dtype: torch.dtype) -> tuple[Tensor, int]:
    """BSR ``values [blocks, b, b]`` in the layout ``tile_linear`` reads for activations of
    ``activation_dtype``, and that layout's number (its ``packed_format`` argument): bf16 pairs
    for bf16 values and activations where the CPU has bf16 dot products, else fp32 (other float
    dtypes converted). Done once per converted weight; the graph keeps the result."""
    load()
    packed_format = _packed_format(activation_dtype, values.dtype, None) if values.dtype == torch.bfloat16 else _FP32
    return torch.ops.sparse_compile.tile_pack_blocks(values.detach(), packed_format), packed_format


def bsr_mm(
    a: Tensor, values: Tensor, crow_indices: Tensor, col_indices: Tensor, bias: Optional[Tensor], out_features: int,
    native_bf16: Optional[bool] = None,
) -> Tensor:
    """``a [M, K] @ W^T + bias`` -> ``[M, out_features]`` in ``a``'s dtype for a BSR weight (the
    ``bsr_linear`` op's tensors: ``values [blocks, b, b]``, ``crow_indices``, ``col_indices``), CPU
    tensors. ``a`` fp32 or bf16, ``bias`` fp32; ``values`` fp32, fp16 or bf16, converted once per
    values tensor into the layout the kernel reads (see ``_packed_bsr``): bf16 pairs for the CPU's
    bf16 dot products when ``a`` and ``values`` are bf16 (as :func:`tile_mm`), else fp32."""
    load()
    _check_dtypes(a)
    blocks, t = values.shape[0], values.shape[1]
    packed_format = _packed_format(a.dtype, values.dtype, native_bf16) if values.dtype == torch.bfloat16 else _FP32
    packed = _packed_bsr_blocks(values, packed_format)
    row_ptr = crow_indices.to(torch.int32).contiguous()
    col_idx = col_indices.to(torch.int32).contiguous() if blocks else torch.zeros(1, dtype=torch.int32)
    return _tile_linear(a, packed, row_ptr, col_idx, bias, out_features, a.shape[1], t, packed_format)


# Packed blocks per BSR values tensor and layout, made at its first call and reused while the
# tensor lives unchanged: for direct eager calls of the BSR op with the same weight (the sparse
# backend packs its converted layers once, at conversion: pack_bsr_values). Packing costs a third
# of a ViT-B MLP's call at 50 rows (0.16 of 0.49 ms; 2 threads, 90% sparse blocks of 32). Keyed by
# id and layout; an entry is used only for the same live tensor at the same version (an in-place
# change packs again) and dropped with it.
_packed_bsr: dict[tuple[int, int], tuple["weakref.ref[Tensor]", int, Tensor]] = {}


def _packed_bsr_blocks(values: Tensor, packed_format: int) -> Tensor:
    try:
        version = values._version
    except RuntimeError:  # an inference-mode tensor has no version counter: pack, keep nothing
        version = None
    key = (id(values), packed_format)
    entry = _packed_bsr.get(key)
    if entry is not None and version is not None and entry[0]() is values and entry[1] == version:
        return entry[2]
    packed = torch.ops.sparse_compile.tile_pack_blocks(values.detach(), packed_format)
    counters["sparse_compile"]["cpu_bsr_blocks_packed"] += 1
    if version is not None:
        if entry is None or entry[0]() is not values:
            weakref.finalize(values, _packed_bsr.pop, key, None)
        _packed_bsr[key] = (weakref.ref(values), version, packed)
    return packed
