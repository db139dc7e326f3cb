"""Compiled Supermask training with backend="sparse": masked linears, and the same training as eager.

Every test checks that the masked path ran (report + the op's counters), not only that numbers agree.
The reference is eager training of an identical copy (same initial weights, scores, batches).
"""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch._dynamo.utils import counters
from torch.nn.utils import parametrize

import sparse_compile
from sparse_compile.training import Supermask, apply_supermask

pytestmark = pytest.mark.usefixtures("fresh_compiler")

# (atol, rtol) for weights, scores and losses after a few steps, compiled vs eager in one dtype.
TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2)}


def mlp(dtype=torch.float32):
    # 72 and 100 are not multiples of the tiles: ragged edge tiles on both dims.
    return nn.Sequential(
        nn.Linear(100, 72), nn.GELU(), nn.Linear(72, 64, bias=False), nn.GELU(), nn.Linear(64, 10)
    ).to(dtype)


def supermask(model, sparsity, tile, layers=(0, 2), **kwargs):
    for i in layers:
        weight = model[i].weight
        parametrize.register_parametrization(
            model[i], "weight", Supermask(weight.shape, sparsity, tile, **kwargs).to(weight.dtype)
        )
    return model


def train(model, batches, step_fn=None, lr=0.05):
    """SGD with momentum over ``batches``; returns the losses. ``step_fn`` runs the model (compiled or not)."""
    step_fn = model if step_fn is None else step_fn
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    losses = []
    for x, y in batches:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(step_fn(x).float().flatten(0, -2), y.flatten())
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def make_batches(steps, dtype, shape=(2, 6, 100)):
    return [(torch.randn(shape, dtype=dtype), torch.randint(0, 10, shape[:-1])) for _ in range(steps)]


def assert_same_training(model, reference, losses, ref_losses, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(losses, ref_losses, atol=atol, rtol=rtol)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    "sparsity,tile,dtype",
    [(0.8, 16, torch.float32), (0.9, 32, torch.float32), (0.5, 16, torch.float32), (0.8, 16, torch.bfloat16)],
)
def test_compiled_training_equals_eager(sparsity, tile, dtype):
    model = supermask(mlp(dtype), sparsity, tile)
    reference = copy.deepcopy(model)
    initial = copy.deepcopy(model)
    batches = make_batches(4, dtype)
    counters.clear()
    compiled = torch.compile(model, backend="sparse", fullgraph=True)
    losses = train(model, batches, compiled)
    ref_losses = train(reference, batches)

    assert_same_training(model, reference, losses, ref_losses, dtype)
    # Training did move weights and scores (so equal means equal training, not two no-ops).
    for name in ("0.parametrizations.weight.original", "0.parametrizations.weight.0.scores"):
        moved = dict(model.named_parameters())[name] - dict(initial.named_parameters())[name]
        assert moved.abs().max() > 0, name
    report = sparse_compile.report(compiled)
    assert [(r.name, r.format, r.blocksize) for r in report.layers] == [
        ("0", "masked", tile), ("2", "masked", tile), ("4", "dense", None)
    ], str(report)
    assert "not a Supermask" in report.layers[2].reason
    assert [r.kernel for r in report.layers[:2]] == ["tile kernel (cpu)"] * 2
    assert counters["sparse_compile"]["masked_linear_rewrites"] == 2
    # The forward of both layers and the input gradient of the second ran through the op (the
    # input of the first needs no gradient); at 80-90% the CPU path skipped tiles (the tile
    # kernel runs up to 75% kept tiles; the op counts which path each call took).
    calls = counters["sparse_compile"]["masked_mm_cpu_tiles"] + counters["sparse_compile"]["masked_mm_cpu_dense"]
    assert calls == 3 * len(batches)
    if sparsity >= 0.8:
        assert counters["sparse_compile"]["masked_mm_cpu_tiles"] >= len(batches)


@pytest.mark.parametrize("fixed", ["fixed_mask", "fixed_weight"])
def test_fixed_mask_and_fixed_weight(fixed):
    model = supermask(mlp(), 0.8, 16, **{fixed: True})
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    batches = make_batches(3, torch.float32)
    counters.clear()
    compiled = torch.compile(model, backend="sparse")
    losses = train(model, batches, compiled)
    ref_losses = train(reference, batches)

    assert_same_training(model, reference, losses, ref_losses, torch.float32)
    frozen = "parametrizations.weight.0.scores" if fixed == "fixed_mask" else "parametrizations.weight.original"
    params, before = dict(model.named_parameters()), dict(initial.named_parameters())
    for i in (0, 2):
        assert torch.equal(params[f"{i}.{frozen}"], before[f"{i}.{frozen}"])
    assert len(sparse_compile.report(compiled).sparse_layers) == 2
    assert counters["sparse_compile"]["masked_mm_cpu_tiles"] == 3 * len(batches)


def test_input_gradient_goes_through_the_masked_op():
    model = supermask(mlp(), 0.9, 16, layers=(0,))
    x = torch.randn(5, 100, dtype=torch.float64).float().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    counters.clear()
    torch.compile(model, backend="sparse")(x).square().sum().backward()
    reference = copy.deepcopy(model).double()
    reference(x_ref.double()).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad.double(), atol=1e-4, rtol=1e-4)
    assert counters["sparse_compile"]["masked_mm_cpu_tiles"] == 2  # forward and dx


