"""The options of the ``sparse`` backend, validated once, with errors that name the fix.

``torch.compile(model, backend="sparse", options={...})`` passes the dict through Dynamo to the
backend untouched, so every check a user relies on has to happen here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

#: Block sizes the BSR kernel is written for. Smaller blocks waste the tensor cores, larger ones
#: rarely find empty blocks in a learned mask.
CANDIDATE_BLOCKSIZES = (16, 32, 64, 128)

#: A linear layer becomes BSR when at most this fraction of its blocks hold a nonzero.
#:
#: Why 0.4: the seed reports 532 -> 394 ms for ViT-B/16 at 80% block sparsity (A100, torch's BSR
#: kernel), a 1.35x model speedup, which puts the linear-layer crossover near 50-60% sparsity;
#: 0.4 (60% of the blocks empty) keeps a margin so that a layer the pass converts is not slower
#: than dense. Our own GPU timings will replace this number (see the README's "Decision" section);
#: users with other hardware set ``density_threshold`` themselves.
DEFAULT_DENSITY_THRESHOLD = 0.4

#: Torch.compile modes the backend maps onto Inductor's own settings for them.
SUPPORTED_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class SparseOptions:
    """What ``options=`` of ``torch.compile(..., backend="sparse")`` may contain.

    Attributes:
        blocksize: side of the square BSR blocks, one of 16, 32, 64, 128, or ``"auto"`` to pick,
            per layer, the candidate size with the lowest estimated cost.
        density_threshold: a layer is converted to BSR when its block density (stored blocks /
            all blocks) is at most this; denser layers stay dense. ``0`` converts only layers
            whose weight is all zeros, ``1`` converts every supported layer.
    """

    blocksize: int | str = "auto"
    density_threshold: float = DEFAULT_DENSITY_THRESHOLD

    def __post_init__(self) -> None:
        blocksize = self.blocksize
        if isinstance(blocksize, str):
            if blocksize != "auto":
                raise ValueError(
                    f"sparse backend: blocksize={blocksize!r} is not valid; use 'auto' or one of "
                    f"{list(CANDIDATE_BLOCKSIZES)}"
                )
        elif isinstance(blocksize, bool) or not isinstance(blocksize, int):
            raise TypeError(
                f"sparse backend: blocksize must be an int or 'auto', got {type(blocksize).__name__}"
            )
        elif blocksize not in CANDIDATE_BLOCKSIZES:
            hint = "a power of two " if blocksize & (blocksize - 1) else ""
            raise ValueError(
                f"sparse backend: blocksize={blocksize} is not supported; use {hint}one of "
                f"{list(CANDIDATE_BLOCKSIZES)} or 'auto'"
            )
        threshold = self.density_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(
                "sparse backend: density_threshold must be a number in [0, 1], "
                f"got {type(threshold).__name__}"
            )
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(
                f"sparse backend: density_threshold={threshold} is outside [0, 1]; it is the "
                "largest fraction of nonzero blocks a layer may have and still be converted"
            )

    @classmethod
    def from_user(cls, options: Mapping[str, Any] | None) -> "SparseOptions":
        """Builds the options from the dict a user gave ``torch.compile``; unknown keys are errors."""
        if options is None:
            return cls()
        if isinstance(options, SparseOptions):
            return options
        if not isinstance(options, Mapping):
            raise TypeError(
                f"sparse backend: options must be a dict, got {type(options).__name__}"
            )
        valid = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"sparse backend: unknown option(s) {unknown}; valid options are {valid}"
            )
        return cls(**options)

    @property
    def blocksizes(self) -> tuple[int, ...]:
        """The block sizes to measure each weight at."""
        if self.blocksize == "auto":
            return CANDIDATE_BLOCKSIZES
        return (int(self.blocksize),)


def inductor_config_for_mode(mode: str | None) -> dict[str, Any]:
    """Inductor settings for a torch.compile ``mode``, as Inductor itself would apply them."""
    if mode is None or mode == "default":
        return {}
    if mode not in SUPPORTED_MODES:
        raise ValueError(
            f"sparse backend: unknown mode {mode!r}; valid modes are {list(SUPPORTED_MODES)}"
        )
    return dict(torch._inductor.list_mode_options(mode))
