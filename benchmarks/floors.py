"""The floor of a benchmark row: the time below which no kernel can go on a given GPU.

``floor = max(FLOPs / peak FLOP/s, bytes / HBM bandwidth)``: the work a kernel cannot avoid
(multiply the stored weights, read the input, the stored weights with their indices and the
bias once, write the output once) at the GPU's data-sheet peak. A real kernel also pays for
launch, tails, imperfect overlap and L2 misses, so a measured time is always above its floor;
"% of floor" (floor / measured) says how close a row gets. The model ignores caches (a weight
that stays in L2 across calls would beat the bandwidth term) and assumes perfect overlap.

Peaks are NVIDIA's data-sheet numbers (dense tensor-core rates; 2:4 sparse rates are exactly
twice these), per dtype: fp32 on CUDA cores, fp32 with TF32 and fp16/bf16 on tensor cores.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    fp32: float  # FLOP/s on CUDA cores (fp32 without TF32)
    tf32: float  # dense tensor-core FLOP/s
    half: float  # dense fp16/bf16 tensor-core FLOP/s
    bandwidth: float  # HBM bytes/s

    def flop_rate(self, dtype: torch.dtype, tf32: bool, sparse_24: bool = False) -> float:
        """Peak FLOP/s for ``dtype``; ``sparse_24``: the 2:4 structured-sparse tensor-core rate."""
        if dtype == torch.float32 and not tf32:
            return self.fp32  # no 2:4 rate on CUDA cores
        rate = self.tf32 if dtype == torch.float32 else self.half
        return 2 * rate if sparse_24 else rate


#: Matched against the device name in this order (more specific first). Sources: the A100
#: data sheet (80 GB SXM: 2039 GB/s) and the H100 / H200 data sheets (SXM5 unless named).
GPUS = [
    Gpu("H100 PCIe", fp32=51.2e12, tf32=378e12, half=756e12, bandwidth=2.0e12),
    Gpu("H100", fp32=66.9e12, tf32=494.7e12, half=989.4e12, bandwidth=3.35e12),
    Gpu("H200", fp32=66.9e12, tf32=494.7e12, half=989.4e12, bandwidth=4.8e12),
    Gpu("A100", fp32=19.5e12, tf32=156e12, half=312e12, bandwidth=2.039e12),
]
GPUS_BY_FLAG = {"a100": GPUS[3], "h100": GPUS[1], "h200": GPUS[2], "h100-pcie": GPUS[0]}

#: What a CPU run shows: the GPU its rows would be compared with (the project's target).
DEFAULT_OFFLINE_GPU = "h100"


def gpu_for(device: torch.device, flag: str | None = None) -> Gpu | None:
    """The GPU whose floor a run prints: ``--floor-gpu``, else this CUDA device, else H100."""
    if flag is not None:
        return GPUS_BY_FLAG[flag]
    if device.type != "cuda":
        return GPUS_BY_FLAG[DEFAULT_OFFLINE_GPU]
    name = torch.cuda.get_device_name(device)
    return next((gpu for gpu in GPUS if gpu.name in name), None)


@dataclasses.dataclass(frozen=True)
class Linear:
    """``x [m, k] @ W^T [k, n] + bias`` with ``stored`` of W's ``n * k`` weights actually stored."""

    m: int
    k: int
    n: int
    dtype: torch.dtype
    stored: int | None = None  # None: dense, all n * k
    index_bytes: int = 0  # BSR row pointers and column indices
    bias: bool = True
    sparse_24: bool = False  # runs on 2:4 sparse tensor cores (stored = n * k / 2 then)

    @property
    def flops(self) -> float:
        return 2 * self.m * (self.n * self.k if self.stored is None else self.stored)

    @property
    def bytes(self) -> float:
        elem = self.dtype.itemsize
        weights = self.n * self.k if self.stored is None else self.stored
        return (self.m * self.k + self.m * self.n + weights + self.n * self.bias) * elem + self.index_bytes


def floor_ms(linears: list[Linear] | Linear, gpu: Gpu | None, tf32: bool) -> float | None:
    """Sum of each linear's ``max(FLOPs / peak, bytes / bandwidth)`` in ms (``None``: no GPU)."""
    if gpu is None:
        return None
    if isinstance(linears, Linear):
        linears = [linears]
    total = 0.0
    for lin in linears:
        compute = lin.flops / gpu.flop_rate(lin.dtype, tf32, lin.sparse_24)
        total += max(compute, lin.bytes / gpu.bandwidth)
    return total * 1e3


def bsr_linear(m: int, weight: torch.Tensor, blocksize: int, dtype: torch.dtype, bias: bool = True) -> Linear:
    """The :class:`Linear` of a BSR kernel on ``weight`` ``[n, k]``: only nonzero blocks stored."""
    n, k = weight.shape
    blocks = stored_blocks(weight, blocksize)
    rows = -(-n // blocksize)
    return Linear(m, k, n, dtype, stored=blocks * blocksize**2, index_bytes=(blocks + rows + 1) * 4, bias=bias)


def stored_blocks(weight: torch.Tensor, blocksize: int) -> int:
    """Blocks of ``weight`` with at least one nonzero (the edge zero-padded to whole blocks)."""
    n, k = weight.shape
    b = blocksize
    padded = torch.nn.functional.pad(weight.detach(), (0, -k % b, 0, -n % b))
    nonzero = padded.reshape(padded.shape[0] // b, b, padded.shape[1] // b, b).ne(0).any(dim=3).any(dim=1)
    return int(nonzero.sum())


def percent_of_floor(floor: float | None, measured_ms: float | None, device: torch.device) -> float | None:
    """``100 * floor / measured``; ``None`` on CPU (a CPU time against a GPU floor means nothing)."""
    if floor is None or measured_ms is None or device.type != "cuda" or measured_ms <= 0:
        return None
    return 100.0 * floor / measured_ms
