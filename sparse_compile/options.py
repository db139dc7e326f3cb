"""The options of the ``sparse`` backend, validated once, with errors that name the fix.

``torch.compile(model, backend="sparse", options={...})`` passes the dict through Dynamo to the
backend untouched, so every check a user relies on has to happen here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from sparse_compile.formats import FORMATS, SparseFormat
from sparse_compile.kernels.bsr_linear import BLOCKSIZES

#: Block sizes ``blocksize`` may take: those the BSR kernel is written for (their one source is
#: its file).
CANDIDATE_BLOCKSIZES = BLOCKSIZES

#: ``density_threshold`` default: measure, per layer, dense against BSR at each candidate block
#: size on the device the layer runs on, and keep the fastest (``sparse_compile/measure.py``).
#: No fixed density crossover holds across devices, shapes, row counts and CPU paths: on this
#: project's 2-core CPU the tile kernel (the CPU default) ran ViT-B's MLP 5x faster than dense
#: at 10% block density and 1.2x at 50%, the gathered block matmuls (the path without a C++
#: compiler) 1.9x faster at 10% but 6.6x slower at 50% (kernels/bsr_linear.py), and torch's BSR
#: kernel on an A100 crosses over near 50-60%.
AUTO = "auto"
DEFAULT_DENSITY_THRESHOLD = AUTO

#: ``min_saving_ms`` default, per device type (``"auto"``; other devices take the CPU's): a sparse
#: candidate must save more than this per call over dense, beyond the measured spread. On CPU a
#: 128-wide layer's call is mostly per-call overhead (issue 21: every candidate of GPT-2 tiny's
#: 48x128x512 layers measured 0.09-0.18 ms, ~0.03 ms of it arithmetic), where a few hundredths
#: of a ms decide by noise and by what the per-layer timing cannot see (the graph's memory
#: traffic, the dense layer's fused epilogue). A GPU layer call takes microseconds.
MIN_SAVING_MS = {"cpu": 0.02, "cuda": 0.005}

#: Torch.compile modes the backend maps onto Inductor's own settings for them.
SUPPORTED_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class SparseOptions:
    """What ``options=`` of ``torch.compile(..., backend="sparse")`` may contain.

    Attributes:
        blocksize: side of the square BSR blocks, one of 16, 32, 64, 128, or ``"auto"``: with
            ``density_threshold="auto"`` every candidate size is timed; with a number, the size
            with the lowest estimated cost (``analysis.BLOCK_OVERHEAD``) is taken.
        density_threshold: ``"auto"`` (default): a layer runs as BSR when BSR was measured faster
            than dense for its shape, dtype, rows and block density on its device (timings are
            cached on disk, see ``sparse_compile.measure``). A number in [0, 1]: no timing; a layer
            is converted when its block density (stored blocks / all blocks) is at most this.
            ``0`` converts only all-zero weights, ``1`` every supported layer.
        formats: the sparse formats the backend may use (default: all, see
            ``sparse_compile.formats.FORMATS``); e.g. ``("bsr",)`` switches the others off. Under a
            numeric threshold they are tried in the order of ``FORMATS``, whatever the order here.
        check_graph: with ``density_threshold="auto"``, when some layer runs sparse, time the
            compiled graph against the same graph compiled by Inductor alone (with freezing) on
            the traced inputs, and keep the rewrite only where it wins beyond the noise; else
            the graph runs as Inductor alone compiles it (``sparse_compile.measure``: the
            whole-graph check; the plain graph is not compiled when the rewritten graph alone
            is far below the dense time of its linear layers: the floor shortcut). ``False``
            skips the check (one Inductor compile less).
        min_saving_ms: with ``density_threshold="auto"``, a sparse candidate runs only when it
            saves more than this per call (ms) over dense, and more than the measured spread
            (``docs/measurement.md``: the tie rule). ``"auto"`` (default): :data:`MIN_SAVING_MS`
            for the layer's device (0.02 ms on CPU, 0.005 ms on CUDA).
    """

    blocksize: int | str = AUTO
    density_threshold: float | str = DEFAULT_DENSITY_THRESHOLD
    formats: tuple[str, ...] | None = None
    check_graph: bool = True
    min_saving_ms: float | str = AUTO

    def __post_init__(self) -> None:
        self._check_formats()
        saving = self.min_saving_ms
        if isinstance(saving, bool) or not (saving == AUTO or isinstance(saving, (int, float))):
            raise TypeError(f"sparse backend: min_saving_ms must be 'auto' or a number of ms >= 0, got {saving!r}")
        if not isinstance(saving, str) and not 0.0 <= float(saving) < float("inf"):
            raise ValueError(f"sparse backend: min_saving_ms={saving} must be a number of ms >= 0 (or 'auto')")
        if not isinstance(self.check_graph, bool):
            raise TypeError(
                f"sparse backend: check_graph must be True or False, got {self.check_graph!r}"
            )
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
        if isinstance(threshold, str):
            if threshold != AUTO:
                raise ValueError(
                    f"sparse backend: density_threshold={threshold!r} is not valid; use 'auto' "
                    "(measure each layer) or a number in [0, 1]"
                )
            return
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(
                "sparse backend: density_threshold must be 'auto' or a number in [0, 1], "
                f"got {type(threshold).__name__}"
            )
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(
                f"sparse backend: density_threshold={threshold} is outside [0, 1]; it is the "
                "largest fraction of nonzero blocks a layer may have and still be converted"
            )

    def _check_formats(self) -> None:
        if self.formats is None:
            object.__setattr__(self, "formats", tuple(FORMATS))
            return
        given = (self.formats,) if isinstance(self.formats, str) else self.formats
        if not isinstance(given, (tuple, list)) or not all(isinstance(name, str) for name in given):
            raise TypeError(
                f"sparse backend: formats must be a list of format names from {list(FORMATS)}, "
                f"got {self.formats!r}"
            )
        unknown = [name for name in given if name not in FORMATS]
        if unknown:
            raise ValueError(f"sparse backend: unknown format(s) {unknown}; valid formats are {list(FORMATS)}")
        if not given:
            raise ValueError(
                f"sparse backend: formats is empty, so nothing could run sparse; give some of {list(FORMATS)} "
                "(or compile with backend='inductor')"
            )
        object.__setattr__(self, "formats", tuple(name for name in FORMATS if name in given))

    def sparse_formats(self) -> list[SparseFormat]:
        """The :class:`~sparse_compile.formats.SparseFormat` objects enabled, in order of preference."""
        return [FORMATS[name] for name in self.formats]

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
    def measured(self) -> bool:
        """True when the choice is timed (``density_threshold="auto"``), not read off a threshold."""
        return self.density_threshold == AUTO

    def min_saving_ms_for(self, device_type: str) -> float:
        """The least saving per call (ms) a sparse candidate needs on ``device_type``."""
        if self.min_saving_ms == AUTO:
            return MIN_SAVING_MS.get(device_type, MIN_SAVING_MS["cpu"])
        return float(self.min_saving_ms)

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
