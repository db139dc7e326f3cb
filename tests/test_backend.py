"""The sparse backend end to end on CPU: which layers it rewrites, and that outputs stay right.

Reference: the eager model in float64 (its own weights, already sparse), so a test fails if the
compiled model is wrong even where eager float32 would be wrong the same way.
"""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code
from torch.nn.utils import parametrize

import sparse_compile
from sparse_compile.pruning import prune_blocks_

from compile_helpers import cpu_bsr_op_name

OP_NAME = cpu_bsr_op_name()  # what a converted layer calls on CPU
CUDA_OP_NAME = "sparse_compile.bsr_linear"

TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (8e-2, 5e-2)}


pytestmark = pytest.mark.usefixtures("fresh_compiler", "fresh_counters")


@pytest.fixture
def fresh_counters():
    counters["sparse_compile"].clear()  # torch._dynamo.reset() keeps the counters
    yield


def float64_reference(model, x):
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        return reference(x.double())


def compile_and_run(model, x, **compile_kwargs):
    compiled = torch.compile(model, backend="sparse", fullgraph=True, **compile_kwargs)
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, x)
    return compiled, out, "\n".join(codes)


class ThreeLinears(nn.Module):
    """A sparse layer with bias, a sparse layer without bias, and a dense layer."""

    def __init__(self, features=(64, 96, 80, 48), sparsity=0.8, blocksize=16, dtype=torch.float32):
        super().__init__()
        a, b, c, d = features
        self.sparse_bias = nn.Linear(a, b, dtype=dtype)
        self.sparse_nobias = nn.Linear(b, c, bias=False, dtype=dtype)
        self.dense = nn.Linear(c, d, dtype=dtype)
        with torch.no_grad():
            prune_blocks_(self.sparse_bias.weight, sparsity, blocksize)
            prune_blocks_(self.sparse_nobias.weight, sparsity, blocksize)

    def forward(self, x):
        return self.dense(torch.relu(self.sparse_nobias(torch.relu(self.sparse_bias(x)))))


@pytest.mark.parametrize("shape", [(5, 64), (3, 7, 64), (1, 64), (33, 64)])
def test_sparse_layers_rewritten_dense_layer_kept(shape):
    model = ThreeLinears().eval()
    x = torch.randn(shape)
    compiled, out, code = compile_and_run(model, x, options={"blocksize": 16})
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)
    assert code.count(OP_NAME) >= 2
    assert counters["sparse_compile"]["bsr_layers"] == 2 and counters["sparse_compile"]["dense_no_block_to_skip"] == 1
    formats = {layer.name: layer.format for layer in sparse_compile.report(compiled).layers}
    assert formats == {"sparse_bias": "bsr", "sparse_nobias": "bsr", "dense": "dense"}
    dense = sparse_compile.report(compiled).dense_layers[0]
    assert "no block to skip" in dense.reason and dense.density == pytest.approx(1.0)


def test_dense_model_is_not_rewritten():
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    x = torch.randn(4, 64)
    compiled, out, code = compile_and_run(model, x)
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)
    assert OP_NAME not in code
    assert [layer.format for layer in sparse_compile.report(compiled).layers] == ["dense", "dense"]
    assert counters["sparse_compile"]["bsr_layers"] == 0 and counters["sparse_compile"]["dense_layers"] == 2


def test_dims_not_divisible_by_the_block_are_padded():
    model = ThreeLinears(features=(100, 70, 45, 30), sparsity=0.7, blocksize=32).eval()
    x = torch.randn(9, 100)
    compiled, out, code = compile_and_run(model, x, options={"blocksize": 32, "density_threshold": 0.5})
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)
    assert OP_NAME in code


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    model = ThreeLinears(dtype=dtype).eval()
    x = torch.randn(6, 64, dtype=dtype)
    compiled, out, code = compile_and_run(model, x, options={"blocksize": 16})
    assert out.dtype == dtype and OP_NAME in code
    assert counters["sparse_compile"]["bsr_layers"] == 2
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=atol, rtol=rtol)


