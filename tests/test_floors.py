"""The floor model of benchmarks/floors.py: FLOPs at the dtype's peak or bytes at HBM bandwidth."""

import pytest
import torch

from benchmarks import floors

H100 = floors.GPUS_BY_FLAG["h100"]


def test_a_large_half_matmul_is_compute_bound_at_the_tensor_core_peak():
    lin = floors.Linear(m=50432, k=768, n=3072, dtype=torch.bfloat16)
    assert floors.floor_ms(lin, H100, tf32=False) == pytest.approx(2 * 50432 * 768 * 3072 / 989.4e12 * 1e3)


def test_a_single_row_is_memory_bound_at_hbm_bandwidth():
    lin = floors.Linear(m=1, k=4096, n=4096, dtype=torch.float16)
    nbytes = (4096 + 4096 + 4096 * 4096 + 4096) * 2
    assert floors.floor_ms(lin, H100, tf32=False) == pytest.approx(nbytes / 3.35e12 * 1e3)


@pytest.mark.parametrize(
    "dtype, tf32, sparse_24, rate",
    [
        (torch.float32, False, False, 66.9e12),
        (torch.float32, False, True, 66.9e12),  # CUDA cores have no 2:4 rate
        (torch.float32, True, False, 494.7e12),
        (torch.float32, True, True, 2 * 494.7e12),
        (torch.float16, False, False, 989.4e12),
        (torch.bfloat16, True, True, 2 * 989.4e12),
    ],
)
def test_peak_per_dtype_and_2_4(dtype, tf32, sparse_24, rate):
    assert H100.flop_rate(dtype, tf32, sparse_24) == rate


def test_bsr_counts_only_stored_blocks_and_their_indices():
    w = torch.zeros(96, 70)  # 3 x 3 blocks of 32, the last block column padded
    w[0, 0] = 1.0
    w[40, 69] = 1.0  # inside the padded edge block
    lin = floors.bsr_linear(m=8, weight=w, blocksize=32, dtype=torch.float32)
    assert floors.stored_blocks(w, 32) == 2
    assert lin.stored == 2 * 32 * 32
    assert lin.index_bytes == (2 + 3 + 1) * 4  # col indices + row pointers, int32
    assert lin.flops == 2 * 8 * 2 * 32 * 32


def test_cpu_runs_show_the_target_gpu_floor_but_no_percentage():
    cpu = torch.device("cpu")
    assert floors.gpu_for(cpu) is H100
    assert floors.gpu_for(cpu, "a100").name == "A100"
    assert floors.percent_of_floor(1.0, 2.0, cpu) is None
    assert floors.percent_of_floor(1.0, 2.0, torch.device("cuda")) == 50.0
