"""Supermask training under autocast with backend="sparse": the masked op takes half activations
and fp32 master weights, rounds only the kept tiles, and trains as eager autocast does.

References: float64 computations of what autocast rounds (``(W ⊙ M)`` and the bias rounded to
the half dtype), and eager autocast training of an identical copy. Every compiled test asserts
that the masked path ran (report and the op's counters).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import sparse_compile
from sparse_compile.kernels import cpu_tile_mm
from sparse_compile.kernels.masked_linear import masked_linear, masked_mm_triton, tile_masked_weight
from sparse_compile.training import apply_supermask

HALF = [torch.bfloat16, torch.float16]
# Output rounding of one half matmul (half an ulp, relative) and a little fp32 accumulation slack.
ROUNDING = {torch.bfloat16: 2**-8, torch.float16: 2**-11}

needs_tile_kernel = pytest.mark.skipif(
    cpu_tile_mm.unavailable_reason() is not None, reason="no C++ compiler for the CPU tile kernel"
)


def expand(tile_mask, shape, t):
    return tile_mask.repeat_interleave(t, 0).repeat_interleave(t, 1)[: shape[0], : shape[1]]


def random_tile_mask(n, k, t, density):
    shape = (-(-n // t), -(-k // t))
    mask = (torch.rand(shape) < density).float()
    mask.view(-1)[0], mask.view(-1)[-1] = 1.0, 0.0  # at least one kept, one dropped
    return mask


def autocast_reference(x, w, mask, bias, t, dtype):
    """float64 of what autocast computes: ``W ⊙ M`` and the bias rounded to ``dtype``, exact products."""
    w_eff = (w.double() * expand(mask.double(), w.shape, t)).to(dtype).double()
    out = x.to(dtype).double() @ w_eff.t()
    return out if bias is None else out + bias.to(dtype).double()


def with_ties(w):
    """Weights with exact bfloat16 ties (1 + 2^-8 rounds to 1, 1 + 3 * 2^-8 up to 1 + 2^-6): round
    half to even, as ``tensor.to(torch.bfloat16)``."""
    w = w.clone()
    w.view(-1)[:4] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2 + 2**-7])
    return w


# --------------------------------------------------------------------------------------------
# The op and its kernels


@needs_tile_kernel
def test_tile_kernel_rounds_kept_tiles_to_bfloat16_like_torch():
    # fp32 in and out, so nothing but the packing rounds: the result must follow the rounded
    # weights to fp32 accuracy, and differ from the unrounded ones by far more than that.
    t, n, k = 16, 40, 56
    w = with_ties(torch.randn(n, k))
    mask = random_tile_mask(n, k, t, 0.5)
    x = torch.randn(7, k)
    kept = int(mask.count_nonzero())
    out = cpu_tile_mm.tile_mm(x, w, mask, None, t, kept, round_weight_to_bfloat16=True).double()
    rounded = x.double() @ (w * expand(mask, w.shape, t)).to(torch.bfloat16).double().t()
    unrounded = x.double() @ (w.double() * expand(mask.double(), w.shape, t)).t()
    torch.testing.assert_close(out, rounded, atol=1e-5, rtol=1e-5)
    assert (out - unrounded).abs().max() > 1e-3
    # Without the flag, the weights are used as they are.
    plain = cpu_tile_mm.tile_mm(x, w, mask, None, t, kept).double()
    torch.testing.assert_close(plain, unrounded, atol=1e-5, rtol=1e-5)


@needs_tile_kernel
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("density", [0.3, 0.95])  # the tile kernel; dense above 75% kept tiles
def test_cpu_op_takes_fp32_master_weights(dtype, density):
    t, n, k = 16, 72, 100  # ragged edge tiles on both dims
    w, bias = with_ties(torch.randn(n, k)), torch.randn(n)
    mask = random_tile_mask(n, k, t, density)
    x = torch.randn(2, 9, k).to(dtype)
    counters.clear()
    out = masked_linear(x, w, mask, bias, t)
    assert out.dtype == dtype and out.shape == (2, 9, n)
    expected = autocast_reference(x, w, mask, bias, t, dtype)
    torch.testing.assert_close(out.double(), expected, atol=1e-3, rtol=ROUNDING[dtype])
    path = "masked_mm_cpu_tiles" if density < 0.75 else "masked_mm_cpu_dense"
    assert counters["sparse_compile"][path] == 1
    # And what eager autocast's linear returns, within the dtype's rounding.
    with torch.autocast("cpu", dtype=dtype):
        eager = F.linear(x, tile_masked_weight(w, mask, t), bias)
    torch.testing.assert_close(out.float(), eager.float(), atol=2e-2, rtol=2 * ROUNDING[dtype] * 8)


@needs_tile_kernel
@pytest.mark.parametrize("dtype", HALF)
def test_op_gradients_equal_eager_autocast(dtype):
    # x in the half dtype, fp32 weight, mask and bias: the gradients of each, in each one's own
    # dtype, as eager autocast's linear gives them through its casts.
    t, n, k = 16, 48, 80
    w, bias = torch.randn(n, k, requires_grad=True), torch.randn(n, requires_grad=True)
    mask = random_tile_mask(n, k, t, 0.4).requires_grad_()
    x = torch.randn(3, 5, k).to(dtype).requires_grad_()
    dy = torch.randn(3, 5, n).to(dtype)
    out = masked_linear(x, w, mask, bias, t)
    grads = torch.autograd.grad(out, (x, w, mask, bias), dy)
    refs = [v.detach().clone().requires_grad_() for v in (x, w, mask, bias)]
    with torch.autocast("cpu", dtype=dtype):
        ref_out = F.linear(refs[0], tile_masked_weight(refs[1], refs[2], t), refs[3])
    ref_grads = torch.autograd.grad(ref_out, refs, dy)
    for name, g, r in zip(("x", "weight", "tile_mask", "bias"), grads, ref_grads):
        assert g.dtype == r.dtype, name
        scale = r.abs().max().item()
        torch.testing.assert_close(g.float(), r.float(), atol=0.02 * scale, rtol=0.02, msg=lambda m, n=name: f"{n}: {m}")
    # float64 check of the weight gradient: G = dy^T x (x, dy exact in the half dtype), masked.
    g64 = dy.double().flatten(0, 1).t() @ x.double().flatten(0, 1)
    torch.testing.assert_close(grads[1].double(), g64 * expand(mask.detach().double(), w.shape, t), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("dtype", HALF)
def test_triton_kernel_takes_fp32_master_weights(dtype):
    # Through the interpreter (CPU): the kernel rounds the kept tiles, the bias and the output as
    # autocast does (its bf16 rounding done on the bits there, see _rounded).
    t, n, k = 16, 40, 64
    w, bias = torch.randn(n, k), torch.randn(n)
    mask = random_tile_mask(n, k, t, 0.5)
    x = torch.randn(11, k).to(dtype)
    out = masked_mm_triton(x, w, mask, bias, t)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), autocast_reference(x, w, mask, bias, t, dtype), atol=2e-3, rtol=ROUNDING[dtype])
    dy = torch.randn(11, n).to(dtype)
    dx = masked_mm_triton(dy, w.t(), mask.t(), None, t)
    ref_dx = autocast_reference(dy, w.t(), mask.t(), None, t, dtype)
    torch.testing.assert_close(dx.double(), ref_dx, atol=2e-3, rtol=ROUNDING[dtype])


# --------------------------------------------------------------------------------------------
# Compiled training under autocast == eager autocast training

pytest_compiled = pytest.mark.usefixtures("fresh_compiler")


class Block(nn.Module):
    """Linears with ragged tiles, a GELU, self-attention as torchvision's ViT calls it, a head."""

    def __init__(self, embed=64, heads=4):
        super().__init__()
        self.fc1 = nn.Linear(100, 72)
        self.fc2 = nn.Linear(72, embed, bias=False)
        self.attention = nn.MultiheadAttention(embed, heads, batch_first=True)
        self.head = nn.Linear(embed, 10)

    def forward(self, x):
        x = F.gelu(self.fc2(F.gelu(self.fc1(x))))
        x = x + self.attention(x, x, x, need_weights=False)[0]
        return self.head(F.layer_norm(x, x.shape[-1:]))


