"""The sparse backend on inputs that used to go wrong (issue 13): static inputs, Inductor failures,
the fused transformer fast path, tied weights, layer names, a process without Triton.

Each test checks the output against a float64 reference and what the backend did through the
report and ``torch._dynamo.utils.counters["sparse_compile"]``.
"""

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import sparse_compile
import sparse_compile.backend as backend
from sparse_compile.pruning import prune_blocks_, prune_linear_blocks_

from compile_helpers import TileKernelCalls, float64_reference

pytestmark = pytest.mark.usefixtures("fresh_compiler", "fresh_counters")

OPTIONS = {"blocksize": 16}


def sparse_linear(in_features, out_features, bias=True):
    layer = nn.Linear(in_features, out_features, bias=bias)
    prune_blocks_(layer.weight.data, 0.8, 16)
    return layer


@pytest.fixture
def fresh_counters():
    counters["sparse_compile"].clear()  # torch._dynamo.reset() keeps the counters
    yield


def stats():
    return counters["sparse_compile"]


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = sparse_linear(64, 96)
        self.second = sparse_linear(96, 48, bias=False)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


# --- 1. a user's static input stays an input -----------------------------------------------


class AddsExtra(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = sparse_linear(64, 32)

    def forward(self, x, extra):
        return self.lin(x) + extra.exp()


def test_static_input_is_not_frozen():
    # mark_static_address (CUDA-graph input buffers, static KV caches) says "same address every
    # call", not "same value": the compiled code must read it on every call.
    model = AddsExtra().eval()
    x, extra = torch.randn(4, 64), torch.randn(32)
    torch._dynamo.mark_static_address(extra)
    compiled = torch.compile(model, backend="sparse", options=OPTIONS)
    with torch.no_grad():
        compiled(x, extra)
        extra.add_(torch.rand(32) + 0.5)  # in place: same address, new values
        out = compiled(x, extra)
    torch.testing.assert_close(out.double(), float64_reference(model, x, extra), atol=1e-4, rtol=1e-4)
    assert stats()["bsr_layers"] == 1


def test_second_instance_of_a_class_runs_its_own_weights():
    # Dynamo shares compiled code between instances of one module class, passing each one's
    # parameters as inputs; frozen weights must not be shared with them.
    x = torch.randn(3, 64)
    for _ in range(2):
        model = TwoLinears().eval()
        with torch.no_grad():
            out = torch.compile(model, backend="sparse", options=OPTIONS)(x)
        torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)
    assert stats()["bsr_layers"] == 4  # compiled twice, two BSR layers each


# --- 2. Inductor cannot compile the graph ----------------------------------------------------


@pytest.fixture
def warn_again(monkeypatch):
    """Forget which fallbacks already warned in this process."""
    monkeypatch.setattr(backend, "_warned", set())


def _make_codegen_fail(monkeypatch, fails_when):
    """Inductor's code generation raises a C++ compile error whenever ``fails_when()`` holds."""
    from torch._inductor.exc import CppCompileError
    from torch._inductor.graph import GraphLowering

    original = GraphLowering.compile_to_module

    def compile_to_module(self, *args, **kwargs):
        if fails_when():
            raise CppCompileError(["g++", "kernel.cpp"], "error: 'decltype' evaluates to 'float'")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GraphLowering, "compile_to_module", compile_to_module)


def test_cpp_compile_error_retried_without_vectorization(monkeypatch, warn_again):
    # pytorch/pytorch#179135: vectorized C++ that does not compile; simdlen=1 avoids it.
    _make_codegen_fail(monkeypatch, lambda: torch._inductor.config.cpp.simdlen != 1)
    model = TwoLinears().eval()
    x = torch.randn(5, 64)
    compiled = torch.compile(model, backend="sparse", options=OPTIONS)
    with pytest.warns(RuntimeWarning, match="simdlen=1"), torch.no_grad():
        out = compiled(x)
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)
    assert stats()["fallback_cpp_simdlen_1"] == 1 and stats()["fallback_without_codegen"] == 0
    assert stats()["bsr_layers"] == 2
    assert "pytorch/pytorch#179135" in str(sparse_compile.report(compiled))


def test_inductor_failure_falls_back_to_the_rewritten_graph(monkeypatch, warn_again):
    _make_codegen_fail(monkeypatch, lambda: True)
    model = TwoLinears().eval()
    x = torch.randn(3, 7, 64)
    compiled = torch.compile(model, backend="sparse", options=OPTIONS)
    with pytest.warns(RuntimeWarning, match="without Inductor's code generation"), torch.no_grad():
        out = compiled(x)
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)
    assert stats()["fallback_without_codegen"] == 1 and stats()["bsr_layers"] == 2
    # The sparse layers still run sparse: the op is called at run time.
    calls = TileKernelCalls()
    with torch.no_grad():
        compiled(x)
    assert len(calls) == 2
    report = sparse_compile.report(compiled)
    assert [layer.format for layer in report.layers] == ["bsr", "bsr"]
    assert "without Inductor's code generation" in str(report) and "C++ compile error" in str(report)

    # Once per process: a second model that falls back does not warn again.
    other = TwoLinears().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with torch.no_grad():
            out = torch.compile(other, backend="sparse", options=OPTIONS)(x)
    torch.testing.assert_close(out.double(), float64_reference(other, x), atol=1e-4, rtol=1e-4)
    assert stats()["fallback_without_codegen"] == 2


