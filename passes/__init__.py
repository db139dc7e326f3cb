"""FX graph passes of the ``sparse`` backend (``sparse_compile.passes``).

- :class:`~sparse_compile.passes.bsr_linear.SparseLinearPass` (alias ``BsrLinearPass``): Inductor
  post-grad pass that runs linear layers with sparse constant weights through the op of their
  sparse format (``sparse_compile.formats``: ``bsr_linear``, ...).
- :mod:`~sparse_compile.passes.fused_transformer`: a decomposition of PyTorch's fused
  ``nn.TransformerEncoderLayer`` op into plain ops, so the pass sees its linears.
- :class:`~sparse_compile.passes.masked_linear.MaskedLinearPass`: rewrite of Dynamo training
  graphs that runs Supermask linears as ``torch.ops.sparse_compile.masked_linear``.
"""

from sparse_compile.passes.bsr_linear import BsrLinearPass, SparseLinearPass
from sparse_compile.passes.masked_linear import MaskedLinearPass

__all__ = ["BsrLinearPass", "MaskedLinearPass", "SparseLinearPass"]