def test_float64_model_falls_back_to_dense_with_reason():
    model = ThreeLinears(dtype=torch.float64).eval()
    x = torch.randn(4, 64, dtype=torch.float64)
    compiled, out, code = compile_and_run(model, x)
    torch.testing.assert_close(out, float64_reference(model, x))
    assert OP_NAME not in code
    reasons = {layer.reason for layer in sparse_compile.report(compiled).layers}
    assert all("float64 has no sparse kernel" in reason for reason in reasons)
    assert counters["sparse_compile"]["dense_unsupported_dtype"] == 3


def test_all_zero_weight_gives_bias():
    model = nn.Linear(64, 48).eval()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.normal_()
    x = torch.randn(3, 64)
    compiled, out, code = compile_and_run(model, x, options={"blocksize": 16})
    assert OP_NAME in code
    torch.testing.assert_close(out, model.bias.detach().expand(3, -1))
    assert sparse_compile.report(compiled).layers[0].density == 0.0


class BlockMask(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight):
        return weight * self.mask


def test_parametrized_mask_is_folded_and_rewritten():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    for layer in (model[0], model[2]):
        block_keep = torch.rand(layer.out_features // 16, layer.in_features // 16) < 0.2
        mask = block_keep.repeat_interleave(16, 0).repeat_interleave(16, 1).float()
        parametrize.register_parametrization(layer, "weight", BlockMask(mask))
    x = torch.randn(2, 5, 64)
    compiled, out, code = compile_and_run(model, x, options={"blocksize": 16})
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)
    assert code.count(OP_NAME) >= 2
    assert [layer.format for layer in sparse_compile.report(compiled).layers] == ["bsr", "bsr"]
    assert counters["sparse_compile"]["bsr_layers"] == 2


def test_torch_ao_pruning_masks():
    from torch.ao.pruning import WeightNormSparsifier

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    sparsifier = WeightNormSparsifier(sparsity_level=0.9, sparse_block_shape=(16, 16), zeros_per_block=256)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    x = torch.randn(7, 64)
    expected = float64_reference(model, x)

    # Dynamo does not trace torch.ao's FakeSparsity parametrization (it is on its skip list), so
    # the mask is applied outside the graph and the weight is not a constant: dense, but right.
    compiled = torch.compile(model, backend="sparse", options={"blocksize": 16})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).double(), expected, atol=1e-4, rtol=1e-4)
    assert all(layer.format == "dense" for layer in sparse_compile.report(compiled).layers)

    # squash_mask() folds the masks into the weights, the documented step before compiling.
    torch._dynamo.reset()
    sparsifier.squash_mask()
    compiled, out, code = compile_and_run(model, x, options={"blocksize": 16})
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    assert [layer.format for layer in sparse_compile.report(compiled).layers] == ["bsr", "bsr"]


def test_grad_enabled_without_supermask_compiles_unchanged_and_says_so():
    model = ThreeLinears()
    x = torch.randn(4, 64, requires_grad=True)
    compiled = torch.compile(model, backend="sparse")
    out = compiled(x)
    out.sum().backward()
    expected = model(x.detach())
    torch.testing.assert_close(out, expected)
    report = sparse_compile.report(compiled)
    # Training graph: only Supermask linears run masked (tests/test_sparse_training.py); these stay dense.
    assert [layer.format for layer in report.layers] == ["dense"] * 3
    assert all("not a Supermask" in layer.reason for layer in report.layers)
    assert "0 of 3 linear layers run masked (training graph)" in str(report)


def test_report_before_the_first_call():
    compiled = torch.compile(ThreeLinears(), backend="sparse")
    assert "nothing compiled yet" in str(sparse_compile.report(compiled))


