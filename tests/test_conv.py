"""Convolutions under the sparse backend, inference: 1x1 convolutions run in the linears' sparse
formats (``passes/sparse_conv.py``), every other convolution stays dense with the reason, and the
block pruning helper for convolutions (``prune_conv1x1_blocks_``)."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import sparse_compile
from compile_helpers import compile_and_run, float64_reference
from sparse_compile import measure
from sparse_compile.formats.base import ReasonCode
from sparse_compile.passes import sparse_conv, sparse_linear
from sparse_compile.pruning import prune_blocks_, prune_conv1x1_blocks_

# Every test compiles nn.Sequential.forward afresh: without a reset Dynamo's recompile limit
# would run later tests eagerly, past the backend.
pytestmark = pytest.mark.usefixtures("fresh_compiler")

THRESHOLD = {"density_threshold": 0.5, "blocksize": 16}  # no timing: the decision is the density's


class Bottleneck(nn.Module):
    """A torchvision ResNet bottleneck, small: 1x1, 3x3 (stride), 1x1, each with BatchNorm; a
    1x1 (stride) projection on the shortcut."""

    def __init__(self, cin: int, width: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.downsample(x))


def mini_resnet() -> nn.Module:
    """Two bottlenecks (the second with stride 2) and a linear head: 6 conv1x1, 2 conv kxk, 1 linear."""
    model = nn.Sequential(
        Bottleneck(32, 32, 64, 1), Bottleneck(64, 32, 128, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)
    )
    with torch.no_grad():  # BatchNorm statistics that make folding change the weights
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
                module.bias.normal_()
    return model.eval()


def rows(report, kind):
    return [layer for layer in report.layers if layer.kind == kind]


@pytest.fixture(autouse=True)
def _fresh_counters():
    counters["sparse_compile"].clear()
    yield


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(measure.CACHE_ENV, str(tmp_path))
    measure.forget_loaded_caches()
    yield
    measure.forget_loaded_caches()


def test_bottlenecks_run_their_1x1_convs_as_bsr():
    torch.manual_seed(0)
    model = mini_resnet()
    pruned = prune_conv1x1_blocks_(model, 0.75, 16)
    assert len(pruned) == 6
    x = torch.randn(2, 32, 8, 8)
    compiled, out = compile_and_run(model, x, THRESHOLD)
    torch.testing.assert_close(out, float64_reference(model, x).float(), rtol=1e-4, atol=1e-4)
    report = sparse_compile.report(compiled)
    conv1x1, kxk, linear = rows(report, "conv1x1"), rows(report, "conv kxk"), rows(report, "linear")
    assert len(conv1x1) == 6 and len(kxk) == 2 and len(linear) == 1
    assert all(layer.format == "bsr" and layer.blocksize == 16 for layer in conv1x1), str(report)
    assert all(layer.density == pytest.approx(0.25) for layer in conv1x1)  # BN folding keeps zero blocks
    assert all(layer.format == "dense" and layer.reason_code is ReasonCode.CONV_NOT_MATMUL for layer in kxk)
    if torch._C._has_mkldnn:  # dense convolutions keep Inductor's oneDNN packing (as backend="inductor" with freezing)
        assert all(layer.kernel == "oneDNN convolution (packed)" for layer in kxk), str(report)
    assert {(layer.out_features, layer.in_features) for layer in kxk} == {(32, 32 * 9)}
    assert linear[0].format == "dense"  # not pruned
    assert "6 of 7 layers (1 linear, 6 conv1x1) run as BSR; 2 conv kxk dense" in str(report), str(report)
    stats = counters["sparse_compile"]
    assert stats["conv1x1_layers"] == 6 and stats["conv1x1_sparse"] == 6
    assert stats["conv_kxk_layers"] == 2 and stats["conv_kxk_sparse"] == 0 and stats["dense_conv_not_matmul"] == 2

    # Channels-last input (Dynamo recompiles for the new strides): the same rows, the same result.
    x_cl = torch.randn(2, 32, 8, 8).to(memory_format=torch.channels_last)
    with torch.no_grad():
        out_cl = compiled(x_cl)
    torch.testing.assert_close(out_cl, float64_reference(model, x_cl).float(), rtol=1e-4, atol=1e-4)
    assert stats["conv1x1_sparse"] == 12


@pytest.mark.parametrize(
    "stride, bias, channels_last, dims",
    [(2, False, True, 2), (2, True, False, 1)],  # stride 1 with a (folded) bias: the bottlenecks above
    ids=["stride2-channels_last", "conv1d-stride2-bias"],
)
def test_conv1x1_without_batchnorm(stride, bias, channels_last, dims):
    torch.manual_seed(1)
    conv = nn.Conv2d if dims == 2 else nn.Conv1d
    model = nn.Sequential(conv(48, 64, 1, stride=stride, bias=bias), nn.ReLU(), conv(64, 32, 1, bias=not bias)).eval()
    prune_conv1x1_blocks_(model, 0.5, 16)
    x = torch.randn(3, 48, *([7] * dims))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    compiled, out = compile_and_run(model, x, THRESHOLD)
    reference = float64_reference(model, x).float()
    assert out.shape == reference.shape
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    report = sparse_compile.report(compiled)
    assert [layer.format for layer in rows(report, "conv1x1")] == ["bsr", "bsr"], str(report)
    assert counters["sparse_compile"]["conv1x1_sparse"] == 2


def test_pass_analyses_the_batchnorm_folded_weight(monkeypatch):
    """Freezing folds BatchNorm into the conv before ``post_grad_custom_pre_pass``: the weight the
    pass decides on is ``W * gamma / sqrt(var + eps)`` per output channel."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(32, 48, 1, bias=False), nn.BatchNorm2d(48)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].running_mean.normal_()
        model[1].weight.normal_()
    prune_conv1x1_blocks_(model, 0.5, 16)
    seen = []
    real_decide = sparse_linear.decide

    def spy(weight, *args, **kwargs):
        seen.append(weight.clone())
        return real_decide(weight, *args, **kwargs)

    monkeypatch.setattr(sparse_linear, "decide", spy)
    x = torch.randn(2, 32, 5, 5)
    compiled, out = compile_and_run(model, x, THRESHOLD)
    bn = model[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded = model[0].weight.detach()[:, :, 0, 0] * scale.detach()[:, None]
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], folded, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, float64_reference(model, x).float(), rtol=1e-4, atol=1e-4)
    assert sparse_compile.report(compiled).layers[0].format == "bsr"


