"""torchrun / DDP: two gloo processes on localhost train exactly like one process on the same global batch."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("torchvision")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from sparse_compile.training import train as train_cli  # noqa: E402

from test_cli import SUPERMASK, TINY_VIT, make_image_folder  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_argv(data_path, out, batch_size):
    # --no-augment: the images of a step must be the same tensors however they are split.
    # 24 train images: 3 steps of a global batch of 8, as 1 x 8 or as 2 x 4.
    argv = ["--data-path", str(data_path), "--device", "cpu", "--workers", "0", "--epochs", "1", "--no-augment"]
    argv += ["--batch-size", str(batch_size), "--lr", "0.1", "--print-freq", "1", "--output-dir", str(out)]
    return argv + TINY_VIT


def _spawned_worker(rank: int, world_size: int, port: int, argv: list[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    train_cli.main(argv)


def model_state(out) -> dict:
    return torch.load(os.path.join(out, "checkpoint.pth"), map_location="cpu", weights_only=True)["model"]


def assert_states_close(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def acc_lines(text: str) -> list[str]:
    return re.findall(r"Test:  Acc@1 \S+ Acc@5 \S+", text)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ddpdata"))


def test_two_gloo_processes_match_one_process(data_path, tmp_path, capfd):
    single = train_cli.run(run_argv(data_path, tmp_path / "single", batch_size=8))
    capfd.readouterr()

    argv = run_argv(data_path, tmp_path / "ddp", batch_size=4)
    mp.start_processes(_spawned_worker, args=(2, free_port(), argv), nprocs=2, join=True, start_method="spawn")
    out = capfd.readouterr().out

    assert_states_close(model_state(tmp_path / "ddp"), model_state(tmp_path / "single"))
    assert "world_size=2" in out
    # Rank 0 alone prints; its accuracy counts every val image once, over both shards.
    assert acc_lines(out) == [f"Test:  Acc@1 {single['acc1']:.3f} Acc@5 {single['acc5']:.3f}"]
    assert len(re.findall(r"^Epoch: \[0\] \[0/3\]", out, flags=re.M)) == 1


def test_torchrun_supermask_matches_one_process(data_path, tmp_path):
    single = train_cli.run(run_argv(data_path, tmp_path / "single", batch_size=8) + SUPERMASK)

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"]
    cmd += ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    cmd += ["-m", "sparse_compile.training.train"] + run_argv(data_path, tmp_path / "ddp", batch_size=4) + SUPERMASK
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    state = model_state(tmp_path / "ddp")
    assert any("scores" in k for k in state)
    assert_states_close(state, model_state(tmp_path / "single"))
    assert acc_lines(r.stdout) == [f"Test:  Acc@1 {single['acc1']:.3f} Acc@5 {single['acc5']:.3f}"]


def _first_batch_worker(rank: int, world_size: int, port: int, argv: list[str], out: str) -> None:
    """A training process that saves the images of its first step and trains no further."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)

    def save_first_batch(model, criterion, optimizer, loader, *args, **kwargs):
        images, _ = next(iter(loader))
        torch.save(images, os.path.join(out, f"rank{rank}.pt"))
        return 0.0

    train_cli.train_one_epoch = save_first_batch
    train_cli.main(argv)


def test_ra_sampler_copies_are_augmented_differently_on_each_rank(data_path, tmp_path):
    # RASampler with 2 ranks and 3 repetitions deals the stream a a a b b b ...: rank 0 gets
    # a, a, b and rank 1 gets a, b, b, so both batches start with image a. Each process
    # augments it (random crop and flip) as its first draw: with the same seed on every rank the
    # two "repetitions" were the same tensor, which defeats repeated augmentation.
    argv = ["--data-path", str(data_path), "--device", "cpu", "--workers", "0", "--epochs", "1"]
    argv += ["--batch-size", "3", "--ra-sampler", "--ra-reps", "3", "--print-freq", "0"] + TINY_VIT
    mp.start_processes(
        _first_batch_worker, args=(2, free_port(), argv, str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    first = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert first[0].shape == first[1].shape == (3, 3, 16, 16)
    assert not torch.equal(first[0][0], first[1][0])
