"""Ship a sparse model: ``torch.export`` + AOTInductor packages that keep the sparse kernels.

:func:`aoti_compile_and_package` is ``torch._inductor.aoti_compile_and_package`` with the
``sparse`` backend's pass (``SparseLinearPass``: the same options, the same per-layer measured
choice, timed here on the package's device, the same report). It writes a ``.pt2`` that
``torch._inductor.aoti_load_package`` (or :func:`aoti_load_package`, which loads faster on CPU)
runs in another process after ``import sparse_compile``; the report travels inside the archive
and :func:`package_report` reads it back from the path.

Why AOTInductor alone does not do it (issue 22: ``inductor_configs={"freezing": True,
"post_grad_custom_pre_pass": pass}`` gave a dense package and a report of "0 of 0 layers"):

1. ``compile_fx_aot`` deep-copies its config patches, so the pass object that runs is a copy: its
   report is not the caller's, which stays empty whatever the pass did. Our pass is shared
   instead of copied (:class:`_PackagingPass`).
2. Freezing happens only under ``torch.no_grad()`` (``compile_fx`` checks the grad mode), and
   with freezing Inductor's CPU patterns pack every linear with a constant weight for oneDNN
   (``mkldnn._linear_pointwise``) before the post-grad passes run, so the pass finds no linear.
   This is the backend's situation too: the weight packing is switched off and its patterns are
   hidden for the compile (``cpp.weight_prepack=False``, ``backend._freezing_patterns_without_packing``).
   Without ``no_grad`` freezing is skipped silently; the plain weights are still constants of the
   package (``aot_compile`` makes them attributes) and the pass converted them, which the report,
   per item 1, did not show. This function always compiles under ``no_grad``.

``torch.export`` lifts parameters and buffers to graph inputs; ``aot_compile`` puts them back as
attributes of the module it compiles (``get_attr``), and freezing folds them, with everything
computed from them (``W * mask(scores)``), into constants: the pass sees each final weight.

What the package calls: the converted layers are calls of the ``torch.ops.sparse_compile.*`` ops,
inserted after AOTAutograd, so AOTInductor keeps them as custom-op calls that its proxy executor
makes through the dispatcher at run time (the ``.pt2``'s ``*.wrapper.json`` lists them, with their
constant and static arguments). The ops must be registered in the loading process:
``import sparse_compile``. On CUDA the calls of our Triton op (``bsr_linear``) are replaced by
the Triton kernel calls the op is made of (``passes/triton_kernels.py``), so that AOTInductor
autotunes and compiles the kernel into the package, as it does a user's own Triton kernel; a
call that cannot be (symbolic shapes) stays an op call whose kernel Triton compiles at its first
call in the loading process. The report says which (``PackageReport.triton_kernels``). Should
AOTInductor fail on the inlined kernels, the package is built again with the op calls, with a
warning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch._dynamo.utils import counters

from sparse_compile import measure
from sparse_compile.formats.base import ReasonCode
from sparse_compile.options import SparseOptions
from sparse_compile.passes.sparse_linear import SparseLinearPass, chain_passes
from sparse_compile.passes.triton_kernels import inline_triton_ops
from sparse_compile.report import CompileReport, GraphReport, LayerRecord, new_graph_report

__all__ = ["PackageReport", "aoti_compile_and_package", "aoti_load_package", "package_report"]

log = logging.getLogger(__name__)

#: Name of the report inside the archive (under its ``extra/`` folder, torch's place for
#: files of the user's own).
REPORT_FILE = "sparse_compile_report.json"
_REPORT_VERSION = 1

#: Inductor settings the rewrite needs; a caller's ``inductor_configs`` may not change them.
_REQUIRED_CONFIGS = {
    # Parameters and buffers become constants, folded with what is computed from them (masks).
    "freezing": True,
    # On CPU, freezing would otherwise pack linear weights for oneDNN before our pass runs.
    "cpp.weight_prepack": False,
    # A cached graph skips the passes, and so the rewrite and its report.
    "fx_graph_cache": False,
}


@dataclasses.dataclass
class PackageReport(CompileReport):
    """The compile report of a package: :class:`~sparse_compile.CompileReport` plus where the
    package is, what it was packaged on, and with which options."""

    package_path: str = ""
    device: str = ""  # the device the layers were timed on, as timings name it ("cpu: <model>, 2 threads")
    options: dict = dataclasses.field(default_factory=dict)
    #: CUDA packages: how our Triton ops' calls were packaged (compiled in, or op calls and why); "" on CPU.
    triton_kernels: str = ""

    def __str__(self) -> str:
        head = f"sparse_compile package {self.package_path} (packaged on {self.device or 'an unknown device'})"
        if self.triton_kernels:
            head += f"\nTriton kernels: {self.triton_kernels}"
        return f"{head}\n{super().__str__()}"


class _PackagingPass(SparseLinearPass):
    """The backend's pass, shared rather than copied when ``compile_fx_aot`` deep-copies its
    config patches: the pass that runs must record into the report the caller returns.

    With ``inline_triton``, the calls of our Triton ops it inserted on CUDA are then replaced by
    their Triton kernel calls (``passes/triton_kernels.py``): AOTInductor compiles those into the
    package."""

    def __init__(self, *args, inline_triton: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.inline_triton = inline_triton
        self.triton_inlined = 0
        self.triton_left: list[str] = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        super().__call__(graph)
        if not self.inline_triton:
            return
        inlined, left = inline_triton_ops(graph.owning_module)
        self.triton_inlined += inlined
        self.triton_left += left
        if inlined:
            graph.eliminate_dead_code()
            graph.owning_module.recompile()

    def __deepcopy__(self, memo):
        return self

    def triton_summary(self) -> str:
        """What the report says of the Triton op calls ("" when there were none)."""
        parts = []
        if self.triton_inlined:
            parts.append(f"{self.triton_inlined} op call(s) compiled into the package as Triton kernel calls")
        if self.triton_left:
            parts.append(
                f"{len(self.triton_left)} left as op calls (kernel compiled by Triton at the first call after loading): "
                + "; ".join(self.triton_left)
            )
        if not self.inline_triton:
            parts.append("op calls (kernel compiled by Triton at the first call after loading): "
                         "AOTInductor failed on the inlined kernels, see the warning")
        return ", ".join(parts)


def aoti_compile_and_package(
    exported_program: torch.export.ExportedProgram,
    *,
    package_path: str | os.PathLike,
    options: Mapping[str, Any] | SparseOptions | None = None,
    inductor_configs: Mapping[str, Any] | None = None,
) -> PackageReport:
    """Compiles ``exported_program`` with AOTInductor, sparse layers as in ``backend="sparse"``,
    into the ``.pt2`` package ``package_path``.

    Each linear layer with a constant weight is decided as the backend decides it (``options``:
    see :class:`~sparse_compile.options.SparseOptions`; under ``density_threshold="auto"`` its
    candidates are timed now, on the device the exported program's weights are on, with its
    traced shapes). Supermask and N:M parametrizations still on the model fold into the weights
    as they do in the backend. The whole-graph check (``check_graph``) is not done for packages:
    the report says so, and ``benchmarks/export.py`` times a package against the others.

    Args:
        exported_program: from ``torch.export.export(model, args)``, with example inputs.
        package_path: the ``.pt2`` file to write (its folder must exist).
        options: the backend's options.
        inductor_configs: further Inductor settings, as for ``torch._inductor.aoti_compile_and_package``;
            a ``post_grad_custom_pre_pass`` of yours runs after ours.

    Returns:
        the :class:`PackageReport` (``print`` it), also saved in the package:
        :func:`package_report` reads it back.
    """
    if not isinstance(exported_program, torch.export.ExportedProgram):
        hint = (
            " (an nn.Module: export it first, exported_program = torch.export.export(model.eval(), (x,)))"
            if isinstance(exported_program, torch.nn.Module) else ""
        )
        raise TypeError(
            "sparse_compile.aoti_compile_and_package takes a torch.export.ExportedProgram, got "
            f"{type(exported_program).__name__}{hint}"
        )
    if exported_program.example_inputs is None:
        raise ValueError(
            "sparse_compile.aoti_compile_and_package: the exported program has no example inputs "
            "(torch.export.export(model, args) keeps them); the layers are timed and compiled with them"
        )
    package_path = _checked_package_path(package_path)
    sparse_options = SparseOptions.from_user(options)
    configs = _inductor_configs(inductor_configs)

    module = exported_program.module(check_guards=False)
    args, kwargs = exported_program.example_inputs
    user_pass = configs.get("post_grad_custom_pre_pass")
    configs["aot_inductor.package"] = True  # aot_compile returns the files to package

    from sparse_compile import backend as _backend  # here: it imports Inductor's compiler, import sparse_compile does not

    # The freezing patterns are registered once per process: first under the user's settings
    # (see backend._register_freezing_patterns), then the weight-packing ones hidden for us.
    _backend._register_freezing_patterns()
    for inline_triton in (True, False):
        graph_report = new_graph_report()
        sparse_pass = _PackagingPass(sparse_options, graph_report, _weight_names(module), inline_triton=inline_triton)
        configs["post_grad_custom_pre_pass"] = chain_passes(sparse_pass, user_pass)
        try:
            with torch.no_grad(), _backend._freezing_patterns_without_packing():
                aoti_files = torch._inductor.aot_compile(module, args, kwargs, options=configs)
            break
        except Exception as error:
            if not sparse_pass.triton_inlined:
                raise
            # Never a failed package because of the inlining: the op calls run the same kernel.
            log.warning(
                "sparse_compile.aoti_compile_and_package: AOTInductor failed on our inlined Triton kernels "
                "(%s: %s); packaging again with the ops called instead", type(error).__name__, error,
            )
            counters["sparse_compile"]["aoti_triton_inline_failed"] += 1
    counters["sparse_compile"]["aoti_triton_kernels_inlined"] += sparse_pass.triton_inlined
    if not sparse_pass.ran:
        graph_report.no_linear = "the sparse pass did not run on this graph (Inductor did not call it)"
        graph_report.linears_hidden = True
    if sparse_options.measured and sparse_options.check_graph and any(l.format != "dense" for l in graph_report.layers):
        graph_report.graph_check_skipped = (
            "not done for packages (benchmarks/export.py times a package against the dense one)"
        )
    _backend._log_and_count(graph_report, sparse_pass)
    counters["sparse_compile"]["aoti_packages"] += 1

    device = _device_of(module, args)
    result = PackageReport(
        [graph_report],
        package_path=os.fspath(package_path),
        device=measure.device_name(device),
        options=dataclasses.asdict(sparse_options),
        triton_kernels=sparse_pass.triton_summary(),
    )
    from torch.export.pt2_archive._package import package_pt2

    package_pt2(os.fspath(package_path), aoti_files=aoti_files, extra_files={REPORT_FILE: _report_json(result)})
    return result


def _checked_package_path(package_path) -> Path:
    if not isinstance(package_path, (str, os.PathLike)):
        raise TypeError(
            f"sparse_compile.aoti_compile_and_package: package_path must be a path ending in .pt2, got "
            f"{type(package_path).__name__}"
        )
    path = Path(package_path)
    if path.suffix != ".pt2":
        raise ValueError(
            f"sparse_compile.aoti_compile_and_package: package_path {os.fspath(path)!r} must end in .pt2 "
            "(the file torch._inductor.aoti_load_package reads)"
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"sparse_compile.aoti_compile_and_package: the folder of package_path, {os.fspath(path.parent)!r}, "
            "does not exist: create it first"
        )
    return path


def _inductor_configs(inductor_configs: Mapping[str, Any] | None) -> dict[str, Any]:
    configs = dict(inductor_configs or {})
    for key, needed in _REQUIRED_CONFIGS.items():
        if key in configs and configs[key] != needed:
            raise ValueError(
                f"sparse_compile.aoti_compile_and_package: inductor_configs[{key!r}]={configs[key]!r} "
                f"conflicts with the sparse rewrite, which needs {key}={needed!r}: leave it out"
            )
    for key in ("aot_inductor.output_path", "aot_inductor.package"):
        if key in configs:
            raise ValueError(
                f"sparse_compile.aoti_compile_and_package: inductor_configs[{key!r}] is set by the "
                "function itself; give the package's file as package_path"
            )
    configs.update(_REQUIRED_CONFIGS)
    return configs


def _weight_names(module: torch.nn.Module) -> dict[int, str]:
    """``{storage data_ptr: qualified name}`` of the module's parameters and buffers, to name a
    layer after its weight (as the backend does)."""
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    names: dict[int, str] = {}
    for name, tensor in named:
        names.setdefault(tensor.untyped_storage().data_ptr(), name)
    return names


def _device_of(module: torch.nn.Module, args) -> torch.device:
    tensors = [t for t in (*module.parameters(), *module.buffers()) if isinstance(t, torch.Tensor)]
    tensors += [t for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
    cuda = [t.device for t in tensors if t.device.type == "cuda"]
    return cuda[0] if cuda else (tensors[0].device if tensors else torch.device("cpu"))


# --------------------------------------------------------------------------------------------
# Loading


def aoti_load_package(path: str | os.PathLike, *, run_single_threaded: bool = False, device_index: int = -1):
    """Loads a ``.pt2`` package: what ``torch._inductor.aoti_load_package(path)`` returns, minus
    its check of the CPU's vector instruction sets, and with the ops this package calls registered.

    torch's loader compares the package's device information with this machine's; on CPU that
    means ``torch._inductor.cpu_vec_isa.pick_vec_isa()``, which builds (first time) and loads one
    test program per vector ISA, each in a new Python process: 20-30 s on the 2-core development
    machine, only to log a warning. Here the package's ISA is checked against the CPU's flags
    (cheap) and a package built for instructions this CPU lacks is an error, not a crash.
    """
    path = _existing_package(path, "aoti_load_package")
    from torch._inductor.package.package import AOTICompiledModel

    metadata = torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(os.fspath(path), "model")
    _check_cpu_isa(metadata, path)
    _register_cpu_ops(metadata)
    loader = torch._C._aoti.AOTIModelPackageLoader(os.fspath(path), "model", run_single_threaded, 1, device_index)
    return AOTICompiledModel(loader)


def _register_cpu_ops(metadata: Mapping[str, str]) -> None:
    """A CPU package's converted layers call the tile kernel's C++ ops: ``import sparse_compile``
    registers them where this machine built the library before; on its first use, build it now
    (rather than fail with "Could not find schema for sparse_compile::tile_linear")."""
    if metadata.get("AOTI_DEVICE_KEY") != "cpu":
        return
    from sparse_compile.kernels import cpu_tile_mm

    # Builds and loads it if needed. Where it cannot be built, the package's layers call
    # bsr_linear (the pass never inserted tile_linear) and load all the same.
    cpu_tile_mm.unavailable_reason()


def _check_cpu_isa(metadata: Mapping[str, str], path: Path) -> None:
    """Raises when the package's CPU kernels use vector instructions this CPU does not have."""
    if metadata.get("AOTI_DEVICE_KEY") != "cpu" or metadata.get("AOTI_MACHINE") not in ("x86_64", "AMD64"):
        return
    needed = [flag.lower() for flag in metadata.get("AOTI_CPU_ISA", "").split()]
    if not needed or needed == ["invalid"]:
        return
    from torch._inductor.cpu_vec_isa import x86_isa_checker

    have = set(x86_isa_checker())
    missing = [flag for flag in needed if flag not in have]
    if missing:
        raise RuntimeError(
            f"sparse_compile.aoti_load_package: {os.fspath(path)} was compiled for {metadata['AOTI_CPU_ISA']}, "
            f"and this CPU lacks {' '.join(missing).upper()}: package the model again on (a machine like) this one"
        )


