"""Compiled Supermask training of convolutions with backend="sparse": 1x1 convolutions run the
masked op as the matmul over channels they are (``passes/masked_linear.py``,
``masked_conv1x1``), kxk ones stay dense with the reason; the training equals eager training of
an identical copy over several optimizer steps. Every test asserts that the masked path ran."""

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import sparse_compile
from sparse_compile.formats.base import ReasonCode
from sparse_compile.passes.masked_linear import masked_conv1x1
from sparse_compile.training import apply_supermask

pytestmark = pytest.mark.usefixtures("fresh_compiler")

TOLERANCES = {"fp32": (1e-5, 1e-4), "bf16 autocast": (2e-2, 2e-2)}  # (atol, rtol)


def convnet(stride: int, bias: bool) -> nn.Module:
    """Two Supermask-able 1x1 convs, one with a bias and one without, around a 3x3 one.
    20, 36 and 40 are not multiples of the tile: ragged edge tiles."""
    return nn.Sequential(
        nn.Conv2d(20, 48, 1, stride=stride, bias=bias), nn.ReLU(),
        nn.Conv2d(48, 40, 3, padding=1, bias=bias), nn.ReLU(),
        nn.Conv2d(40, 36, 1, bias=not bias), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(36, 10),
    )  # fmt: skip


def train(model, batches, step_fn, autocast: bool):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for x, y in batches:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = step_fn(x)
        loss = nn.functional.cross_entropy(out.float(), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize(
    "stride, bias, channels_last, precision",
    [(2, False, True, "fp32"), (1, True, False, "bf16 autocast")],
)
def test_compiled_conv_training_equals_eager(stride, bias, channels_last, precision):
    torch.manual_seed(0)
    model = convnet(stride, bias)
    masked = apply_supermask(model, conv1x1_sparsity=0.6, conv1x1_tile_size=16, conv_sparsity=0.6, conv_tile_size=16)
    assert masked == ["0", "2", "4"]
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    batches = [
        (torch.randn(4, 20, 9, 9).to(memory_format=memory_format), torch.randint(0, 10, (4,))) for _ in range(3)
    ]
    counters.clear()
    autocast = precision != "fp32"
    compiled = torch.compile(model, backend="sparse", fullgraph=True)
    losses = train(model, batches, compiled, autocast)
    ref_losses = train(reference, batches, reference, autocast)

    atol, rtol = TOLERANCES[precision]
    torch.testing.assert_close(losses, ref_losses, atol=atol, rtol=rtol)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")
    for name in ("0.parametrizations.weight.original", "4.parametrizations.weight.0.scores"):
        moved = dict(model.named_parameters())[name] - dict(initial.named_parameters())[name]
        assert moved.abs().max() > 0, name  # training moved them: equal is not two no-ops

    report = sparse_compile.report(compiled)
    assert [(r.name, r.kind, r.format) for r in report.layers] == [
        ("0", "conv1x1", "masked"), ("2", "conv kxk", "dense"), ("4", "conv1x1", "masked"), ("8", "linear", "dense")
    ], str(report)
    assert report.layers[1].reason_code is ReasonCode.CONV_NOT_MATMUL and "3x3" in report.layers[1].reason
    assert report.layers[3].reason_code is ReasonCode.NOT_TILE_MASKED
    if autocast:
        assert report.layers[0].dtype.startswith("bfloat16 (autocast")
    assert "2 of 3 layers (1 linear, 2 conv1x1) run masked (training graph); 1 conv kxk dense" in str(report)
    stats = counters["sparse_compile"]
    assert stats["masked_conv1x1_rewrites"] == 2 and stats["masked_linear_rewrites"] == 0
    # Per step: both forwards and the input gradient of the second (the first's input needs none).
    assert stats["masked_mm_cpu_tiles"] + stats["masked_mm_cpu_dense"] == 3 * len(batches)


@pytest.mark.parametrize("stride", [1, 2])
def test_masked_conv1x1_equals_a_float64_convolution(stride):
    """The replacement itself, eagerly, against float64 ``F.conv2d`` of the masked weight: output
    and the gradients to the input, the weight, the tile mask (Supermask's STE input) and the bias."""
    torch.manual_seed(1)
    x = torch.randn(2, 40, 7, 7, requires_grad=True)
    weight = torch.randn(36, 40, 1, 1, requires_grad=True)
    tile_mask = (torch.rand(3, 3, 1, 1) > 0.5).float().requires_grad_()
    bias = torch.randn(36, requires_grad=True)
    grad = torch.randn(2, 36, -(-7 // stride), -(-7 // stride))
    out = masked_conv1x1(x, weight, tile_mask, bias, 16, (stride, stride))
    out.backward(grad)
    inputs = [t.detach().double().requires_grad_() for t in (x, weight, tile_mask, bias)]
    x64, w64, m64, b64 = inputs
    full_mask = m64.repeat_interleave(16, 0)[:36].repeat_interleave(16, 1)[:, :40]
    expected = nn.functional.conv2d(x64, w64 * full_mask, b64, stride=stride)
    expected.backward(grad.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for got, want in zip((x, weight, tile_mask, bias), inputs):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4)
