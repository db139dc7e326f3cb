"""Triton kernels, their launchers and the ``torch.ops.sparse_compile.*`` ops.

Importing this package registers ``torch.ops.sparse_compile.bsr_linear``,
``semi_structured_linear`` (2:4, torch's kernels) and the masked ops (``masked_linear``,
``masked_linear_input_grad``, ``tile_masked_weight``). Triton is optional:
without it the ops have their CPU implementations only (``HAS_TRITON``, ``kernel_unavailable_reason``).
"""

# This folder sits at the repository root, where ``python -m``, ``python -c`` and pytest put it on
# ``sys.path`` as a top-level package ``kernels``: a name other libraries own (transformers probes
# for Hugging Face's ``kernels`` by importing it). Imported under that name it would run a second
# time and register the ``torch.ops.sparse_compile`` ops twice. ImportError is what such probes
# expect from a package they cannot use.
if __name__ != "sparse_compile.kernels":
    raise ImportError(
        f"{__name__!r} is a folder of sparse_compile, installed as sparse_compile.kernels, not a "
        "package of its own: use `import sparse_compile.kernels`",
        name=__name__,
    )

from .bsr_format import BsrWeight, block_mask
from .bsr_linear import HAS_TRITON, SUPPORTED_DTYPES, bsr_linear, bsr_linear_triton, kernel_unavailable_reason
from .masked_linear import masked_linear, tile_masked_weight
from .semi_structured import semi_structured_linear

__all__ = [
    "BsrWeight",
    "block_mask",
    "bsr_linear",
    "bsr_linear_triton",
    "kernel_unavailable_reason",
    "HAS_TRITON",
    "SUPPORTED_DTYPES",
    "masked_linear",
    "semi_structured_linear",
    "tile_masked_weight",
]

# The CPU tile kernel's ops (``torch.ops.sparse_compile.tile_linear`` ...) exist once its library
# is loaded: load it now if this machine built it before (no compiling at import), so that a graph
# or package saved with calls to them runs in this process. Otherwise the first use builds it.
from . import cpu_tile_mm as _cpu_tile_mm

_cpu_tile_mm.load_if_built()
