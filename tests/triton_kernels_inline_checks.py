"""Our Triton op's calls replaced by its Triton kernel calls, so AOTInductor compiles the kernel
into a CUDA package (issue 22; ``passes/triton_kernels.py``).

Not collected by the suite itself: ``test_triton_kernels_inline.py`` runs this file with pytest
in a process without ``TRITON_INTERPRET`` (the suite sets it, and interpreted kernels are not
``wrap_triton`` kernels: the op's body then launches the interpreter instead of being traced).

Runs on CPU: the graphs hold fake CUDA tensors (no GPU needed to trace), and the device facts the
autotune pruning asks for are an H100's (capability 9.0, 227 KiB of shared memory per block).
References: the op's own output shape, the kernel's name in torch's kernel side table, and
Inductor's own post-grad pass, which must turn the spliced call into a kernel launch as it does
for a graph AOTAutograd traced. The CUDA round trip itself runs on the GPU machine
(``python -m benchmarks.export_cuda``, step ``export-cuda`` of ``benchmarks/gpu_session.sh``).
"""

from unittest import mock

import pytest
import torch
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import sparse_compile  # noqa: F401  (registers the ops)
from sparse_compile.kernels import HAS_TRITON
from sparse_compile.passes.triton_kernels import TRITON_KERNEL_CALL, inline_triton_ops, is_triton_op

from sparse_compile.kernels.bsr_linear import _INTERPRET

if not HAS_TRITON or _INTERPRET:
    raise RuntimeError("run by test_triton_kernels_inline.py, with triton importable and TRITON_INTERPRET=0")

BSR_LINEAR = torch.ops.sparse_compile.bsr_linear.default
H100_SHARED_MEMORY = 232448


@pytest.fixture
def h100():
    with mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)), mock.patch(
        "sparse_compile.kernels.autotune_configs.shared_memory_per_block", return_value=H100_SHARED_MEMORY
    ):
        yield


def graph_calling_bsr_linear(device: str, with_bias: bool = True, dtype=torch.float16) -> torch.fx.GraphModule:
    """``relu(bsr_linear(x))`` traced with fake tensors on ``device``, as the pass leaves a layer:
    the op called on the graph's inputs (its constants there), every node with its fake value."""
    blocks, n, k, b = 7, 256, 128, 32

    def layer(x, values, crow, col, bias):
        return torch.relu(BSR_LINEAR(x, values, crow, col, bias if with_bias else None, n, k))

    with FakeTensorMode():
        inputs = (
            torch.empty(2, 24, k, dtype=dtype, device=device),
            torch.empty(blocks, b, b, dtype=dtype, device=device),
            torch.empty(n // b + 1, dtype=torch.int32, device=device),
            torch.empty(blocks, dtype=torch.int32, device=device),
            torch.empty(n, dtype=dtype, device=device),
        )
        return make_fx(layer, tracing_mode="real")(*inputs)


def calls(gm: torch.fx.GraphModule, target) -> list[torch.fx.Node]:
    return [node for node in gm.graph.nodes if node.op == "call_function" and node.target is target]


def kernel_name(node: torch.fx.Node) -> str:
    kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
    return getattr(kernel, "fn", kernel).__name__  # an Autotuner wraps the JITFunction


def test_bsr_linear_is_recognised_as_a_triton_op():
    assert is_triton_op(BSR_LINEAR)
    assert not is_triton_op(torch.ops.sparse_compile.tile_linear.default)
    assert not is_triton_op(torch.ops.aten.mm.default) and not is_triton_op(torch.relu)


@pytest.mark.parametrize("with_bias", [True, False])
def test_a_cuda_call_becomes_our_triton_kernel_on_the_same_tensors(h100, with_bias):
    gm = graph_calling_bsr_linear("cuda", with_bias)
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    expected = calls(gm, BSR_LINEAR)[0].meta["val"]

    inlined, left = inline_triton_ops(gm)

    assert (inlined, left) == (1, [])
    assert calls(gm, BSR_LINEAR) == []
    (kernel_call,) = calls(gm, TRITON_KERNEL_CALL)
    assert kernel_name(kernel_call) == "bsr_linear_kernel"
    tensors = kernel_call.kwargs["kwargs"]
    # The kernel reads the layer's own constants and the activations (as a 2-D view).
    assert [tensors[name] for name in ("values_ptr", "crow_ptr", "col_ptr")] == placeholders[1:4]
    assert tensors["x_ptr"].args[0] is placeholders[0]
    assert tensors["HAS_BIAS"] is with_bias and tensors["M"] == 48 and tensors["N"] == 256 and tensors["K"] == 128
    # What the relu reads is the kernel's output, shaped as the op's was.
    (relu,) = calls(gm, torch.ops.aten.relu.default)
    out = relu.args[0].meta["val"]
    assert out.shape == expected.shape and out.dtype == expected.dtype and out.device == expected.device


def test_inductor_turns_the_spliced_call_into_a_kernel_launch(h100):
    from torch._inductor.fx_passes.post_grad import decompose_triton_kernel_wrapper_functional
    from torch._inductor.virtualized import V

    gm = graph_calling_bsr_linear("cuda")
    assert inline_triton_ops(gm)[0] == 1
    fake_mode = next(node for node in gm.graph.nodes if node.op == "placeholder").meta["val"].fake_mode
    with V.set_fake_mode(fake_mode):  # as Inductor runs its post-grad passes
        decompose_triton_kernel_wrapper_functional(gm.graph)
    launches = calls(gm, torch.ops.higher_order.triton_kernel_wrapper_mutation)
    assert len(launches) == 1 and kernel_name(launches[0]) == "bsr_linear_kernel"
    assert calls(gm, TRITON_KERNEL_CALL) == []


def test_cpu_calls_are_left_alone(h100):
    gm = graph_calling_bsr_linear("cpu", dtype=torch.float32)
    before = gm.code
    assert inline_triton_ops(gm) == (0, [])
    assert gm.code == before


def test_a_call_whose_trace_fails_stays_an_op_call_with_the_reason():
    gm = graph_calling_bsr_linear("cuda")
    with mock.patch("torch.cuda.get_device_capability", side_effect=RuntimeError("no device here")):
        inlined, left = inline_triton_ops(gm)
    assert inlined == 0 and len(left) == 1
    assert "tracing its body failed: RuntimeError: no device here" in left[0] and "sparse_compile.bsr_linear" in left[0]
    assert len(calls(gm, BSR_LINEAR)) == 1 and calls(gm, TRITON_KERNEL_CALL) == []


def test_a_call_with_symbolic_shapes_stays_an_op_call_with_the_reason(h100):
    gm = graph_calling_bsr_linear("cuda")
    x = next(node for node in gm.graph.nodes if node.op == "placeholder")
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    shape_env = ShapeEnv()
    batch = shape_env.create_unbacked_symint()
    with FakeTensorMode(shape_env=shape_env):
        x.meta["val"] = torch.empty(batch, 24, 128, dtype=torch.float16, device="cuda")
    inlined, left = inline_triton_ops(gm)
    assert inlined == 0 and len(left) == 1 and "symbolic shape" in left[0]
    assert len(calls(gm, BSR_LINEAR)) == 1
