"""Our Triton ops' calls in a post-grad graph replaced by the Triton kernel calls they are made of.

Why: the sparse pass inserts ``torch.ops.sparse_compile.bsr_linear`` after AOTAutograd. There
the op is a ``torch.library.triton_op`` that nothing decomposes any more, so Inductor lowers it
as an external call of the op: in an AOTInductor package that is a call through the proxy
executor, and the op's Triton kernel is JIT-compiled and autotuned by Triton at the first call
in the loading process (Python and Triton needed there). A ``triton_op`` is decomposed only
under ``FunctionalTensorMode``, as AOTAutograd traces a graph: into the
``triton_kernel_wrapper_functional`` calls its body makes through ``wrap_triton``, which Inductor
compiles like any user-defined Triton kernel (autotuned while compiling, its binary in the
package, launched by the package's own code).

:func:`inline_triton_ops` does that trace for each call node of a triton op, with the node's fake
tensors in the graph's fake mode, and splices the traced nodes in place of the call. Inductor's
own post-grad passes then turn the functional wrapper into the kernel launch (reinplacing its
output buffer), as for a graph AOTAutograd traced.

What is left as the op call (the reason is returned): calls with symbolic shapes (the kernel's
autotune key and grid need numbers), and any call whose trace fails (the external call then
runs the same kernel, compiled at first use).
"""

from __future__ import annotations

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor

#: The higher-order op a triton_op's body becomes under functionalization.
TRITON_KERNEL_CALL = torch.ops.higher_order.triton_kernel_wrapper_functional


def is_triton_op(target) -> bool:
    """Whether ``target`` (a node's target) is an overload of a ``torch.library.triton_op``."""
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return bool(torch._library.triton.get_triton_kernels_for_op(target._schema.name))


def inline_triton_ops(gm: torch.fx.GraphModule) -> tuple[int, list[str]]:
    """Replaces every CUDA call of a triton op in ``gm`` by its Triton kernel calls.

    Returns how many calls were replaced, and for each call left as it was, why (a line naming
    the node). The graph is recompiled only by the caller.
    """
    inlined, left = 0, []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not is_triton_op(node.target):
            continue
        value = node.meta.get("val")
        if not isinstance(value, FakeTensor) or value.device.type != "cuda":
            continue
        why = _static_shapes_problem(node)
        if why is None:
            try:
                _inline(gm, node)
                inlined += 1
                continue
            except Exception as error:  # noqa: BLE001 - the op call stays: it runs the same kernel
                why = f"tracing its body failed: {type(error).__name__}: {error}"
        left.append(f"{node.name} ({node.target}): {why}")
    return inlined, left


def _static_shapes_problem(node: torch.fx.Node) -> str | None:
    for arg in node.all_input_nodes:
        value = arg.meta.get("val")
        if isinstance(value, torch.Tensor) and not all(isinstance(size, int) for size in value.shape):
            return f"symbolic shape {tuple(value.shape)} (the kernel's autotune key and grid need numbers)"
    return None


def _inline(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    inputs = node.all_input_nodes

    def call(*tensors):
        replace = dict(zip(inputs, tensors))
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda arg: replace[arg])
        return node.target(*args, **kwargs)

    value = node.meta["val"]
    # The graph's own fake mode: the body's new tensors (its output buffer) are fake tensors of it.
    with value.fake_mode:
        traced = make_fx(dispatch_functionalize(call), tracing_mode="real")(*(arg.meta["val"] for arg in inputs))
    if not any(n.op == "call_function" and n.target is TRITON_KERNEL_CALL for n in traced.graph.nodes):
        raise RuntimeError("the traced body calls no Triton kernel")
    if any(n.op == "get_attr" for n in traced.graph.nodes):
        raise RuntimeError("the traced body holds constants of its own")

    # The traced placeholders are the call's inputs; fx copies the rest in front of the call.
    inputs_of_trace = dict(zip((n for n in traced.graph.nodes if n.op == "placeholder"), inputs))
    with gm.graph.inserting_before(node):
        result = gm.graph.graph_copy(traced.graph, inputs_of_trace)
    if not isinstance(result, torch.fx.Node):
        raise RuntimeError(f"the traced body returned {type(result).__name__}, not one tensor")
    node.replace_all_uses_with(result)
    gm.graph.erase_node(node)
