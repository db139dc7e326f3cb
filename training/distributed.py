"""torchrun / DDP plumbing for the train and evaluate programs.

A process started by ``torchrun`` finds ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its
environment; :func:`init_distributed` joins the process group from there (gloo on CPU, nccl on
CUDA). Without those variables everything runs as a single process and the helpers below
behave as rank 0 of a world of one, so the programs have one code path.

Also here: the samplers (a shuffling one for training, the repeated-augmentation one of
``--ra-sampler``, a padding-free one for evaluation so that accuracy counts every validation
image exactly once) and the progress logger, which averages its numbers over all processes.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler


@dataclass
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool  # True when this call joined a process group (so it must leave it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the torchrun process group if the environment says there is one.

    ``device`` is what the user asked for (``cpu``, ``cuda``, ``cuda:1``...). Under torchrun
    with CUDA each process takes the GPU of its ``LOCAL_RANK``.
    """
    requested = torch.device(device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, requested, distributed=False)

    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if requested.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA device is available")
        requested = torch.device("cuda", local_rank)
        torch.cuda.set_device(requested)
        backend = "nccl"
    else:
        backend = "gloo"
    if dist.is_initialized():  # e.g. a caller that set the group up itself
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, requested, distributed=False)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, requested, distributed=True)


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        # Free the DDP wrapper first (its reducer holds the process group; left to interpreter
        # shutdown, gloo's threads can abort the process), then leave together.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def print_main(*args, **kwargs) -> None:
    """``print`` on rank 0 only; other ranks stay quiet."""
    if is_main_process():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def save_on_main(obj, path) -> None:
    """Save on rank 0 only, atomically (a crash mid-save keeps the previous file; see ``checkpoint.atomic_save``)."""
    if is_main_process():
        from sparse_compile.training.checkpoint import atomic_save

        atomic_save(obj, path)


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all processes (float64, so counts stay exact)."""
    if not is_dist():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------- samplers


def train_sampler(dataset, seed: int, ra_reps: int = 0) -> Sampler[int]:
    """Shuffled sampler, one shard per process; call ``set_epoch`` every epoch.

    Also used by a single process (a world of one): the order then depends only on the seed
    and the epoch, which is what makes ``--resume`` repeat an uninterrupted run. With W
    processes, the global batch of step s holds the same images as a single process with a
    W times larger batch (rank r takes positions r, r+W, ... of the same permutation).
    ``ra_reps > 0``: :class:`RASampler` with that many repetitions instead.
    """
    if ra_reps > 0:
        return RASampler(dataset, seed=seed, repetitions=ra_reps)
    return DistributedSampler(
        dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True, seed=seed, drop_last=False
    )


class RASampler(Sampler[int]):
    """Repeated augmentation (``--ra-sampler``; DeiT, torchvision references' ``RASampler``).

    Each epoch: a permutation of the dataset seeded by ``seed + epoch`` (as
    ``DistributedSampler``, so ``--resume`` repeats an uninterrupted run); every index repeated
    ``repetitions`` times in a row (``a a a b b b ...``), padded from its start to a multiple of
    W, and dealt round-robin: rank r takes positions r, r+W, r+2W, ... So the copies of an image
    go to different ranks (each augments its copy differently) as long as
    ``repetitions <= W``; with one process they land in the same batch.

    Epoch length is the references': ``len(dataset) // 256 * 256 // W`` indices per rank, the
    start of each rank's share, so an epoch has as many steps as without repetition and shows
    about ``1 / repetitions`` of the images. The rounding down to a multiple of 256 comes from
    DeiT; a dataset under 256 images would get an empty epoch, so it is not rounded.
    """

    def __init__(
        self,
        dataset,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        repetitions: int = 3,
    ):
        if repetitions < 1:
            raise ValueError(f"repetitions must be >= 1, got {repetitions}")
        self.n = len(dataset)
        self.num_replicas = get_world_size() if num_replicas is None else num_replicas
        self.rank = get_rank() if rank is None else rank
        self.seed = seed
        self.repetitions = repetitions
        self.epoch = 0
        self.num_samples = math.ceil(self.n * repetitions / self.num_replicas)  # per rank, before the cut
        rounded = self.n // 256 * 256 or self.n
        self.num_selected = rounded // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g)
        repeated = order.repeat_interleave(self.repetitions)
        total = self.num_samples * self.num_replicas
        repeated = torch.cat([repeated, repeated[: total - len(repeated)]])
        return iter(repeated[self.rank : total : self.num_replicas][: self.num_selected].tolist())

    def __len__(self) -> int:
        return self.num_selected


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + W, rank + 2W, ...`` in order, without padding.

    ``DistributedSampler`` repeats images to give every rank the same count, which counts
    them twice in the accuracy; this one does not, and the evaluation sums correct/total
    counts over ranks instead of averaging per-rank accuracies.
    """

    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None):
        self.n = len(dataset)
        self.num_replicas = get_world_size() if num_replicas is None else num_replicas
        self.rank = get_rank() if rank is None else rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))


# --------------------------------------------------------------------------- progress logging


class SmoothedValue:
    """A window of recent values plus the running total, averaged over processes on demand."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})"):
        self.deque: deque[float] = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self, device: torch.device) -> None:
        self.count, self.total = all_reduce_sum([self.count, self.total], device)

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.deque)).median()) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


def format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class MetricLogger:
    """Prints ``header [ step/total]  eta: ...  meter: ...`` every ``print_freq`` steps (rank 0)."""

    def __init__(self, delimiter: str = "  "):
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, n: int = 1, **kwargs: float) -> None:
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            self.meters[k].update(float(v), n=n)

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "") -> Iterator:
        """Yield from ``iterable``; time each step and print the progress line now and then."""
        total = len(iterable)  # type: ignore[arg-type]
        width = len(str(total))
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        start = end = time.time()
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if print_freq > 0 and (i % print_freq == 0 or i == total - 1):
                eta = iter_time.global_avg * (total - i - 1)
                print_main(
                    self.delimiter.join(
                        [
                            f"{header} [{i:>{width}}/{total}]",
                            f"eta: {format_seconds(eta)}",
                            str(self),
                            f"time: {iter_time}",
                            f"data: {data_time}",
                        ]
                    )
                )
            end = time.time()
        print_main(f"{header} Total time: {format_seconds(time.time() - start)}")