def test_report_table_names_every_layer():
    model = ThreeLinears().eval()
    compiled, _, _ = compile_and_run(model, torch.randn(2, 64), options={"blocksize": 16})
    text = str(sparse_compile.report(compiled))
    assert "2 of 3 linear layers run as BSR" in text
    for name in ("sparse_bias", "sparse_nobias", "dense", "96x64", "no block to skip", "tile kernel (cpu)", "inductor dense"):
        assert name in text


def test_report_keeps_models_apart():
    first, second = ThreeLinears().eval(), nn.Sequential(nn.Linear(64, 64)).eval()
    compiled_first, _, _ = compile_and_run(first, torch.randn(2, 64), options={"blocksize": 16})
    compiled_second, _, _ = compile_and_run(second, torch.randn(2, 64))
    assert len(sparse_compile.report(compiled_first).layers) == 3
    assert len(sparse_compile.report(compiled_second).layers) == 1
    assert len(sparse_compile.report().layers) == 4


def test_global_freezing_setting_is_fine():
    # With Inductor freezing on while Dynamo traces, parameters arrive as graph attributes
    # instead of inputs; the rewrite and the report must not depend on which.
    model = ThreeLinears().eval()
    x = torch.randn(5, 64)
    with torch._inductor.config.patch(freezing=True):
        compiled, out, code = compile_and_run(model, x, options={"blocksize": 16})
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)
    assert code.count(OP_NAME) >= 2
    assert [layer.format for layer in sparse_compile.report(compiled).layers] == ["bsr", "bsr", "dense"]


def test_new_batch_size_still_correct():
    model = ThreeLinears().eval()
    compiled = torch.compile(model, backend="sparse", options={"blocksize": 16})
    with torch.no_grad():
        for batch in (4, 9, 17):
            x = torch.randn(batch, 64)
            torch.testing.assert_close(compiled(x).double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)


def test_entry_point_works_without_import():
    code = (
        "import torch, sys\n"
        "m = torch.nn.Linear(32, 32).eval()\n"
        "with torch.no_grad(): y = torch.compile(m, backend='sparse')(torch.randn(2, 32))\n"
        "assert 'sparse_compile' in sys.modules\n"
        "print('ok', tuple(y.shape))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ok (2, 32)" in result.stdout


# --- GPU: the compiled Triton path. Skipped without CUDA; run on the GPU machine with `pytest -m gpu`.

GPU_TOLERANCES = {torch.float32: (1e-3, 1e-3), torch.float16: (2e-2, 2e-2), torch.bfloat16: (8e-2, 5e-2)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (7, 33, 64), (300, 64)])
def test_gpu_compiled_triton_path(dtype, shape):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = ThreeLinears(dtype=dtype).cuda().eval()
    x = torch.randn(shape, dtype=dtype, device="cuda")
    compiled, out, code = compile_and_run(model, x, options={"blocksize": 16})
    assert out.dtype == dtype and CUDA_OP_NAME in code
    atol, rtol = GPU_TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=atol, rtol=rtol)
    assert [layer.format for layer in sparse_compile.report(compiled).layers] == ["bsr", "bsr", "dense"]
    assert sparse_compile.report(compiled).layers[0].kernel == "triton bsr"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_vit_b_16_sized_layers(dtype):
    import torchvision

    from sparse_compile.pruning import prune_linear_blocks_

    torch.backends.cuda.matmul.allow_tf32 = False
    # ViT-B/16's widths (768, MLP 3072, 12 heads) in 2 of its 12 blocks: the same four layer
    # shapes as the whole model, a sixth of its compile (the whole ViT-B is the benchmarks').
    model = torchvision.models.VisionTransformer(
        image_size=64, patch_size=16, num_layers=2, hidden_dim=768, mlp_dim=3072, num_heads=12
    ).to(dtype).cuda().eval()
    prune_linear_blocks_(model, 0.9, 64, filter_fn=lambda name, _: name.startswith("encoder"))
    x = torch.randn(4, 3, 64, 64, dtype=dtype, device="cuda")
    compiled, out, code = compile_and_run(model, x, options={"blocksize": 64})
    assert len(sparse_compile.report(compiled).sparse_layers) == 2 * 4
    expected = float64_reference(model, x)
    scale = expected.abs().max()
    assert (out.double() - expected).abs().max() <= 2e-2 * scale