@pytest.mark.slow
def test_swin_vectorized_cpp_bug_is_worked_around():
    # pytorch/pytorch#179135: with torch 2.11 Inductor's vectorized C++ for torchvision's shifted
    # windows (window 7 over a padded 8x8 grid) does not compile on CPU; backend="inductor"
    # fails the same way. The smallest swin seen to hit it; slow because it compiles twice.
    from torchvision.models.swin_transformer import SwinTransformer

    model = SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[1], window_size=[7, 7],
        stochastic_depth_prob=0.0, num_classes=10,
    ).eval()
    nn.init.normal_(model.head.weight)  # its std 0.02 init leaves outputs too small to compare
    prune_linear_blocks_(model, 0.75, 16, filter_fn=lambda name, _: name.startswith("features"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = torch.compile(model, backend="sparse", options=OPTIONS)(x)
    expected = float64_reference(model, x)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    assert stats()["bsr_layers"] == 8
    # Still right once the upstream bug is fixed: then nothing fails and nothing falls back.
    assert stats()["inductor_failures"] == stats()["fallback_cpp_simdlen_1"]
    assert stats()["fallback_without_codegen"] == 0


# --- 3. the fused transformer fast path ------------------------------------------------------


def _sparse_encoder():
    layer = nn.TransformerEncoderLayer(64, 2, 128, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    prune_linear_blocks_(encoder, 0.9, 16)
    return encoder


def test_fused_encoder_layer_runs_sparse():
    # PyTorch runs the layer as one fused op in eval under no_grad; the backend decomposes it.
    encoder = _sparse_encoder()
    x = torch.randn(2, 5, 64)
    compiled = torch.compile(encoder, backend="sparse", options=OPTIONS)
    with torch.no_grad():
        out = compiled(x)
    torch.testing.assert_close(out.double(), float64_reference(encoder, x), atol=1e-4, rtol=1e-4)
    report = sparse_compile.report(compiled)
    assert [(layer.name, layer.format) for layer in report.layers] == [
        ("layers.0.self_attn.in_proj", "bsr"),
        ("layers.0.self_attn.out_proj", "bsr"),
        ("layers.0.linear1", "bsr"),
        ("layers.0.linear2", "bsr"),
    ]
    assert stats()["bsr_layers"] == 4 and stats()["dense_fused_fast_path"] == 0


@pytest.mark.parametrize("norm_first, activation", [(True, "gelu")])
def test_fused_encoder_layer_variants(norm_first, activation):
    layer = nn.TransformerEncoderLayer(64, 2, 128, dropout=0.0, activation=activation, norm_first=norm_first, batch_first=True)
    layer.eval()
    prune_linear_blocks_(layer, 0.9, 16)
    x = torch.randn(3, 4, 64)
    with torch.no_grad():
        out = torch.compile(layer, backend="sparse", options=OPTIONS)(x)
    torch.testing.assert_close(out.double(), float64_reference(layer, x), atol=1e-4, rtol=1e-4)
    assert stats()["bsr_layers"] == 4


def test_fused_encoder_layer_with_mask_is_reported_with_its_sparsity():
    # A padding mask is not decomposed: the fused op stays, and the report says what it holds.
    encoder = _sparse_encoder()
    x = torch.randn(2, 5, 64)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    compiled = torch.compile(encoder, backend="sparse", options=OPTIONS)
    with torch.no_grad():
        out = compiled(x, src_key_padding_mask=padding)
        expected = copy.deepcopy(encoder).double()(x.double(), src_key_padding_mask=padding)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    report = sparse_compile.report(compiled)
    names = [layer.name for layer in report.layers]
    assert names == ["layers.0.self_attn.in_proj", "layers.0.self_attn.out_proj", "layers.0.linear1", "layers.0.linear2"]
    for layer in report.layers:
        assert layer.format == "dense" and layer.fused_op == "aten._transformer_encoder_layer_fwd"
        assert layer.density is not None and layer.density <= 0.15
        assert "set_fastpath_enabled(False)" in layer.reason
    assert stats()["dense_fused_fast_path"] == 4 and stats()["bsr_layers"] == 0


def test_fast_path_disabled_runs_the_masked_encoder_sparse():
    # The way the report points to.
    encoder = _sparse_encoder()
    x = torch.randn(2, 5, 64)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        compiled = torch.compile(encoder, backend="sparse", options=OPTIONS)
        with torch.no_grad():
            out = compiled(x, src_key_padding_mask=padding)
            expected = copy.deepcopy(encoder).double()(x.double(), src_key_padding_mask=padding)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    assert stats()["bsr_layers"] == 4 and stats()["dense_fused_fast_path"] == 0


# --- 4. tied weights -------------------------------------------------------------------------


class TiedLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.encode = sparse_linear(64, 64)
        self.decode = nn.Linear(64, 64)
        self.decode.weight = self.encode.weight  # one Parameter, two layers

    def forward(self, x):
        return self.decode(torch.tanh(self.encode(x)))


def test_tied_weight_is_converted_once():
    model = TiedLinears().eval()
    x = torch.randn(6, 64)
    compiled = torch.compile(model, backend="sparse", options=OPTIONS)
    with torch.no_grad():
        out = compiled(x)
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)
    assert [(layer.name, layer.format) for layer in sparse_compile.report(compiled).layers] == [
        ("encode", "bsr"),
        ("decode", "bsr"),
    ]
    assert stats()["bsr_layers"] == 2 and stats()["bsr_weights"] == 1


# --- 10. layers named after their weight -----------------------------------------------------


class Attention(nn.Module):
    """Calls F.linear with its children's weights, as torchvision's swin and timm's eva02 do."""

    def __init__(self):
        super().__init__()
        self.qkv = sparse_linear(64, 192)
        self.proj = sparse_linear(64, 64)

    def forward(self, x):
        q, k, v = nn.functional.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        return nn.functional.linear(q * k.sigmoid() + v, self.proj.weight, self.proj.bias)


def test_layer_named_after_its_weight_parameter():
    model = nn.Sequential(nn.Sequential(Attention()), nn.ReLU()).eval()
    x = torch.randn(2, 3, 64)
    compiled = torch.compile(model, backend="sparse", options=OPTIONS)
    with torch.no_grad():
        out = compiled(x)
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)
    names = [layer.name for layer in sparse_compile.report(compiled).layers]
    assert names == ["0.0.qkv", "0.0.proj"]


# --- 7. no Triton ----------------------------------------------------------------------------


def test_device_without_kernel_stays_dense_with_reason(monkeypatch):
    # What a CUDA weight meets in a process without triton (simulated: this machine has no GPU).
    from sparse_compile.formats.bsr import BSR

    monkeypatch.setattr(BSR, "unavailable_reason", lambda device: "no Triton kernel: install triton")
    model = TwoLinears().eval()
    x = torch.randn(3, 64)
    compiled = torch.compile(model, backend="sparse", options=OPTIONS)
    with torch.no_grad():
        out = compiled(x)
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)
    layers = sparse_compile.report(compiled).layers
    assert [layer.format for layer in layers] == ["dense", "dense"]
    assert all("install triton" in layer.reason for layer in layers)
    assert stats()["dense_no_kernel_for_device"] == 2