def test_convolutions_that_are_no_matmul_stay_dense_with_the_reason():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(32, 32, 3, padding=1),  # kxk
        nn.Conv2d(32, 32, 1, groups=32),  # depthwise 1x1
        nn.Conv2d(32, 32, 1, padding=1),  # padded 1x1
        nn.ConvTranspose2d(32, 16, 1),  # transposed
    ).eval()
    with torch.no_grad():
        for module in model:  # sparse enough to run sparse, if the pass could
            prune_blocks_(module.weight.data.view(module.weight.shape[0], -1), 0.75, 16)
    with pytest.warns(UserWarning, match="prune_conv1x1_blocks_ pruned no layer"):
        assert prune_conv1x1_blocks_(copy.deepcopy(model), 0.5, 16) == []
    x = torch.randn(2, 32, 6, 6)
    compiled, out = compile_and_run(model, x, THRESHOLD)
    torch.testing.assert_close(out, float64_reference(model, x).float(), rtol=1e-4, atol=1e-4)
    layers = sparse_compile.report(compiled).layers
    assert [layer.kind for layer in layers] == ["conv kxk", "conv1x1", "conv1x1", "conv1x1"]
    assert all(layer.format == "dense" and layer.reason_code is ReasonCode.CONV_NOT_MATMUL for layer in layers)
    reasons = " | ".join(layer.reason for layer in layers)
    for words in ("3x3 convolution", "groups=32", "padded 1x1", "transposed"):
        assert words in reasons, reasons
    stats = counters["sparse_compile"]
    assert stats["dense_conv_not_matmul"] == 4 and stats["conv1x1_sparse"] == 0 and stats["bsr_layers"] == 0


