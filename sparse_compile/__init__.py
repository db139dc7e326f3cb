"""sparse_compile: weight-sparse networks, fast.

Inference: ``torch.compile(model, backend="sparse", options={...})`` (registered through the
``torch_dynamo_backends`` entry point, so no import of this package is needed) and
:func:`report` to see what happened to every linear layer. Training: ``sparse_compile.training``.
"""

from sparse_compile import _root_folders

_root_folders.install()  # the checkout's kernels/, passes/, training/ are not top-level packages

from sparse_compile.options import DEFAULT_DENSITY_THRESHOLD, SparseOptions
from sparse_compile.export import PackageReport, aoti_compile_and_package, aoti_load_package, package_report
from sparse_compile.pruning import prune_blocks_, prune_conv1x1_blocks_, prune_linear_blocks_
from sparse_compile.report import CompileReport, LayerRecord, clear_reports, report

__all__ = [
    "CompileReport",
    "DEFAULT_DENSITY_THRESHOLD",
    "LayerRecord",
    "PackageReport",
    "SparseOptions",
    "aoti_compile_and_package",
    "aoti_load_package",
    "clear_reports",
    "package_report",
    "prune_blocks_",
    "prune_conv1x1_blocks_",
    "prune_linear_blocks_",
    "report",
]
