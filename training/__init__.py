"""Training-time weight sparsity as ``torch.nn.utils.parametrize`` parametrizations.

- :class:`Supermask`: learned tile-wise masks (pytorch-labs/superblock); ``.sparsity`` may change during training.
- :class:`NMMask`: N:M masks; mode ``"bidirectional"`` is Bi-Mask (ICML 2023), whose input
  gradient uses a separate, permuted backward mask (see ``nm_mask.py`` for how).
- :func:`apply_supermask` / :func:`apply_nm`: put them on a model's Linear/Conv2d layers.
- :func:`post_step_projection`: after ``optimizer.step()`` for ``NMMask(mode="post")``.
- :func:`finalize`: fold ``W * mask`` into the weights and drop the parametrizations.
- :func:`sparsity_summary` / :func:`format_sparsity_summary`: per-layer target and measured sparsity.
- :func:`load_superblock_checkpoint`: import SuperBlock ``SupermaskLinear`` checkpoints.
"""

# This folder sits at the repository root, where ``python -m``, ``python -c`` and pytest put it on
# ``sys.path`` as a top-level package ``training``: a name other libraries own (transformers probes
# for Hugging Face's ``kernels`` by importing it). Imported under that name it would run a second
# time and register the ``torch.ops.sparse_compile`` ops twice. ImportError is what such probes
# expect from a package they cannot use.
if __name__ != "sparse_compile.training":
    raise ImportError(
        f"{__name__!r} is a folder of sparse_compile, installed as sparse_compile.training, not a "
        "package of its own: use `import sparse_compile.training`",
        name=__name__,
    )

from sparse_compile.training.supermask import Supermask
from sparse_compile.training.nm_mask import NMMask
from sparse_compile.training.apply import (
    apply_nm,
    apply_supermask,
    finalize,
    first_transformer_block,
    format_sparsity_summary,
    post_step_projection,
    sparsity_summary,
)
from sparse_compile.training.checkpoint import load_superblock_checkpoint

__all__ = [
    "Supermask",
    "NMMask",
    "apply_supermask",
    "apply_nm",
    "finalize",
    "sparsity_summary",
    "format_sparsity_summary",
    "post_step_projection",
    "first_transformer_block",
    "load_superblock_checkpoint",
]
