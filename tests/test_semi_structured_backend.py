"""N:M-trained models compiled with backend="sparse": their linears run as 2:4 (CPU reference).

Reference: the eager model in float64. Every test checks that the 2:4 op ran (report, counters,
generated code), not only that the outputs match.
"""

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import sparse_compile
from sparse_compile.pruning import prune_blocks_
from sparse_compile.training import apply_nm, finalize
from sparse_compile.training.nm_mask import nm_mask

from compile_helpers import cpu_bsr_op_name

OP_NAME = "sparse_compile.semi_structured_linear"

pytestmark = pytest.mark.usefixtures("fresh_compiler")


@pytest.fixture(autouse=True)
def fresh_counters():
    counters["sparse_compile"].clear()  # torch._dynamo.reset() keeps the counters
    yield


def compile_and_check(model, x, options=None, atol=1e-4):
    compiled = torch.compile(model, backend="sparse", fullgraph=True, options=options)
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, x)
        expected = copy.deepcopy(model).double()(x.double())
    assert expected.abs().max() > 0.1  # a comparison of zeros would prove nothing
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=atol)
    return sparse_compile.report(compiled), "\n".join(codes)


def train_a_few_steps(model, x_shape, steps=3):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(x_shape)).square().mean().backward()
        optimizer.step()


def mlp(bias=True):
    return nn.Sequential(
        nn.Linear(64, 128, bias=bias), nn.GELU(), nn.Linear(128, 64, bias=bias), nn.GELU(), nn.Linear(64, 10)
    )


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_shape", [(5, 64), (2, 7, 64)])
def test_nm_trained_mlp_runs_2_4(n, m, bias, x_shape):
    model = mlp(bias)
    names = apply_nm(model, n, m, skip_last_layer=True)  # Bi-Mask (mode "bidirectional")
    assert names == ["0", "2"]
    train_a_few_steps(model, (16, 64))
    finalize(model).eval()
    report, code = compile_and_check(model, torch.randn(x_shape))
    formats = {layer.name: (layer.format, layer.kernel) for layer in report.layers}
    assert formats["0"] == formats["2"] == ("2:4", "reference (cpu)"), str(report)
    assert formats["4"][0] == "dense"
    assert code.count(OP_NAME) >= 2
    assert counters["sparse_compile"]["semi_structured_layers"] == 2
    assert counters["sparse_compile"]["semi_structured_weights"] == 2
    assert "2 of 3 linear layers run as 2:4" in str(report)


def test_report_says_why_a_layer_stays_dense():
    model = mlp()
    apply_nm(model, 2, 4, skip_last_layer=True)
    finalize(model).eval()
    report, _ = compile_and_check(model, torch.randn(3, 64), {"density_threshold": 0.5})
    head = next(layer for layer in report.layers if layer.name == "4")
    # 10x64 random: neither format takes it; the reason says why for each.
    assert head.format == "dense"
    assert "block density 1.00 > threshold 0.50" in head.reason and "not 2:4: inputs 0-3 of row 0" in head.reason
    text = str(report)
    assert "2:4" in text and "reference (cpu)" in text


def test_mixed_model_bsr_2_4_and_dense():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    with torch.no_grad():
        prune_blocks_(model[0].weight, 0.9, 16)  # empty blocks: BSR
        model[2].weight.mul_(nm_mask(model[2].weight, 2, 4))  # 2:4, every block kept
    x = torch.randn(2, 5, 64)
    report, code = compile_and_check(model, x, {"blocksize": 16})
    assert [(layer.format, layer.kernel) for layer in report.layers] == [
        ("bsr", "tile kernel (cpu) + relu"), ("2:4", "reference (cpu)"), ("dense", "inductor dense")
    ], str(report)
    assert cpu_bsr_op_name() in code and OP_NAME in code
    stats = counters["sparse_compile"]
    assert stats["bsr_layers"] == 1 and stats["semi_structured_layers"] == 1 and stats["dense_layers"] == 1
    assert "3 linear layers run sparse (1 bsr, 1 2:4)" in str(report)


def test_tied_weight_is_compressed_once():
    lin = nn.Linear(64, 64)
    with torch.no_grad():
        lin.weight.mul_(nm_mask(lin.weight, 2, 4))
    model = nn.Sequential(lin, nn.ReLU(), lin).eval()
    report, _ = compile_and_check(model, torch.randn(3, 64))
    assert [layer.format for layer in report.layers] == ["2:4", "2:4"]
    assert counters["sparse_compile"]["semi_structured_weights"] == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).to(dtype).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(nm_mask(layer.weight.float(), 2, 4).to(dtype))
    x = torch.randn(4, 64, dtype=dtype)
    report, _ = compile_and_check(model, x, atol=5e-2)
    assert [layer.format for layer in report.layers] == ["2:4", "2:4"]


def test_only_2_4_enabled_leaves_block_sparse_layers_dense():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    with torch.no_grad():
        prune_blocks_(model[0].weight, 0.9, 16)
        model[2].weight.mul_(nm_mask(model[2].weight, 1, 4))
    report, _ = compile_and_check(model, torch.randn(3, 64), {"formats": ["2:4"]})
    assert [layer.format for layer in report.layers] == ["dense", "2:4"], str(report)
    assert report.layers[0].reason.startswith("not 2:4: inputs ") and "hold 4 nonzeros" in report.layers[0].reason
    assert counters["sparse_compile"]["dense_not_2_4"] == 1


def test_formats_option_leaves_nm_layers_dense():
    model = mlp()
    apply_nm(model, 2, 4, skip_last_layer=True)
    finalize(model).eval()
    report, code = compile_and_check(model, torch.randn(3, 64), {"formats": ["bsr"]})
    assert OP_NAME not in code and all(layer.format == "dense" for layer in report.layers)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4)])
def test_nm_trained_vision_transformer(n, m):
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10
    )
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision's zero head would hide the encoder
    names = apply_nm(model, n, m, skip_last_layer=True, attention_in_proj=True, mode="forward")
    train_a_few_steps(model, (2, 3, 32, 32), steps=2)
    finalize(model).eval()
    report, code = compile_and_check(model, torch.randn(3, 3, 32, 32), atol=2e-4)
    nm_layers = [layer for layer in report.layers if layer.name in names or layer.name.endswith("in_proj")]
    assert len(nm_layers) == 2 * 4, str(report)
    assert all(layer.format == "2:4" for layer in nm_layers), str(report)
    assert code.count(OP_NAME) >= 8 and counters["sparse_compile"]["semi_structured_layers"] == 8
