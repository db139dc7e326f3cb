"""``--plot out.png``: speedup over dense against sparsity, one panel per block size.

matplotlib is an optional extra of the benchmarks (``pip install -e .[bench]``), imported only
when a plot is asked for, so the tables run without it.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Point:
    """One sparse row: ``speedup`` = dense median / this row's median (``None``: no valid time)."""

    panel: str  # a row of panels: dtype, or dtype and shape
    blocksize: int
    variant: str
    sparsity: float
    speedup: float | None
    floor_speedup: float | None = None  # dense floor / this row's floor: the best a GPU could show


def require_matplotlib() -> None:
    """Fails before any work when --plot is given without matplotlib installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise SystemExit(f"--plot needs matplotlib: pip install -e '.[bench]' ({error})") from None


def plot_speedups(path: str, title: str, baseline: str, points: Sequence[Point], floor_label: str | None) -> None:
    """Writes ``path``: a grid of panels (rows: ``panel``, columns: block size), x = sparsity,
    y = speedup over ``baseline``; one line per variant, the floor's speedup dashed."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(p.panel for p in points))
    blocks = sorted({p.blocksize for p in points})
    fig, axes = plt.subplots(
        len(panels), len(blocks), figsize=(4.5 * len(blocks), 3.6 * len(panels)), squeeze=False, sharey=True
    )
    for i, panel in enumerate(panels):
        for j, block in enumerate(blocks):
            ax = axes[i][j]
            lines: dict[str, list[Point]] = defaultdict(list)
            for p in points:
                if p.panel == panel and p.blocksize == block:
                    lines[p.variant].append(p)
            for variant, pts in lines.items():
                pts = sorted((p for p in pts if p.speedup is not None), key=lambda p: p.sparsity)
                if pts:
                    ax.plot([p.sparsity * 100 for p in pts], [p.speedup for p in pts], marker="o", label=variant)
            floor = sorted(
                {(p.sparsity, p.floor_speedup) for p in points
                 if p.panel == panel and p.blocksize == block and p.floor_speedup is not None}
            )
            if floor and floor_label:
                ax.plot([s * 100 for s, _ in floor], [f for _, f in floor], "k--", label=floor_label)
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_title(f"{panel}, block {block}", fontsize=10)
            ax.set_xlabel("sparsity (% of blocks pruned)")
            if j == 0:
                ax.set_ylabel(f"speedup over {baseline}")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
