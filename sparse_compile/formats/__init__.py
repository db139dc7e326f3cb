"""The sparse formats the ``sparse`` backend knows, in the order it prefers them.

Each format is one analysis rule (a module here), one op and one kernel file (in ``kernels/``);
see :mod:`sparse_compile.formats.base` for what the backend asks of a format. Adding a format:
write its rule module and its kernel file, add its object to :data:`FORMATS`, add a test.

Under a numeric ``density_threshold`` the first format that takes a weight wins (BSR before
2:4: a weight with whole empty blocks skips more work as BSR); under ``"auto"`` every
candidate of every format is timed against dense.
"""

from __future__ import annotations

from sparse_compile.formats.base import DENSE, Candidate, ConvertedWeight, LayerDecision, SparseFormat, ThresholdChoice
from sparse_compile.formats.bsr import BSR
from sparse_compile.formats.semi_structured import SEMI_STRUCTURED

#: name -> format, in order of preference.
FORMATS: dict[str, SparseFormat] = {f.name: f for f in (BSR, SEMI_STRUCTURED)}


def get(name: str) -> SparseFormat:
    """The format called ``name`` (``"bsr"``, ...)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"sparse_compile: no sparse format {name!r}; known formats are {list(FORMATS)}") from None


def supported_dtypes() -> tuple:
    """Every dtype some format takes (a weight of any other dtype stays dense)."""
    seen: list = []
    for fmt in FORMATS.values():
        seen.extend(d for d in fmt.dtypes if d not in seen)
    return tuple(seen)


__all__ = [
    "DENSE",
    "FORMATS",
    "Candidate",
    "ConvertedWeight",
    "LayerDecision",
    "SparseFormat",
    "ThresholdChoice",
    "get",
    "supported_dtypes",
]