def test_a_dense_1x1_conv_keeps_inductors_onednn_convolution():
    """No all-zero block: nothing for the pass to skip, so freezing packs it for oneDNN as
    ``backend="inductor"`` would; the report still lists it."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(32, 48, 1), nn.ReLU(), nn.Conv2d(48, 48, 1)).eval()
    prune_blocks_(model[2].weight.data.view(48, 48), 0.75, 16)
    x = torch.randn(2, 32, 6, 6)
    compiled, out = compile_and_run(model, x, THRESHOLD)
    torch.testing.assert_close(out, float64_reference(model, x).float(), rtol=1e-4, atol=1e-4)
    dense, sparse = sparse_compile.report(compiled).layers
    assert dense.kind == "conv1x1" and dense.format == "dense" and dense.reason_code is ReasonCode.NO_BLOCK_TO_SKIP
    if torch._C._has_mkldnn:
        assert dense.kernel == "oneDNN convolution (packed)" and "packed at freezing" in dense.reason
    assert sparse.kind == "conv1x1" and sparse.format == "bsr"
    stats = counters["sparse_compile"]
    assert stats["conv1x1_layers"] == 2 and stats["conv1x1_sparse"] == 1 and stats["dense_no_block_to_skip"] == 1


def test_a_conv_rewrite_that_fails_leaves_the_conv_dense_with_the_reason(monkeypatch):
    """A compile never fails because of the pass: a conv it cannot rewrite stays as it was."""

    def broken(*args, **kwargs):
        raise RuntimeError("no rewrite today")

    monkeypatch.setattr(sparse_conv, "replace_conv1x1", broken)
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(32, 32, 1)).eval()
    prune_conv1x1_blocks_(model, 0.75, 16)
    x = torch.randn(2, 32, 5, 5)
    compiled, out = compile_and_run(model, x, THRESHOLD)
    torch.testing.assert_close(out, float64_reference(model, x).float(), rtol=1e-4, atol=1e-4)
    [layer] = sparse_compile.report(compiled).layers
    assert layer.kind == "conv1x1" and layer.format == "dense" and layer.reason_code is ReasonCode.OTHER
    assert "no rewrite today" in layer.reason and layer.name == "0"
    assert counters["sparse_compile"]["conv1x1_sparse"] == 0 and counters["sparse_compile"]["inductor_failures"] == 0


def test_measured_choice_times_the_conv_with_its_output_pixels(monkeypatch, fresh_cache):
    """``density_threshold="auto"``: a 1x1 conv is timed as the linear it is, over N*H_out*W_out rows."""
    seen = []

    def timer(requests):
        seen.extend(requests)
        return [1.0 if r.candidate.kind == "dense" else 0.5 for r in requests]

    monkeypatch.setattr(measure, "timer", timer)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(64, 64, 1, stride=2)).eval()
    prune_conv1x1_blocks_(model, 0.75, 32)
    x = torch.randn(2, 64, 8, 8)
    compiled, out = compile_and_run(model, x, {"check_graph": False, "formats": ("bsr",)})
    torch.testing.assert_close(out, float64_reference(model, x).float(), rtol=1e-4, atol=1e-4)
    assert seen and {(r.layer.rows, r.layer.out_features, r.layer.in_features) for r in seen} == {(2 * 4 * 4, 64, 64)}, str(sparse_compile.report(compiled))
    layer = sparse_compile.report(compiled).layers[0]
    assert layer.kind == "conv1x1" and layer.format == "bsr" and layer.time_ms == 0.5 and layer.dense_ms == 1.0


def test_prune_conv1x1_blocks_prunes_what_the_backend_converts():
    torch.manual_seed(5)
    model = mini_resnet()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # kxk convs are not what the helper promises: no warning
        pruned = prune_conv1x1_blocks_(model, 0.75, 16)
    assert pruned == [
        "0.conv1.weight", "0.conv3.weight", "0.downsample.0.weight",
        "1.conv1.weight", "1.conv3.weight", "1.downsample.0.weight",
    ]  # fmt: skip
    for name, param in model.named_parameters():
        if name in pruned:
            matrix = param.detach()[:, :, 0, 0]
            blocks = matrix.unflatten(0, (-1, 16)).unflatten(2, (-1, 16)).abs().sum(dim=(1, 3))
            assert (blocks == 0).float().mean().item() == pytest.approx(0.75)
            kept = blocks != 0  # the kept blocks are the largest ones, untouched
            original = before[name][:, :, 0, 0].unflatten(0, (-1, 16)).unflatten(2, (-1, 16))
            norms = original.pow(2).sum(dim=(1, 3))
            assert norms[kept].min() >= norms[~kept].max()
            torch.testing.assert_close(matrix, before[name][:, :, 0, 0] * kept.repeat_interleave(16, 0).repeat_interleave(16, 1))
        else:
            torch.testing.assert_close(param.detach(), before[name])  # kxk convs, BatchNorm, linear
    only_first = prune_conv1x1_blocks_(mini_resnet(), 0.5, 16, filter_fn=lambda name, m: name.startswith("0."))
    assert only_first == ["0.conv1.weight", "0.conv3.weight", "0.downsample.0.weight"]
    grouped = nn.Sequential(nn.Conv2d(32, 32, 1), nn.Conv2d(32, 32, 1, groups=2))
    with pytest.warns(UserWarning, match=r"1 1x1 convolutions the backend runs dense: 1 \(groups=2\)"):
        assert prune_conv1x1_blocks_(grouped, 0.5, 16) == ["0.weight"]


@pytest.mark.gpu
def test_gpu_a_2_4_conv1x1_runs_on_the_2_4_kernel():
    # Bi-Mask's CNNs: a 1x1 conv whose [out, in] weight is 2:4 runs as the 2:4 linear op over its
    # channels on CUDA (on CPU freezing packs it for oneDNN: no 2:4 conv kernel there).
    from sparse_compile.training.nm_mask import nm_mask

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(128, 256, 1), nn.ReLU()).half().cuda().eval()
    with torch.no_grad():
        weight = model[0].weight
        weight.mul_(nm_mask(weight.reshape(256, 128).float(), 2, 4).reshape(weight.shape).to(weight.dtype))
    x = torch.randn(2, 128, 8, 8, dtype=torch.half, device="cuda")
    counters["sparse_compile"].clear()
    compiled, out = compile_and_run(model, x, options={"formats": ("2:4",)})
    report = sparse_compile.report(compiled)
    assert [(layer.kind, layer.format) for layer in report.layers] == [("conv1x1", "2:4")], str(report)
    assert counters["sparse_compile"]["semi_structured_layers"] == 1
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=2e-2, rtol=2e-2)