def _existing_package(path, caller: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"sparse_compile.{caller}: expected the path of a .pt2 package, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"sparse_compile.{caller}: no package at {os.fspath(path)!r}; write one with "
            "sparse_compile.aoti_compile_and_package(exported_program, package_path=...)"
        )
    return path


# --------------------------------------------------------------------------------------------
# The report inside the package


def package_report(path: str | os.PathLike) -> PackageReport:
    """The report saved in the package at ``path`` by :func:`aoti_compile_and_package`."""
    path = _existing_package(path, "package_report")
    from torch.export.pt2_archive import PT2ArchiveReader
    from torch.export.pt2_archive.constants import EXTRA_DIR

    try:
        reader = PT2ArchiveReader(os.fspath(path))
    except Exception as error:  # noqa: BLE001  (torch raises RuntimeError or AssertionError)
        raise ValueError(f"sparse_compile.package_report: {os.fspath(path)!r} is not a .pt2 package ({error})") from None
    if f"{EXTRA_DIR}{REPORT_FILE}" not in reader.get_file_names():
        raise ValueError(
            f"sparse_compile.package_report: {os.fspath(path)!r} holds no sparse_compile report: it was not "
            "written by sparse_compile.aoti_compile_and_package"
        )
    return _report_from_json(reader.read_string(f"{EXTRA_DIR}{REPORT_FILE}"))