def train(model, batches, step_fn, dtype, lr=0.05):
    """SGD with momentum, the forward under autocast on the batches' device (the seed recipe's
    --amp); returns the losses."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    losses = []
    for x, y in batches:
        optimizer.zero_grad()
        with torch.autocast(x.device.type, dtype=dtype):
            loss = F.cross_entropy(step_fn(x).flatten(0, -2), y.flatten())
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().float())
    return torch.stack(losses)


@needs_tile_kernel
@pytest_compiled
@pytest.mark.parametrize("dtype", HALF)
def test_compiled_autocast_training_equals_eager(dtype):
    torch.manual_seed(0)
    model = Block()
    apply_supermask(model, linear_sparsity=0.8, linear_tile_size=16, attention_in_proj=True)
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    batches = [(torch.randn(2, 12, 100), torch.randint(0, 10, (2, 12))) for _ in range(4)]
    counters.clear()
    compiled = torch.compile(model, backend="sparse", fullgraph=True)
    losses = train(model, batches, compiled, dtype)
    ref_losses = train(reference, batches, reference, dtype)

    torch.testing.assert_close(losses, ref_losses, atol=2e-2, rtol=2e-2)
    params, ref_params, before = (dict(m.named_parameters()) for m in (model, reference, initial))
    for name, p in params.items():
        assert p.dtype == torch.float32, name  # the master weights stay fp32
        torch.testing.assert_close(p, ref_params[name], atol=2e-2, rtol=2e-2, msg=lambda m, n=name: f"{n}: {m}")
    for name in ("fc1.parametrizations.weight.original", "fc1.parametrizations.weight.0.scores"):
        assert (params[name] - before[name]).abs().max() > 0, name  # training moved them
    report = sparse_compile.report(compiled)
    formats = {r.name: r.format for r in report.layers}
    assert formats == dict.fromkeys(["fc1", "fc2", "attention.in_proj", "attention.out_proj", "head"], "masked"), str(report)
    assert {r.dtype for r in report.layers} == {f"{str(dtype)[6:]} (autocast, float32 weights)"}
    assert counters["sparse_compile"]["masked_linear_rewrites"] == 5
    # Per step, forward and input gradient of every layer but fc1's input gradient; at 80% sparse
    # most calls skip tiles on the tile kernel (above 75% kept tiles a call computes densely).
    calls = counters["sparse_compile"]["masked_mm_cpu_tiles"] + counters["sparse_compile"]["masked_mm_cpu_dense"]
    assert calls == 9 * len(batches)
    assert counters["sparse_compile"]["masked_mm_cpu_tiles"] >= 5 * len(batches)


@needs_tile_kernel
@pytest_compiled
def test_torchvision_vit_under_autocast_runs_masked():
    # The reproduction: apply_supermask on a torchvision ViT, backend="sparse", forward under
    # bf16 autocast crashed the compile (the op's fake implementation refused bf16 x with fp32 W).
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10
    )
    apply_supermask(model, linear_sparsity=0.9, linear_tile_size=16, skip_last_layer=True)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    counters.clear()
    compiled = torch.compile(model, backend="sparse")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x)
        expected = reference(x)
    out.float().square().sum().backward()
    expected.float().square().sum().backward()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), atol=3e-2, rtol=3e-2)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        scale = q.grad.abs().max().item() + 1e-6
        torch.testing.assert_close(p.grad, q.grad, atol=0.03 * scale, rtol=0.05, msg=lambda m, n=name: f"{n}: {m}")
    masked = [r.name for r in sparse_compile.report(compiled).layers if r.format == "masked"]
    assert len(masked) == 6  # per encoder layer: out_proj, mlp.0, mlp.3 (in_proj stays dense by default)
    assert counters["sparse_compile"]["masked_mm_cpu_tiles"] > 0


class Declined(nn.Module):
    """One layer per reason the masked pass leaves a Supermask linear to Inductor (attention calls
    that masked_self_attention does not reproduce, a tile below 16) and a plain dense layer."""

    def __init__(self, embed=32):
        super().__init__()
        self.small_tile = nn.Linear(embed, embed)
        self.dense = nn.Linear(embed, embed)
        mha = lambda **kw: nn.MultiheadAttention(embed, 2, batch_first=True, **kw)  # noqa: E731
        self.cross = mha()
        self.weights = mha()
        self.bias_kv = mha(add_bias_kv=True)
        self.separate = mha(kdim=16, vdim=16)
        self.padding = mha()
        self.zero_attn = mha(add_zero_attn=True)
        self.masked_attn = mha()

    def forward(self, x, memory, memory16, padding, attn_mask):
        x = self.dense(self.small_tile(x))
        x = x + self.cross(x, memory, memory, need_weights=False)[0]
        x = x + self.weights(x, x, x, need_weights=True)[0]
        x = x + self.bias_kv(x, x, x, need_weights=False)[0]
        x = x + self.separate(x, memory16, memory16, need_weights=False)[0]
        x = x + self.padding(x, x, x, key_padding_mask=padding, need_weights=False)[0]
        x = x + self.zero_attn(x, x, x, need_weights=False)[0]
        return x + self.masked_attn(x, x, x, attn_mask=attn_mask, need_weights=False)[0]


DECLINED_REASONS = {
    "small_tile": "tile 8 < 16",
    "dense": "not a Supermask tile mask",
    "cross.out_proj": "not self-attention",
    "weights.out_proj": "need_weights=True",
    "bias_kv.out_proj": "bias_k is given",
    "separate.out_proj": "not self-attention",  # kdim/vdim: separate q, k, v weights
    "padding.out_proj": "key_padding_mask is given",
    "zero_attn.out_proj": "add_zero_attn=True",
    "masked_attn.out_proj": "attn_mask is given",
}


@pytest_compiled
def test_every_decline_path_compiles_and_trains_like_eager_under_autocast():
    torch.manual_seed(0)
    model = Declined()
    apply_supermask(model, linear_sparsity=0.5, linear_tile_size=16)
    # The small layer gets tile 8 (the pass takes >= 16); "dense" gets no mask at all.
    from torch.nn.utils import parametrize

    from sparse_compile.training import Supermask

    parametrize.remove_parametrizations(model.small_tile, "weight")
    parametrize.remove_parametrizations(model.dense, "weight")
    parametrize.register_parametrization(model.small_tile, "weight", Supermask((32, 32), 0.5, 8))
    reference = copy.deepcopy(model)
    inputs = (
        torch.randn(2, 6, 32), torch.randn(2, 5, 32), torch.randn(2, 5, 16),
        torch.tensor([[False] * 5 + [True], [False] * 6]), torch.rand(6, 6) > 0.7,
    )  # fmt: skip
    inputs[4].fill_diagonal_(False)  # every query attends somewhere
    counters.clear()
    compiled = torch.compile(model, backend="sparse")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = compiled(*inputs), reference(*inputs)
    out.float().sum().backward()
    expected.float().sum().backward()
    torch.testing.assert_close(out.float(), expected.float(), atol=3e-2, rtol=3e-2)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        scale = q.grad.abs().max().item() + 1e-6
        torch.testing.assert_close(p.grad, q.grad, atol=0.03 * scale, rtol=0.05, msg=lambda m, n=name: f"{n}: {m}")
    records = {r.name: r for r in sparse_compile.report(compiled).layers}
    for name, why in DECLINED_REASONS.items():
        assert records[name].format == "dense" and why in records[name].reason, (name, records[name].reason)
    assert counters["sparse_compile"]["masked_linear_rewrites"] == 0


@pytest_compiled
@pytest.mark.parametrize(
    "model_dtype,why",
    [(torch.float64, "dtype float64"), (torch.float16, "weight float16 in a bfloat16 matmul")],
)
def test_weights_autocast_does_not_use_as_master_weights_stay_dense(model_dtype, why):
    # float64 is not autocast's (its linears stay float64); fp16 weights under bf16 autocast are
    # cast whole by autocast, which the masked op does not take (only fp32 master weights).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 10))
    apply_supermask(model, linear_sparsity=0.5, linear_tile_size=16)
    model = model.to(model_dtype)
    reference = copy.deepcopy(model)
    x = torch.randn(3, 48, dtype=model_dtype)
    compiled = torch.compile(model, backend="sparse")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = compiled(x), reference(x)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(out, expected, atol=3e-2, rtol=3e-2)
    records = sparse_compile.report(compiled).layers
    assert [r.format for r in records] == ["dense", "dense"]
    assert all(why in r.reason for r in records), [r.reason for r in records]


# --------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
def test_cuda_autocast_training_equals_eager(dtype):
    torch.manual_seed(0)
    model = Block(embed=128).cuda()
    apply_supermask(model, linear_sparsity=0.8, linear_tile_size=32, attention_in_proj=True)
    reference = copy.deepcopy(model)
    batches = [(torch.randn(4, 24, 100, device="cuda"), torch.randint(0, 10, (4, 24), device="cuda")) for _ in range(3)]
    counters.clear()
    compiled = torch.compile(model, backend="sparse")
    losses = train(model, batches, compiled, dtype)
    ref_losses = train(reference, batches, reference, dtype)
    torch.testing.assert_close(losses, ref_losses, atol=2e-2, rtol=2e-2)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p, q, atol=2e-2, rtol=2e-2, msg=lambda m, n=name: f"{n}: {m}")
    assert counters["sparse_compile"]["masked_linear_rewrites"] == 5
    assert counters["sparse_compile"]["masked_mm_triton"] == 9 * len(batches)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
def test_cuda_op_takes_fp32_master_weights(dtype):
    t, n, k = 64, 3072, 768  # a ViT-B MLP layer, 90% of its tiles dropped
    w, bias = torch.randn(n, k, device="cuda"), torch.randn(n, device="cuda")
    mask = random_tile_mask(n, k, t, 0.1).cuda()
    x = torch.randn(197, k, device="cuda").to(dtype)
    out = masked_linear(x, w, mask, bias, t)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), autocast_reference(x, w, mask, bias, t, dtype), atol=1e-2, rtol=ROUNDING[dtype] * 2)