def test_layers_it_cannot_take_stay_dense_with_the_reason():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.small_tile = nn.Linear(48, 48)
            self.attention = nn.MultiheadAttention(48, 4, batch_first=True)
            self.conv = nn.Conv2d(3, 48, 1)

        def forward(self, image):
            x = self.conv(image).flatten(2).transpose(1, 2)
            x = self.small_tile(x)
            return self.attention(x, x, x, need_weights=False)[0]

    model = Net()
    apply_supermask(model, linear_sparsity=0.5, linear_tile_size=8, conv1x1_sparsity=0.5, conv1x1_tile_size=16)
    reference = copy.deepcopy(model)
    image = torch.randn(2, 3, 4, 4)
    compiled = torch.compile(model, backend="sparse")
    out = compiled(image)
    out.sum().backward()
    reference(image).sum().backward()
    torch.testing.assert_close(out, reference(image))
    reasons = {r.name: (r.format, r.reason) for r in sparse_compile.report(compiled).layers}
    assert reasons["small_tile"][0] == "dense" and "tile 8 < 16" in reasons["small_tile"][1]
    # The attention call is rewritten only for a projection the masked op takes: tile 8 is not.
    assert reasons["attention.out_proj"][0] == "dense" and "tile 8 < 16" in reasons["attention.out_proj"][1]
    assert "attention.in_proj" in reasons  # not masked, recorded too
    assert reasons["conv"] == ("masked", "")  # a Supermask 1x1 convolution runs masked (tests/test_conv_training.py)


class SelfAttentionNet(nn.Module):
    """A linear, then nn.MultiheadAttention as torchvision's ViT calls it (self-attention, batch_first)."""

    def __init__(self, embed=64, heads=4, **attention_kwargs):
        super().__init__()
        self.fc = nn.Linear(embed, embed)
        self.attention = nn.MultiheadAttention(embed, heads, batch_first=True, **attention_kwargs)
        self.head = nn.Linear(embed, 10)

    def forward(self, x, attn_mask=None, need_weights=False):
        x = torch.nn.functional.gelu(self.fc(x))
        return self.head(self.attention(x, x, x, attn_mask=attn_mask, need_weights=need_weights)[0])


@pytest.mark.parametrize("in_proj", [False, True])
def test_attention_projections_run_masked_and_train_like_eager(in_proj):
    # nn.MultiheadAttention is one F.multi_head_attention_forward call for Dynamo: the pass
    # rewrites it so that its masked projections (out_proj; in_proj with attention_in_proj=True)
    # run through the op, and training still equals eager.
    model = SelfAttentionNet()
    apply_supermask(model, linear_sparsity=0.9, linear_tile_size=16, attention_in_proj=in_proj, skip_last_layer=True)
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    batches = make_batches(3, torch.float32, shape=(2, 12, 64))
    counters.clear()
    compiled = torch.compile(model, backend="sparse", fullgraph=True)
    losses = train(model, batches, compiled)
    ref_losses = train(reference, batches)

    assert_same_training(model, reference, losses, ref_losses, torch.float32)
    moved = model.attention.out_proj.parametrizations.weight.original - initial.attention.out_proj.parametrizations.weight.original
    assert moved.abs().max() > 0
    formats = {r.name: r.format for r in sparse_compile.report(compiled).layers}
    assert formats == {
        "fc": "masked", "attention.in_proj": "masked" if in_proj else "dense", "attention.out_proj": "masked",
        "head": "dense",
    }
    masked = 3 if in_proj else 2
    assert counters["sparse_compile"]["masked_linear_rewrites"] == masked
    # Per step: every masked layer's forward and input gradient (fc's input needs none) skip tiles.
    assert counters["sparse_compile"]["masked_mm_cpu_tiles"] == (2 * masked - 1) * len(batches)


def test_attention_against_a_float64_reference_with_dropout_off_in_eval():
    # masked_self_attention reproduces F.multi_head_attention_forward: outputs and every gradient
    # against the float64 eager model (module in eval mode: dropout 0.5 must then be off).
    model = SelfAttentionNet(dropout=0.5).eval()
    apply_supermask(model, linear_sparsity=0.8, linear_tile_size=16, attention_in_proj=True)
    reference = copy.deepcopy(model).double()
    x = torch.randn(3, 7, 64)
    counters.clear()
    out = torch.compile(model, backend="sparse")(x)
    out.square().sum().backward()
    expected = reference(x.double())
    expected.square().sum().backward()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-4)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    assert counters["sparse_compile"]["masked_linear_rewrites"] == 4  # fc, in_proj, out_proj, head


