"""torchvision models with block-sparse weights, compiled with backend="sparse" on CPU.

Reduced sizes and random weights; the reference is the same model run eagerly in float64.
"""

import copy

import pytest
import torch
import torchvision
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import sparse_compile
from sparse_compile.pruning import prune_linear_blocks_

from compile_helpers import cpu_bsr_op_name


pytestmark = pytest.mark.usefixtures("fresh_compiler")


@pytest.fixture(autouse=True)
def fresh_counters():
    counters["sparse_compile"].clear()  # torch._dynamo.reset() keeps the counters
    yield


def run_compiled(model, x, options):
    compiled = torch.compile(model, backend="sparse", fullgraph=True, options=options)
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, x)
        expected = copy.deepcopy(model).double()(x.double())
    assert expected.abs().max() > 0.1  # a comparison of zeros would prove nothing
    torch.testing.assert_close(out.double(), expected, atol=2e-4, rtol=2e-4)
    return sparse_compile.report(compiled), "\n".join(codes)


def test_vision_transformer():
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10
    ).eval()
    # torchvision initialises the head to zeros: every output would be 0 whatever the encoder did.
    torch.nn.init.normal_(model.heads.head.weight)
    prune_linear_blocks_(model, sparsity=0.9, blocksize=16, filter_fn=lambda name, _: name.startswith("encoder"))
    report, code = run_compiled(model, torch.randn(3, 3, 32, 32), {"blocksize": 16})

    # Per encoder block: attention in/out projections and the two MLP linears; then the head.
    sparse = [layer for layer in report.layers if layer.format == "bsr"]
    assert len(sparse) == 2 * 4, str(report)
    assert {(layer.out_features, layer.in_features) for layer in sparse} == {(192, 64), (64, 64), (128, 64), (64, 128)}
    assert any("self_attention" in layer.name for layer in sparse)
    assert any(layer.name.endswith("mlp.0") for layer in sparse)
    head = [layer for layer in report.layers if layer.name == "heads.head"]
    assert head and head[0].format == "dense" and "no block to skip" in head[0].reason
    assert code.count(cpu_bsr_op_name()) >= 8
    assert counters["sparse_compile"]["bsr_layers"] == 8 and counters["sparse_compile"]["dense_no_block_to_skip"] == 1


def test_resnet18_final_linear():
    model = torchvision.models.resnet18(num_classes=100).eval()
    prune_linear_blocks_(model, sparsity=0.8, blocksize=32)
    report, code = run_compiled(model, torch.randn(2, 3, 32, 32), {"blocksize": 32})
    assert [(layer.name, layer.format) for layer in report.layers if layer.kind == "linear"] == [("fc", "bsr")], str(report)
    # Its convolutions are listed too (dense: not pruned; the 7x7 and 3x3 ones have no sparse path).
    kinds = [layer.kind for layer in report.layers if layer.kind != "linear"]
    assert (kinds.count("conv1x1"), kinds.count("conv kxk")) == (3, 17), str(report)
    assert all(layer.format == "dense" for layer in report.layers if layer.kind != "linear")
    assert cpu_bsr_op_name() in code
    assert counters["sparse_compile"]["bsr_layers"] == 1