class InputScaledWeight(nn.Module):
    """A linear whose weight depends on the input: it cannot be a constant."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 32)
        prune_blocks_(self.linear.weight.data, 0.9, 16)

    def forward(self, x):
        return nn.functional.linear(x, self.linear.weight * x.mean(), self.linear.bias)


def test_runtime_weight_is_reported_dense_with_reason():
    model = InputScaledWeight().eval()
    x = torch.randn(4, 64)
    compiled, out, code = compile_and_run(model, x, options={"blocksize": 16})
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)
    assert OP_NAME not in code
    (layer,) = sparse_compile.report(compiled).layers
    assert (layer.format, layer.out_features, layer.in_features) == ("dense", 32, 64)
    assert "not a constant" in layer.reason
    assert counters["sparse_compile"]["dense_runtime_weight"] == 1


def test_mutated_buffers_still_update_the_model():
    # BatchNorm in train mode under no_grad updates its running statistics: those buffers must
    # stay real inputs that the compiled code writes to, not frozen copies.
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 64))
    prune_blocks_(model[3].weight.data, 0.9, 16)
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8)
    compiled = torch.compile(model, backend="sparse", options={"blocksize": 16})
    with torch.no_grad():
        for _ in range(2):
            out, expected = compiled(x), reference(x)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    assert int(model[1].num_batches_tracked) == 2
    assert [(layer.kind, layer.format) for layer in sparse_compile.report(compiled).layers] == [
        ("conv kxk", "dense"), ("linear", "bsr")
    ]


# --- Issue 21, item 5: a freezing compile with backend="inductor" must not hide the linears from
# the pass (Inductor registers its freezing patterns, weight packing included, once per process).

PACKS_LINEARS = torch._C._has_mkldnn and torch.backends.mkldnn.is_available() and torch._C.has_mkl
needs_packing = pytest.mark.skipif(not PACKS_LINEARS, reason="Inductor packs CPU linears only with oneDNN and MKL")


def two_sparse_linears():
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    for layer in (model[0], model[2]):
        prune_blocks_(layer.weight.data, 0.9, 32)
    return model


def inductor_with_freezing(model, x):
    """The fair dense baseline: freezing on while Dynamo traces (``options={"freezing": True}``
    would freeze nothing: Dynamo passes the parameters as inputs then)."""
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        return torch.compile(model, backend="inductor")(x)


@needs_packing
def test_freezing_compile_before_does_not_hide_the_linears():
    model, x = two_sparse_linears(), torch.randn(4, 256)
    counters["inductor"].clear()
    inductor_with_freezing(copy.deepcopy(model), x)
    assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] == 2  # Inductor packed its linears

    compiled, out, code = compile_and_run(model, x, options={"density_threshold": 1.0})
    assert "2 of 2 linear layers run as BSR" in str(sparse_compile.report(compiled))
    assert counters["sparse_compile"]["bsr_layers"] == 2 and code.count(OP_NAME) >= 2
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)

    # ... and the patterns are back for Inductor's own compiles.
    torch._dynamo.reset()
    counters["inductor"].clear()
    inductor_with_freezing(copy.deepcopy(model), x)
    assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] == 2


ORDER_SCRIPT = """
import sys, torch
from torch import nn
from torch._dynamo.utils import counters
import sparse_compile
from sparse_compile.pruning import prune_blocks_
model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
for layer in (model[0], model[2]):
    prune_blocks_(layer.weight.data, 0.9, 32)
