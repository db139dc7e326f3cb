"""The activation after a sparse CPU linear runs inside the tile kernel (``passes/epilogues.py``):
GELU (exact) and ReLU after ``tile_linear``, through reshapes and permutes, in fp32 and bf16.
Each compiled model is checked against a float64 copy of itself, and the report's kernel column,
the ``fused_*`` counters and the graph Inductor compiled say whether the activation was fused.
What must not be fused (the tanh GELU, a pre-activation value read twice) stays as it was.
"""

import re

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import sparse_compile
from sparse_compile.kernels import cpu_tile_mm

from compile_helpers import TileKernelCalls, float64_reference

pytestmark = [
    pytest.mark.skipif(cpu_tile_mm.unavailable_reason() is not None, reason="no C++ compiler for the CPU tile kernel"),
    pytest.mark.usefixtures("fresh_compiler"),
]

TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=5e-2, rtol=3e-2)}


class Mlp(nn.Module):
    """A transformer's MLP: ``fc2(act(fc1(x)))``; ``reuse`` adds the pre-activation value to the output."""

    def __init__(self, act: nn.Module, reuse: bool = False):
        super().__init__()
        self.fc1, self.act, self.fc2, self.reuse = nn.Linear(64, 128), act, nn.Linear(128, 64), reuse

    def forward(self, x):
        h = self.fc1(x)
        out = self.fc2(self.act(h))
        return out + h[..., :64] if self.reuse else out


class PermutedRelu(nn.Module):
    """ReLU applied after the linear's output is permuted (as a 1x1 convolution's output is)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 96)

    def forward(self, x):
        return torch.relu(self.proj(x).permute(0, 2, 1)) * 2


def compile_sparse(model, x):
    """Block-pruned ``model`` and its output from ``backend="sparse"`` (every layer sparse by rule),
    the calls of the tile kernel in the second (compiled) call, and the report."""
    sparse_compile.prune_linear_blocks_(model, 0.75, 16)
    compiled = torch.compile(model, backend="sparse", options={"density_threshold": 1.0})
    counters.clear()
    with torch.no_grad():
        compiled(x)
        calls = TileKernelCalls()
        out = compiled(x)
    return out, len(calls), sparse_compile.report(compiled)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act,name", [(nn.GELU(), "gelu"), (nn.ReLU(), "relu")])
def test_the_activation_after_a_sparse_linear_runs_in_its_kernel(dtype, act, name):
    torch.manual_seed(0)
    model = Mlp(act).eval().to(dtype)
    x = torch.randn(2, 33, 64, dtype=dtype) * 2
    out, calls, report = compile_sparse(model, x)
    assert calls == 2
    assert [layer.kernel for layer in report.layers] == [f"tile kernel (cpu) + {name}", "tile kernel (cpu)"]
    assert counters["sparse_compile"][f"fused_{name}"] == 1
    torch.testing.assert_close(out.double(), float64_reference(model, x), **TOLERANCE[dtype])


def test_a_permuted_output_takes_its_relu_along():
    torch.manual_seed(0)
    model = PermutedRelu().eval()
    x = torch.randn(2, 17, 64)
    out, calls, report = compile_sparse(model, x)
    assert calls == 1 and report.layers[0].kernel == "tile kernel (cpu) + relu"
    torch.testing.assert_close(out.double(), float64_reference(model, x), **TOLERANCE[torch.float32])


@pytest.mark.parametrize(
    "model",
    [Mlp(nn.GELU(approximate="tanh")), Mlp(nn.GELU(), reuse=True), Mlp(nn.SiLU())],
    ids=["gelu-tanh", "pre-activation-read-twice", "silu"],
)
def test_what_the_kernel_cannot_apply_stays_outside(model):
    torch.manual_seed(0)
    model = model.eval()
    x = torch.randn(2, 33, 64) * 2
    out, calls, report = compile_sparse(model, x)
    assert calls == 2
    assert [layer.kernel for layer in report.layers] == ["tile kernel (cpu)"] * 2
    assert not any(key.startswith("fused_") for key in counters["sparse_compile"])
    torch.testing.assert_close(out.double(), float64_reference(model, x), **TOLERANCE[torch.float32])


def test_the_fused_call_is_what_inductor_compiled():
    # The activation is an argument of the op in the code Inductor generated, and no GELU kernel
    # of Inductor's own is left (its erf would show in the generated C++).
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = Mlp(nn.GELU()).eval()
    sparse_compile.prune_linear_blocks_(model, 0.75, 16)
    compiled = torch.compile(model, backend="sparse", options={"density_threshold": 1.0})
    with torch.no_grad():
        _, code = run_and_get_code(compiled, torch.randn(2, 33, 64))
    source = "\n".join(code)
    assert "'gelu'" in source or '"gelu"' in source, source[-3000:]
    assert not re.search(r"\berf\b", source)


class ConvBnRelu(nn.Module):
    """A 1x1 convolution, BatchNorm (folded into it at freezing) and ReLU, as in a ResNet bottleneck."""

    def __init__(self, stride):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(32, 64, 1, stride=stride), nn.BatchNorm2d(64)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("stride", [1, 2])
def test_the_relu_after_a_sparse_1x1_conv_runs_in_its_kernel(stride):
    torch.manual_seed(0)
    model = ConvBnRelu(stride).eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
        model.conv.weight[:, :16] = 0  # half the 16x16 blocks empty
    x = torch.randn(2, 32, 9, 9)
    compiled = torch.compile(model, backend="sparse", options={"density_threshold": 0.9, "blocksize": 16})
    counters.clear()
    with torch.no_grad():
        compiled(x)
        calls = TileKernelCalls()
        out = compiled(x)
    assert len(calls) == 1
    report = sparse_compile.report(compiled)
    assert [(layer.kind, layer.kernel) for layer in report.layers] == [("conv1x1", "tile kernel (cpu) + relu")]
    assert counters["sparse_compile"]["fused_relu"] == 1
    torch.testing.assert_close(out.double(), float64_reference(model, x), **TOLERANCE[torch.float32])
