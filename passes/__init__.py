"""FX graph passes of the ``sparse`` backend (``sparse_compile.passes``).

- :class:`~sparse_compile.passes.sparse_linear.SparseLinearPass`: Inductor
  post-grad pass that runs linear layers with sparse constant weights through the op of their
  sparse format (``sparse_compile.formats``: ``bsr_linear``, ...).
- :mod:`~sparse_compile.passes.fused_transformer`: a decomposition of PyTorch's fused
  ``nn.TransformerEncoderLayer`` op into plain ops, so the pass sees its linears.
- :class:`~sparse_compile.passes.masked_linear.MaskedLinearPass`: rewrite of Dynamo training
  graphs that runs Supermask linears as ``torch.ops.sparse_compile.masked_linear``.
- :func:`~sparse_compile.passes.triton_kernels.inline_triton_ops`: for AOTInductor packages, our
  Triton ops' CUDA calls traced into the Triton kernel calls they are made of, so the kernels are
  compiled into the package.
"""

# This folder sits at the repository root, where ``python -m``, ``python -c`` and pytest put it on
# ``sys.path`` as a top-level package ``passes``: a name other libraries own (transformers probes
# for Hugging Face's ``kernels`` by importing it). Imported under that name it would run a second
# time and register the ``torch.ops.sparse_compile`` ops twice. ImportError is what such probes
# expect from a package they cannot use.
if __name__ != "sparse_compile.passes":
    raise ImportError(
        f"{__name__!r} is a folder of sparse_compile, installed as sparse_compile.passes, not a "
        "package of its own: use `import sparse_compile.passes`",
        name=__name__,
    )

from sparse_compile.passes.masked_linear import MaskedLinearPass
from sparse_compile.passes.sparse_linear import SparseLinearPass

__all__ = ["MaskedLinearPass", "SparseLinearPass"]
