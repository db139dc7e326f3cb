"""The ``sparse`` torch.compile backend: Inductor, plus a pass that runs sparse linears in a sparse
format (BSR for block-sparse weights, 2:4 for N:M ones; see ``sparse_compile.formats``).

Registered under the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="sparse")`` works without importing this package. Dynamo calls
:func:`sparse_backend` with the captured graph, the example inputs and, when the user gave them,
``options=`` or ``mode=`` (torch.compile accepts one of the two, not both).

Inference (``torch.no_grad()`` / ``torch.inference_mode()``): weights are treated as constants,
with Inductor's freezing semantics. Changing a weight after compiling needs a new compile
(``torch._dynamo.reset()`` or a new ``torch.compile`` call): the compiled code keeps the
weights, and the BSR copies, that it saw on the first call.

With ``density_threshold="auto"``, a graph in which some layer runs sparse is then timed against
the same graph compiled by Inductor alone, and runs as that one unless the rewrite wins beyond the
noise (see :func:`_check_whole_graph`, ``options={"check_graph": False}`` to skip it).

Only the model's parameters and buffers become constants (see :func:`_weights_as_attributes`);
when Inductor cannot compile a graph the backend falls back (see :func:`_compile_or_fall_back`);
it logs each layer's decision on the ``sparse_compile`` logger and counts what it did in
``torch._dynamo.utils.counters["sparse_compile"]`` (see :func:`_log_and_count`).

Training (grad enabled): weights change every step, so no BSR. Linear layers whose weight is a
Supermask parametrization run through ``torch.ops.sparse_compile.masked_linear`` (dropped tiles
skipped in the forward and input-gradient matmuls, see ``passes/masked_linear.py``); the rest
compiles exactly as with ``backend="inductor"``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import re
import warnings
from typing import Any, Mapping, Sequence

import torch
import torch.fx
from torch._dynamo.utils import counters, get_static_address_type
from torch._functorch.partitioners import default_partition
from torch._inductor import config as inductor_config
from torch._inductor.compile_fx import compile_fx
from torch._inductor.custom_graph_pass import CustomPartitionerFn
from torch._inductor.decomposition import select_decomp_table
from torch._subclasses.fake_tensor import unset_fake_temporarily

from sparse_compile import measure
from sparse_compile.formats import get as get_format
from sparse_compile.formats.base import ReasonCode
from sparse_compile.options import SparseOptions, inductor_config_for_mode
from sparse_compile.passes import sparse_conv
from sparse_compile.passes.sparse_linear import SparseLinearPass, chain_passes
from sparse_compile.passes.fused_transformer import DECOMPOSITIONS as FUSED_TRANSFORMER_DECOMPOSITIONS
from sparse_compile.passes.masked_linear import MaskedLinearPass
from sparse_compile.report import GraphReport, new_graph_report

log = logging.getLogger("sparse_compile")


def sparse_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
):
    """Compiles a Dynamo graph with Inductor, running sparse linear layers as BSR kernels.

    Args:
        gm: the graph Dynamo captured.
        example_inputs: its inputs (with parameters and buffers among them).
        options: see :class:`sparse_compile.options.SparseOptions` (``blocksize``,
            ``density_threshold``). Unknown keys raise ``ValueError`` listing the valid ones.
        mode: a torch.compile mode; applied to Inductor as ``backend="inductor"`` would.
    """
    sparse_options = SparseOptions.from_user(options)
    config_patches = inductor_config_for_mode(mode)
    graph_report = new_graph_report()
    # The model's parameters reach the backend as inputs or, when Inductor freezing was switched
    # on globally while Dynamo traced, as attributes of gm: remember both to find the model later.
    graph_report.remember_tensors(itertools.chain(example_inputs, gm.parameters(), gm.buffers()))

    if torch.is_grad_enabled():
        # Training: weights change every step, so no BSR. Linears whose weight is a Supermask
        # tile mask run through the masked op (rewritten before AOTAutograd, which then takes
        # the op's own backward); everything else is Inductor's.
        graph_report.training = True
        if MaskedLinearPass(graph_report)(gm):
            config_patches["custom_partitioner_fn"] = SavingPartitioner()
            counters["sparse_compile"]["training_graphs_saving_partition"] += 1
        log.info(graph_report.summary())
        return compile_fx(gm, example_inputs, config_patches=config_patches)

    # Before any setting of ours applies: the freezing patterns are registered once per process,
    # under the settings of the first compile that freezes (see _freezing_patterns_without_packing).
    _register_freezing_patterns()
    frozen_gm, runtime_indices, weight_names = _weights_as_attributes(gm, example_inputs)
    runtime_inputs = [example_inputs[i] for i in runtime_indices]
    sparse_pass = SparseLinearPass(sparse_options, graph_report, weight_names)
    config_patches.update(
        {
            # Parameters and buffers become constants, folded with everything computed from
            # them (parametrized masks included): the pass then sees each final weight.
            "freezing": True,
            "post_grad_custom_pre_pass": chain_passes(sparse_pass, inductor_config.post_grad_custom_pre_pass),
            # On CPU, freezing would otherwise repack linear weights for oneDNN before our pass
            # runs, hiding the matmuls from it.
            "cpp.weight_prepack": False,
            # A cached graph skips the passes, and so the report: compile every time.
            "fx_graph_cache": False,
        }
    )
    compiled = _compile_or_fall_back(frozen_gm, runtime_inputs, sparse_pass, config_patches)
    compiled = _check_whole_graph(compiled, frozen_gm, runtime_inputs, sparse_pass, sparse_options, mode)
    if not sparse_pass.ran:
        graph_report.no_linear = "the sparse pass did not run on this graph (Inductor did not call it)"
        graph_report.linears_hidden = True
    _log_and_count(graph_report, sparse_pass)
    return _drop_constant_arguments(compiled, runtime_indices)


class SavingPartitioner(CustomPartitionerFn):
    """How a training graph with masked layers is split into forward and backward: the backward
    reads what the forward computed (AOTAutograd's ``default_partition``), instead of Inductor's
    min-cut choice, which recomputes cheap-looking pointwise work in the backward.

    Why: around a masked op (an extern call Inductor cannot fuse into), the min-cut partitioner
    saves the op's output and recomputes what follows it — BatchNorm and ReLU after every masked
    1x1 convolution of a ResNet — inside the backward's BatchNorm kernels, which then read the
    op's rows-major output in NCHW order. Measured on this project's CPU benchmarks (2 threads,
    round-robin, ``benchmarks/results/cnn-cpu-resnet50.md``): ResNet-50 with Supermask 1x1 convs,
    a training step 350 -> 253 ms (``backend="inductor"`` 366 ms); the Supermask ViT of
    ``benchmarks.train_step`` 490 -> 483 ms at 90% / 64, 534 -> 512 ms at 80% / 32. Graphs
    without a masked layer keep Inductor's choice: on the dense ResNet the saving split was 3x
    slower.
    """

    def __call__(self, gm, joint_inputs, **kwargs):
        kwargs.pop("compiler", None)  # default_partition takes no compiler name
        return default_partition(gm, joint_inputs, **kwargs)

    def uuid(self) -> str:
        return "sparse_compile.SavingPartitioner.v1"


def _compile_or_fall_back(frozen_gm, runtime_inputs, sparse_pass: SparseLinearPass, config_patches: dict[str, Any]):
    """Inductor, or when Inductor cannot compile the graph, the next best thing that runs.

    1. Inductor as configured.
    2. On CPU, when Inductor's C++ failed to compile: again without vectorization
       (``cpp.simdlen=1``). Works around pytorch/pytorch#179135 ("'decltype' evaluates to
       'float'" in vectorized C++, seen on torchvision swin_t/swin_v2_t with torch 2.11), only
       for the graphs that hit it.
    3. Otherwise: AOTAutograd and freezing as usual, our pass on the frozen graph, and that
       graph run op by op, without Inductor's code generation (sparse layers still run BSR).

    Steps 2 and 3 warn once per process and say so in the graph's report. If step 3 fails
    too, the error of step 1 is raised.
    """
    graph_report = sparse_pass.graph_report
    try:
        return _compile_attempt(frozen_gm, runtime_inputs, sparse_pass, config_patches)
    except Exception as error:  # noqa: BLE001  (any Inductor failure: step 2 or 3 decide)
        inductor_error = error
    summary = _first_line(inductor_error)
    counters["sparse_compile"]["inductor_failures"] += 1
    if _is_cpp_compile_error(inductor_error) and _runs_on_cpu(frozen_gm, runtime_inputs):
        try:
            compiled = _compile_attempt(
                frozen_gm, runtime_inputs, sparse_pass, {**config_patches, "cpp.simdlen": 1}
            )
        except Exception:  # noqa: BLE001  (step 3 follows)
            pass
        else:
            counters["sparse_compile"]["fallback_cpp_simdlen_1"] += 1
            graph_report.fallback = (
                "compiled without C++ vectorization (cpp.simdlen=1): Inductor's vectorized C++ "
                "failed to compile (pytorch/pytorch#179135)"
            )
            _warn_once("simdlen", f"sparse backend: {graph_report.fallback}. Error: {summary}")
            return compiled
    try:
        compiled = _compile_attempt(
            frozen_gm, runtime_inputs, sparse_pass, config_patches, inner_compile=_run_without_codegen(sparse_pass)
        )
    except Exception:
        raise inductor_error
    counters["sparse_compile"]["fallback_without_codegen"] += 1
    graph_report.fallback = (
        "Inductor could not compile this graph, so it runs op by op without Inductor's code "
        f"generation (sparse layers still run as BSR). Inductor's error: {summary}"
    )
    _warn_once("no_codegen", f"sparse backend: {graph_report.fallback}")
    return compiled


def _compile_attempt(frozen_gm, runtime_inputs, sparse_pass, config_patches, **compile_fx_kwargs):
    """One ``compile_fx`` call on a copy of ``frozen_gm`` (compile_fx may change the module it
    gets), with the report emptied first: a failed attempt may have recorded layers.

    Inductor's decompositions plus ours: PyTorch's fused ``nn.TransformerEncoderLayer`` op
    becomes plain ops, so the pass sees its linears.
    """
    sparse_pass.graph_report.layers.clear()
    sparse_pass.graph_report.no_linear = ""
    sparse_pass.graph_report.linears_hidden = False
    sparse_pass.ran = False
    decompositions = {**select_decomp_table(), **FUSED_TRANSFORMER_DECOMPOSITIONS}
    with _freezing_patterns_without_packing():
        return compile_fx(
            _copy_graph_module(frozen_gm),
            runtime_inputs,
            config_patches=config_patches,
            decompositions=decompositions,
            **compile_fx_kwargs,
        )


def _register_freezing_patterns() -> None:
    """Registers Inductor's freezing patterns as Inductor itself would, under the user's settings.

    Inductor registers them once per process (``freezing_patterns.lazy_init``, cached), reading
    ``cpp.weight_prepack`` only then. If our compile, which sets it to False, came first, every
    later ``backend="inductor"`` compile with freezing in the process would lose its oneDNN/MKL
    weight packing. Registering them first, outside our settings, keeps the user's baseline as
    it would be without us (0.14 s, once per process).
    """
    from torch._inductor.fx_passes import freezing_patterns

    freezing_patterns.lazy_init()


#: Modules whose freezing patterns Inductor registers only under ``cpp.weight_prepack``: they
#: replace a linear with a constant weight by a packed oneDNN/MKL op (``mkl._mkl_linear``,
#: ``mkldnn._linear_pointwise``), and quantized layers likewise.
_WEIGHT_PACKING_MODULES = ("torch._inductor.fx_passes.mkldnn_fusion", "torch._inductor.fx_passes.quantization")


@contextlib.contextmanager
def _freezing_patterns_without_packing():
    """Inductor's freezing patterns without the weight-packing ones, for the duration of one compile.

    ``cpp.weight_prepack=False`` alone does not stop them: Inductor reads that setting only when
    it registers the patterns, once per process (``freezing_patterns.lazy_init``), and the
    linear-packing pattern's own check does not read it. So after any freezing compile with
    packing on (``backend="inductor"`` with freezing, say) every linear with a constant weight was
    packed before our pass ran, and the pass found "0 of 0 linear layers" (issue 21, item 5).
    Hidden here are the entries those registrations add (:data:`_WEIGHT_PACKING_MODULES`), which
    leaves what a process that never packed has; they are put back afterwards. oneDNN's
    convolution packing stays for the convolutions the pass cannot run sparse (:func:`_without_packing`).
    """
    from torch._inductor.fx_passes import freezing_patterns

    saved = [pattern_pass.patterns for pattern_pass in freezing_patterns.pass_patterns]
    for pattern_pass, patterns in zip(freezing_patterns.pass_patterns, saved):
        kept = collections.defaultdict(list)
        for key, entries in patterns.items():
            entries = [new for entry in entries if (new := _without_packing(entry)) is not None]
            if entries:
                kept[key] = entries
        pattern_pass.patterns = kept
    try:
        yield
    finally:
        for pattern_pass, patterns in zip(freezing_patterns.pass_patterns, saved):
            pattern_pass.patterns = patterns


def _without_packing(entry):
    """A freezing pattern entry as our compiles use it: unchanged, hidden (None: it packs weights),
    or for oneDNN's convolution packing, restricted to the convolutions our pass could not run
    sparse anyway (``sparse_conv.may_run_sparse``): dense convolutions keep Inductor's oneDNN path
    (a CNN whose convolutions are dense runs as ``backend="inductor"`` with freezing makes it);
    the pass records them from the packed op."""
    if not _packs_weights(entry):
        return entry
    if getattr(entry.handler, "__name__", "") != "convolution" or not hasattr(entry, "extra_check"):
        return None
    check = entry.extra_check

    def packable_and_not_ours(match) -> bool:
        return check(match) and not sparse_conv.may_run_sparse(match.output_node())

    return dataclasses.replace(entry, extra_check=packable_and_not_ours)


def _packs_weights(entry) -> bool:
    handler = getattr(entry, "handler", None)
    return getattr(handler, "__module__", None) in _WEIGHT_PACKING_MODULES


def _run_without_codegen(sparse_pass: SparseLinearPass):
    """An ``inner_compile`` for ``compile_fx`` that runs our pass and returns the graph itself.

    Inductor calls it with the frozen, post-AOTAutograd graph (constants folded, weights as
    attributes), where its own post-grad passes, ours included, would have run next.
    """

    def inner_compile(gm: torch.fx.GraphModule, example_inputs, **kwargs):
        # AOTAutograd's fake mode is still active here; the pass computes with the real weights
        # (compile_fx_inner steps out of it the same way before running post-grad passes).
        with unset_fake_temporarily():
            sparse_pass(gm.graph)

        def run(args):
            return gm(*args)

        run._boxed_call = True  # Inductor calls compiled graphs with one list of arguments
        return run

    return inner_compile


def _check_whole_graph(compiled, frozen_gm, runtime_inputs, sparse_pass: SparseLinearPass, options: SparseOptions, mode):
    """``compiled`` (the rewritten graph), or the graph as Inductor alone compiles it when the
    whole-graph check measured the rewrite no faster (``measure.check_graph``).

    Runs under ``density_threshold="auto"`` when some layer runs sparse and ``check_graph`` is on.
    The plain graph is ``frozen_gm`` compiled with the user's Inductor settings, ``mode`` and
    freezing: what ``backend="inductor"`` with freezing makes of it. Both run on the traced inputs;
    a graph that writes to its inputs (BatchNorm statistics in train mode) is not run again, and
    the random number generators' state is restored after timing.
    """
    graph_report = sparse_pass.graph_report
    stats = counters["sparse_compile"]
    if not options.measured or not any(layer.format != "dense" for layer in graph_report.layers):
        return compiled
    if not options.check_graph:
        stats["graph_checks_off"] += 1
        return compiled
    plain_patches = {**inductor_config_for_mode(mode), "freezing": True}
    why_not = _why_not_run_again(plain_patches)
    if graph_report.fallback:  # Inductor failed on this graph: the plain compile would too
        why_not = "Inductor could not compile this graph as configured"
    if why_not:
        stats["graph_checks_skipped"] += 1
        graph_report.graph_check_skipped = why_not
        return compiled
    device = _graph_device(frozen_gm, runtime_inputs)
    key = measure.graph_key(device, _graph_structure(frozen_gm, runtime_inputs, graph_report, mode))

    def compile_dense():
        return compile_fx(_copy_graph_module(frozen_gm), runtime_inputs, config_patches=plain_patches)

    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
            verdict, plain = measure.check_graph(
                key, compiled, compile_dense, runtime_inputs, device, _dense_floor_ms(graph_report)
            )
    except Exception as error:  # noqa: BLE001 - a failed check keeps the rewrite that compiled
        stats["graph_checks_failed"] += 1
        graph_report.graph_check_skipped = f"it failed ({_first_line(error)}), the rewrite is kept"
        return compiled
    stats["graph_checks"] += 1
    stats["graph_checks_cached"] += verdict.from_cache
    if verdict.keep:
        stats["graphs_kept_sparse"] += 1
        graph_report.graph_check = verdict
        return compiled
    stats["graphs_kept_dense"] += 1
    graph_report.fall_back_to_dense(verdict)
    sparse_pass.weights_converted = {}
    return plain


def _dense_floor_ms(graph_report: GraphReport) -> float:
    """What the plain graph spends at least: the per-layer dense floors of its linear layers,
    summed (``LayerRecord.dense_floor_ms``). Linear layers only: the plain graph runs a
    convolution as oneDNN's convolution, not as the matmul timed for it, and a fused fast path's
    weights inside PyTorch's fused op; a layer without a known floor adds nothing."""
    return sum(
        layer.dense_floor_ms for layer in graph_report.layers
        if layer.kind == "linear" and not layer.fused_op and layer.dense_floor_ms is not None
    )


def _why_not_run_again(plain_patches: dict[str, Any]) -> str:
    """Why the compiled graph must not be run at compile time, or ``""``."""
    if plain_patches.get("triton.cudagraphs"):
        return "CUDA graphs (mode='reduce-overhead') record on the first calls"
    from torch._guards import TracingContext

    context = TracingContext.try_get()
    metadata = getattr(context, "fw_metadata", None)
    if metadata is not None and any(info.mutates_data or info.mutates_metadata for info in metadata.input_info):
        return "the graph writes to its inputs (e.g. BatchNorm statistics), so it is not run at compile time"
    return ""


def _graph_device(gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> torch.device:
    tensors = [t for t in itertools.chain(inputs, gm.buffers()) if isinstance(t, torch.Tensor)]
    cuda = [t.device for t in tensors if t.device.type == "cuda"]
    return cuda[0] if cuda else (tensors[0].device if tensors else torch.device("cpu"))


def _graph_structure(gm: torch.fx.GraphModule, inputs: Sequence[Any], graph_report: GraphReport, mode) -> str:
    """What a whole-graph verdict depends on besides the device: the graph's code, the shapes
    of its inputs and constants, the mode, and each layer's decision (format, block, density)."""
    parts = [gm.code, f"mode {mode}"]
    for value in itertools.chain(inputs, gm.buffers()):
        if isinstance(value, torch.Tensor):
            parts.append(f"{tuple(value.shape)} {tuple(value.stride())} {value.dtype}")
        else:
            parts.append(repr(value))
    for layer in graph_report.layers:
        density = measure.density_bucket(layer.density) if layer.density is not None else "-"
        parts.append(f"{layer.name} {layer.out_features}x{layer.in_features} {layer.dtype} {layer.format} {layer.blocksize} {density}")
    return "\n".join(parts)


def _is_cpp_compile_error(error: BaseException) -> bool:
    """Whether Inductor's C++ compiler failed (the exception or one it was raised from)."""
    while error is not None:
        if type(error).__name__ == "CppCompileError":
            return True
        error = error.__cause__ or error.__context__
    return False


def _runs_on_cpu(gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> bool:
    tensors = itertools.chain(inputs, gm.parameters(), gm.buffers())
    return any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tensors)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=2)


def _log_and_count(graph_report: GraphReport, sparse_pass: SparseLinearPass) -> None:
    """Each layer's decision at DEBUG, the graph's summary at INFO, and the counters.

    ``TORCH_LOGS="sparse_compile"`` shows the INFO lines, ``TORCH_LOGS="+sparse_compile"`` the
    DEBUG ones too. Counters go to ``torch._dynamo.utils.counters["sparse_compile"]``:
    ``<format>_layers`` and ``<format>_weights`` per sparse format (``bsr_layers``,
    ``bsr_weights``: BSR copies made, tied weights share one), ``dense_layers`` and
    ``dense_<code>`` per reason code (``formats.base.ReasonCode``), ``conv1x1_layers`` /
    ``conv_kxk_layers`` (convolutions found) and ``conv1x1_sparse`` / ``conv_kxk_sparse`` (of
    which run sparse), ``inductor_failures`` and ``fallback_*``.
    """
    stats = counters["sparse_compile"]
    for fmt in sparse_pass.formats:
        stats[f"{fmt.counter}_weights"] += sparse_pass.weights_converted.get(fmt.name, 0)
    for layer in graph_report.layers:
        size = f"{layer.out_features}x{layer.in_features} {layer.dtype}"
        if layer.kind != "linear":  # convolutions: found, and run sparse (passes/sparse_conv.py)
            kind = layer.kind.replace(" ", "_")
            stats[f"{kind}_layers"] += 1
            stats[f"{kind}_sparse"] += layer.format != "dense"
        if layer.format == "bsr":
            stats["bsr_layers"] += 1
            log.debug(
                "%s (%s): bsr, block %s, block density %.3f, %s",
                layer.name, size, layer.blocksize, layer.density, layer.kernel,
            )
        elif layer.format != "dense":
            stats[f"{get_format(layer.format).counter}_layers"] += 1
            log.debug("%s (%s): %s, %s", layer.name, size, layer.format, layer.kernel)
        else:
            stats["dense_layers"] += 1
            stats[f"dense_{(layer.reason_code or ReasonCode.OTHER).value}"] += 1
            log.debug("%s (%s): dense, %s", layer.name, size, layer.reason)
    if not graph_report.layers:
        stats["graphs_without_linear"] += 1
    if graph_report.linears_hidden:
        log.warning(graph_report.summary())
    else:
        log.info(graph_report.summary())


def _weights_as_attributes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]):
    """A copy of ``gm`` in which the model's parameters and buffers are attributes, not inputs.

    Dynamo passes a module's parameters and buffers to the backend as graph inputs (it marks them
    "static"), and only turns them into attributes itself when Inductor's freezing is switched on
    globally while it traces. Inductor freezes attributes, so this puts them back where freezing
    looks. Only the model's own parameters and buffers move: any other input, even one with a
    static address (``torch._dynamo.mark_static_address``: CUDA-graph input buffers, static KV
    caches), stays a runtime input, so changes to it are seen. ``gm`` is left untouched: Dynamo
    calls the compiled function with all of its inputs.

    Returns:
        the new graph module, the indices of the inputs that are still runtime inputs, and
        ``{storage data_ptr: qualified name}`` of the parameters and buffers moved.
    """
    frozen_gm = _copy_graph_module(gm)
    placeholders = [node for node in frozen_gm.graph.nodes if node.op == "placeholder"]
    runtime_indices = []
    weight_names = {}
    for index, (node, value) in enumerate(zip(placeholders, example_inputs)):
        qualified_name = _model_weight_name(node, value)
        if qualified_name is None:
            runtime_indices.append(index)
            continue
        weight_names[value.untyped_storage().data_ptr()] = qualified_name
        _guard_identity(node)
        name = f"_sparse_weight{index}"
        frozen_gm.register_buffer(name, value)
        with frozen_gm.graph.inserting_before(node):
            attribute = frozen_gm.graph.get_attr(name)
        attribute.meta.update(node.meta)
        node.replace_all_uses_with(attribute)
        frozen_gm.graph.erase_node(node)
    frozen_gm.recompile()
    return frozen_gm, runtime_indices, weight_names