@pytest.mark.parametrize(
    "call,why",
    [
        (dict(attn_mask=True), "attn_mask is given"),
        (dict(need_weights=True), "need_weights=True"),
    ],
)
def test_attention_calls_it_cannot_reproduce_stay_whole_with_the_reason(call, why):
    model = SelfAttentionNet()
    apply_supermask(model, linear_sparsity=0.9, linear_tile_size=16)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 12, 64)
    if call.get("attn_mask"):
        call = dict(attn_mask=torch.rand(12, 12) > 0.5)
        call["attn_mask"].fill_diagonal_(False)  # every row attends somewhere
    compiled = torch.compile(model, backend="sparse")
    out = compiled(x, **call)
    torch.testing.assert_close(out, reference(x, **call), atol=1e-5, rtol=1e-4)
    records = {r.name: r for r in sparse_compile.report(compiled).layers}
    out_proj = records["attention.out_proj"]
    assert out_proj.format == "dense" and why in out_proj.reason, out_proj.reason
    assert records["fc"].format == "masked"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_and_mlp_train_masked_on_cuda_like_eager(dtype):
    # The Triton kernel under the attention rewrite: 3 steps compiled == eager, on the GPU.
    torch.backends.cuda.matmul.allow_tf32 = False
    model = SelfAttentionNet(embed=128, heads=4).to("cuda", dtype)
    apply_supermask(model, linear_sparsity=0.8, linear_tile_size=32, attention_in_proj=True, skip_last_layer=True)
    reference = copy.deepcopy(model)
    batches = [(x.cuda(), y.cuda()) for x, y in make_batches(3, dtype, shape=(4, 24, 128))]
    counters.clear()
    compiled = torch.compile(model, backend="sparse")
    losses = train(model, batches, compiled)
    ref_losses = train(reference, batches)
    assert_same_training(model, reference, losses, ref_losses, dtype)
    assert counters["sparse_compile"]["masked_linear_rewrites"] == 3
    # Forward and input gradient of in_proj and out_proj, forward of fc (its input needs none), per step.
    assert counters["sparse_compile"]["masked_mm_triton"] == 5 * len(batches)


def test_inference_path_is_unchanged_by_the_op():
    # no_grad: Supermask's weight (built with tile_masked_weight) still folds into a BSR constant.
    model = supermask(mlp(), 0.9, 16).eval()
    x = torch.randn(3, 100)
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double())
        compiled = torch.compile(model, backend="sparse", options={"blocksize": 16})
        out = compiled(x)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    assert [r.format for r in sparse_compile.report(compiled).layers] == ["bsr", "bsr", "dense"]


# --------------------------------------------------------------------------------------------
# DDP (gloo, 2 processes) equals one process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_model_and_batches():
    torch.manual_seed(0)
    model = supermask(mlp(), 0.8, 16)
    torch.manual_seed(1)
    return model, make_batches(3, torch.float32, shape=(8, 100))


def _ddp_worker(rank, world_size, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model, batches = _ddp_model_and_batches()
        # Compile, then wrap: torch.compile(DDP(model)) graph-breaks in DDP's forward and only the
        # parametrizations get compiled (seen: no linear reached the backend), so nothing runs masked.
        compiled = nn.parallel.DistributedDataParallel(torch.compile(model, backend="sparse"))
        shard = [(x.chunk(world_size)[rank], y.chunk(world_size)[rank]) for x, y in batches]
        train(model, shard, compiled)
        if rank == 0:
            masked = [r.name for r in sparse_compile.report().layers if r.format == "masked"]
            tiles = counters["sparse_compile"]["masked_mm_cpu_tiles"]
            torch.save({"state": model.state_dict(), "masked": masked, "tiles": tiles}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_ddp_two_processes_equal_one_process(tmp_path):
    model, batches = _ddp_model_and_batches()
    train(model, batches, torch.compile(model, backend="sparse"))
    out_path = str(tmp_path / "rank0.pt")
    mp.start_processes(_ddp_worker, args=(2, _free_port(), out_path), nprocs=2, join=True, start_method="spawn")
    result = torch.load(out_path)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(result["state"][name], value, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert len(result["masked"]) == 2 and result["tiles"] > 0


def test_masked_training_graphs_are_split_saving_what_the_backward_reads(monkeypatch):
    # A training graph with masked layers is partitioned by SavingPartitioner (the backward reads
    # the forward's values rather than recomputing them, sparse_compile/backend.py); one without
    # keeps Inductor's min-cut split. Both still train as eager does.
    from sparse_compile import backend

    split = []
    original = backend.SavingPartitioner.__call__
    monkeypatch.setattr(
        backend.SavingPartitioner, "__call__", lambda self, gm, inputs, **kw: split.append(gm) or original(self, gm, inputs, **kw)
    )
    for masked in (True, False):
        torch._dynamo.reset()
        split.clear()
        torch.manual_seed(0)
        model = supermask(mlp(), 0.8, 16) if masked else mlp()
        reference = copy.deepcopy(model)
        batches = make_batches(3, torch.float32)
        counters.clear()
        losses = train(model, batches, torch.compile(model, backend="sparse", fullgraph=True))
        assert_same_training(model, reference, losses, train(reference, batches), torch.float32)
        assert len(split) == int(masked)
        assert counters["sparse_compile"]["training_graphs_saving_partition"] == int(masked)
        assert counters["sparse_compile"]["masked_linear_rewrites"] == (2 if masked else 0)
