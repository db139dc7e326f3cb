"""The ``sparse`` torch.compile backend: Inductor, plus a pass that runs sparse linears as BSR.

Registered under the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="sparse")`` works without importing this package. Dynamo calls
:func:`sparse_backend` with the captured graph, the example inputs and, when the user gave them,
``options=`` or ``mode=`` (torch.compile accepts one of the two, not both).

Inference (``torch.no_grad()`` / ``torch.inference_mode()``): weights are treated as constants,
with Inductor's freezing semantics. Changing a weight after compiling needs a new compile
(``torch._dynamo.reset()`` or a new ``torch.compile`` call): the compiled code keeps the
weights, and the BSR copies, that it saw on the first call.

Training (grad enabled): weights change every step, so no BSR. Linear layers whose weight is a
Supermask parametrization run through ``torch.ops.sparse_compile.masked_linear`` (dropped tiles
skipped in the forward and input-gradient matmuls, see ``passes/masked_linear.py``); the rest
compiles exactly as with ``backend="inductor"``.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Mapping, Sequence

import torch
import torch.fx
from torch._dynamo.utils import get_static_address_type
from torch._inductor import config as inductor_config
from torch._inductor.compile_fx import compile_fx

from sparse_compile.options import SparseOptions, inductor_config_for_mode
from sparse_compile.passes.bsr_linear import BsrLinearPass, chain_passes
from sparse_compile.passes.masked_linear import MaskedLinearPass
from sparse_compile.report import new_graph_report

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
        MaskedLinearPass(graph_report)(gm)
        log.info(graph_report.summary())
        return compile_fx(gm, example_inputs, config_patches=config_patches)

    frozen_gm, runtime_indices = _weights_as_attributes(gm, example_inputs)
    config_patches.update(
        {
            # Parameters and buffers become constants, folded with everything computed from
            # them (parametrized masks included): the pass then sees each final weight.
            "freezing": True,
            "post_grad_custom_pre_pass": chain_passes(
                BsrLinearPass(sparse_options, graph_report),
                inductor_config.post_grad_custom_pre_pass,
            ),
            # On CPU, freezing would otherwise repack linear weights for oneDNN before our pass
            # runs, hiding the matmuls from it.
            "cpp.weight_prepack": False,
            # A cached graph skips the passes, and so the report: compile every time.
            "fx_graph_cache": False,
        }
    )
    compiled = compile_fx(
        frozen_gm, [example_inputs[i] for i in runtime_indices], config_patches=config_patches
    )
    log.info(graph_report.summary())
    return _drop_constant_arguments(compiled, runtime_indices)


def _weights_as_attributes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]):
    """A copy of ``gm`` in which parameters and buffers are attributes, not graph inputs.

    Dynamo passes a module's parameters and buffers to the backend as graph inputs (it marks them
    "static"), and only turns them into attributes itself when Inductor's freezing is switched on
    globally while it traces. Inductor freezes attributes, so this puts them back where freezing
    looks. ``gm`` is left untouched: Dynamo calls the compiled function with all of its inputs.

    Returns:
        the new graph module and the indices of the inputs that are still runtime inputs.
    """
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    frozen_gm = torch.fx.GraphModule(gm, graph)
    placeholders = [node for node in frozen_gm.graph.nodes if node.op == "placeholder"]
    runtime_indices = []
    for index, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(value, torch.Tensor) or get_static_address_type(value) is None:
            runtime_indices.append(index)
            continue
        name = f"_sparse_weight{index}"
        frozen_gm.register_buffer(name, value)
        with frozen_gm.graph.inserting_before(node):
            attribute = frozen_gm.graph.get_attr(name)
        attribute.meta.update(node.meta)
        node.replace_all_uses_with(attribute)
        frozen_gm.graph.erase_node(node)
    frozen_gm.recompile()
    return frozen_gm, runtime_indices


def _drop_constant_arguments(compiled, runtime_indices: list[int]):
    """Wraps ``compiled`` to take Dynamo's full argument list and pass on the runtime ones.

    ``compile_fx`` on a GraphModule returns a function with positional arguments (its
    ``_boxed_call`` attribute is copied from an inner function and does not apply to it).
    """

    def run(*args):
        return compiled(*[args[i] for i in runtime_indices])

    return run