BLOCK_TRITON = """
import importlib.abc, sys

class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError("No module named 'triton' (blocked by the test)")

sys.meta_path.insert(0, NoTriton())
"""


def test_works_without_triton():
    code = BLOCK_TRITON + (
        "import torch\n"
        "import sparse_compile\n"
        "from sparse_compile.kernels import HAS_TRITON, kernel_unavailable_reason\n"
        "from sparse_compile.pruning import prune_blocks_\n"
        "from torch._dynamo.utils import counters\n"
        "assert not HAS_TRITON and 'triton' not in sys.modules\n"
        "assert 'install triton' in kernel_unavailable_reason('cuda'), kernel_unavailable_reason('cuda')\n"
        "m = torch.nn.Linear(64, 48).eval()\n"
        "prune_blocks_(m.weight.data, 0.8, 16)\n"
        "x = torch.randn(3, 64)\n"
        "# A numeric threshold: the point here is running without triton, not a measured choice.\n"
        "with torch.no_grad(): y = torch.compile(m, backend='sparse', options={'blocksize': 16, 'density_threshold': 0.5})(x)\n"
        "ref = x.double() @ m.weight.double().T + m.bias.double()\n"
        "assert (y.double() - ref).abs().max() < 1e-4\n"
        "assert counters['sparse_compile']['bsr_layers'] == 1, dict(counters['sparse_compile'])\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout


# --- 12. PyTorch's logging -------------------------------------------------------------------


def test_torch_logs_shows_each_layer_at_debug():
    code = (
        "import torch\n"
        "from sparse_compile.pruning import prune_blocks_\n"
        "m = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 8)).eval()\n"
        "prune_blocks_(m[0].weight.data, 0.8, 16)\n"
        "with torch.no_grad(): torch.compile(m, backend='sparse', options={'blocksize': 16, 'density_threshold': 0.5})(torch.randn(2, 64))\n"
    )
    env = {**__import__("os").environ, "TORCH_LOGS": "+sparse_compile"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 of 2 linear layers run as BSR" in result.stderr
    assert "0 (48x64 float32): bsr, block 16" in result.stderr
    assert "1 (8x48 float32): dense, block density 1.00 > threshold 0.50" in result.stderr