def _report_json(result: PackageReport) -> str:
    graphs = []
    for graph in result.graphs:
        fields = {f.name: getattr(graph, f.name) for f in dataclasses.fields(graph) if not f.name.startswith("_")}
        fields["layers"] = [_layer_dict(layer) for layer in graph.layers]
        verdict = fields["graph_check"]
        fields["graph_check"] = dataclasses.asdict(verdict) if dataclasses.is_dataclass(verdict) else None
        graphs.append(fields)
    return json.dumps(
        {
            "sparse_compile_report": _REPORT_VERSION,
            "torch": torch.__version__,
            "package_path": result.package_path,
            "device": result.device,
            "options": result.options,
            "triton_kernels": result.triton_kernels,
            "graphs": graphs,
            "text": str(CompileReport(result.graphs)),  # the table as printed, for a reader without us
        },
        indent=1,
    )


def _layer_dict(layer: LayerRecord) -> dict:
    fields = dataclasses.asdict(layer)
    fields["reason_code"] = layer.reason_code.value if layer.reason_code is not None else None
    return fields


def _report_from_json(text: str) -> PackageReport:
    data = json.loads(text)
    if data.get("sparse_compile_report") != _REPORT_VERSION:
        raise ValueError(
            f"sparse_compile.package_report: report version {data.get('sparse_compile_report')!r}, this "
            f"sparse_compile reads version {_REPORT_VERSION}"
        )
    graphs = []
    graph_fields = {f.name for f in dataclasses.fields(GraphReport) if not f.name.startswith("_")}
    layer_fields = {f.name for f in dataclasses.fields(LayerRecord)}
    for graph in data["graphs"]:
        # Fields this version does not know (a newer writer) are left out rather than refused.
        known = {key: value for key, value in graph.items() if key in graph_fields}
        layers = []
        for layer in known.pop("layers"):
            layer = {key: value for key, value in layer.items() if key in layer_fields}
            code = layer.get("reason_code")
            layer["reason_code"] = ReasonCode(code) if code is not None else None
            layers.append(LayerRecord(**layer))
        verdict = known.pop("graph_check", None)
        known["graph_check"] = measure.GraphVerdict(**verdict) if verdict else None
        graphs.append(GraphReport(layers=layers, **known))
    return PackageReport(
        graphs, package_path=data["package_path"], device=data["device"], options=data["options"],
        triton_kernels=data.get("triton_kernels", ""),
    )