x = torch.randn(4, 256)
sparse = torch.compile(model, backend="sparse", options={"density_threshold": 1.0})
with torch.no_grad():
    if sys.argv[1] == "sparse_first":
        sparse(x)
    with torch._inductor.config.patch(freezing=True):
        torch.compile(nn.Sequential(*model), backend="inductor")(x)
    packed = counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"]
    if sys.argv[1] == "inductor_first":
        sparse(x)
print("packed", packed, "bsr", counters["sparse_compile"]["bsr_layers"])
print(sparse_compile.report(sparse).graphs[0].summary())
"""


@needs_packing
@pytest.mark.parametrize("order", ["inductor_first", "sparse_first"])
def test_either_order_in_a_new_process(order):
    # Which compile registers Inductor's freezing patterns decides for the whole process: only a
    # fresh process tests both orders.
    result = subprocess.run(
        [sys.executable, "-c", ORDER_SCRIPT, order], capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "packed 2 bsr 2" in result.stdout, result.stdout + result.stderr
    assert "2 of 2 linear layers run as BSR" in result.stdout


def test_graph_without_linear_says_why(caplog):
    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.randn(16))

        def forward(self, x):
            return torch.tanh(x * self.scale)

    x = torch.randn(3, 16)
    with caplog.at_level("INFO", logger="sparse_compile"):
        compiled, out, _ = compile_and_run(NoLinear().eval(), x)
    summary = "no linear layer found: the graph has no matmul"
    assert summary in str(sparse_compile.report(compiled))
    assert any(summary in record.getMessage() and record.levelname == "INFO" for record in caplog.records)
    assert counters["sparse_compile"]["graphs_without_linear"] == 1


@needs_packing
def test_packed_linears_are_named_as_a_bug(monkeypatch, caplog):
    # Were Inductor's packing to reach the pass again, the report and the log must say so.
    import contextlib

    from sparse_compile import backend

    monkeypatch.setattr(backend, "_freezing_patterns_without_packing", contextlib.nullcontext)
    model, x = two_sparse_linears(), torch.randn(4, 256)
    with caplog.at_level("INFO", logger="sparse_compile"):
        compiled, out, _ = compile_and_run(model, x, options={"density_threshold": 1.0})
    text = str(sparse_compile.report(compiled))
    assert "no linear layer found: 2 linear layer(s) reached the pass already packed" in text
    assert any("already packed" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    torch.testing.assert_close(out.double(), float64_reference(model, x), atol=1e-4, rtol=1e-4)


def test_the_converted_weights_index_arrays_stay_constants_not_code(monkeypatch):
    # Inductor inlines a 1-D constant of up to 8 elements as code rebuilt on every call. A
    # converted weight's index arrays are often that small, and each layer's became a C++ kernel
    # of its own (timm DeiT-tiny: 32 kernels to compile instead of 9). The pass keeps its own
    # constants as buffers.
    from torch._inductor.graph import GraphLowering

    kept_as_buffers = []
    add_tensor_constant = GraphLowering.add_tensor_constant

    def spy(self, data, name=None):
        kept_as_buffers.append(name)
        return add_tensor_constant(self, data, name)

    monkeypatch.setattr(GraphLowering, "add_tensor_constant", spy)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    for layer in (model[0], model[2]):
        prune_blocks_(layer.weight.data, 0.75, 32)  # 1 of 2 x 2 blocks: index arrays of 3 and 1 entries
    x = torch.randn(5, 64)
    compiled = torch.compile(model, backend="sparse", options={"density_threshold": 0.5, "blocksize": 32})
    with torch.no_grad():
        out = compiled(x)
    report = sparse_compile.report(compiled)
    assert [layer.format for layer in report.layers] == ["bsr", "bsr"], str(report)
    ours = [name for name in kept_as_buffers if name and name.startswith("_sparse_")]
    # Per layer: the values, the block-row pointers and the column indices.
    assert len(ours) == 6 and sum("col" in name for name in ours) == 2, ours
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())
    torch.testing.assert_close(out.double(), reference, atol=1e-4, rtol=1e-4)