def _guard_identity(placeholder: torch.fx.Node) -> None:
    """Makes Dynamo recompile when this input is another tensor than the one frozen now.

    Dynamo passes parameters as inputs without guarding on which tensor they are (so that, say,
    two instances of one module class share compiled code); it adds an identity guard only when
    Inductor's freezing is on globally while it traces. This backend freezes them in any case,
    so it adds the guard itself: without it a second model instance would run with the first
    one's weights.
    """
    from torch._dynamo.guards import GuardBuilder, install_guard
    from torch._guards import TracingContext

    source = getattr(placeholder.meta.get("grapharg"), "source", None)
    if source is not None and TracingContext.try_get() is not None:
        install_guard(source.make_guard(GuardBuilder.ID_MATCH))


def _copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return torch.fx.GraphModule(gm, graph)


def _model_weight_name(node: torch.fx.Node, value: Any) -> str | None:
    """The qualified name (``features.1.weight``) of a model parameter or buffer input, else None.

    Dynamo marks parameters and buffers with a static address; what tells them apart from a
    user's static input is where Dynamo read them: a module's ``_parameters`` or ``_buffers``.
    """
    if not isinstance(value, torch.Tensor) or get_static_address_type(value) is None:
        return None
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    source_name = source.name if source is not None else ""
    source_name = source_name() if callable(source_name) else str(source_name)
    from_module = "._parameters[" in source_name or "._buffers[" in source_name
    if not (from_module or isinstance(value, torch.nn.Parameter)):
        return None
    parts = [key or attr or item for key, attr, item in _SOURCE_PART.findall(_SOURCE_ROOT.sub("", source_name))]
    return ".".join(p for p in parts if p not in ("_modules", "_parameters", "_buffers")) or node.name


#: ``L['self']`` / ``G['model']`` at the start of a Dynamo source name, and the accesses after it.
_SOURCE_ROOT = re.compile(r"^[A-Z]\['[^']*'\]")
_SOURCE_PART = re.compile(r"\['([^']*)'\]|\.(\w+)|\[(\d+)\]")


def _drop_constant_arguments(compiled, runtime_indices: list[int]):
    """Wraps ``compiled`` to take Dynamo's full argument list and pass on the runtime ones.

    ``compile_fx`` on a GraphModule returns a function with positional arguments (its
    ``_boxed_call`` attribute is copied from an inner function and does not apply to it).
    """

    def run(*args):
        return compiled(*[args[i] for i in runtime_indices])

    return run
