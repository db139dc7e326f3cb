"""FX graph passes of the ``sparse`` backend (``sparse_compile.passes``).

- :class:`~sparse_compile.passes.bsr_linear.BsrLinearPass`: Inductor post-grad pass that runs
  linear layers with block-sparse constant weights as ``torch.ops.sparse_compile.bsr_linear``.
- :mod:`~sparse_compile.passes.fused_transformer`: a decomposition of PyTorch's fused
  ``nn.TransformerEncoderLayer`` op into plain ops, so the pass sees its linears.
"""

from sparse_compile.passes.bsr_linear import BsrLinearPass

__all__ = ["BsrLinearPass"]
