"""Masks on nn.MultiheadAttention.in_proj_weight (``attention_in_proj=True``): issue 14.

Gradients are checked against a float64 reference written out by hand here: the attention is
spelled out with the projections as leaf tensors, so autograd gives the gradient ``dy`` that
reaches each projection's output, and the expected gradients follow from the formulas
(Bi-Mask: ``dx = dy (W*Mb)``, ``dW = dy^T x + λ (1-Mf) W``; Supermask: straight-through,
``dscores = tile-sum(dW_eff * W)``).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

import sparse_compile
from sparse_compile.training.supermask import StackedSupermask
from sparse_compile.training import (
    NMMask,
    Supermask,
    apply_nm,
    apply_supermask,
    finalize,
    load_superblock_checkpoint,
    sparsity_summary,
)

E, HEADS = 16, 2


def tiny_vit(hidden=32, layers=2):
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        image_size=32, patch_size=16, num_layers=layers, num_heads=2, hidden_dim=hidden, mlp_dim=2 * hidden,
        num_classes=10,
    )
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision's zero head would hide the encoder
    return model


# --------------------------------------------------------------------------------------------
# The float64 reference: attention with the projections as leaves


def reference_attention(pq, pk, pv, attn_mask=None, key_padding_mask=None):
    """Batch-first ``[N, L, E]`` projections -> (heads merged, before out_proj; per-head weights)."""
    n, tgt, e = pq.shape
    src = pk.shape[1]
    split = lambda t: t.reshape(n, -1, HEADS, e // HEADS).transpose(1, 2)  # noqa: E731
    q, k, v = split(pq), split(pk), split(pv)
    scores = q @ k.transpose(-1, -2) / math.sqrt(e // HEADS)
    if attn_mask is not None:
        scores = scores.masked_fill(attn_mask.view(1, 1, tgt, src), float("-inf"))
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask.view(n, 1, 1, src), float("-inf"))
    weights = scores.softmax(-1)
    return (weights @ v).transpose(1, 2).reshape(n, tgt, e), weights


def leaf(t):
    return t.detach().clone().requires_grad_(True)


CASES = {
    "self, batch_first": dict(batch_first=True, cross=False, masks=False, need_weights=False),
    "self, seq_first, masks": dict(batch_first=False, cross=False, masks=True, need_weights=False),
    "cross, batch_first, weights": dict(batch_first=True, cross=True, masks=True, need_weights=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("out_proj_bimask", [False, True])
def test_bimask_in_proj_gradients_match_float64_reference(case, out_proj_bimask):
    c = CASES[case]
    decay = 0.1  # large, so that a missing decay term shows
    mha = nn.MultiheadAttention(E, HEADS, batch_first=c["batch_first"]).double()
    nn.init.normal_(mha.in_proj_bias)
    nn.init.normal_(mha.out_proj.bias)
    nm = NMMask(2, 4, decay=decay, perm_candidates=2, seed=3)
    parametrize.register_parametrization(mha, "in_proj_weight", nm)
    if out_proj_bimask:
        parametrize.register_parametrization(mha.out_proj, "weight", NMMask(2, 4, decay=decay, seed=4))
    # A random permutation, so that Mb differs from Mf (the identity often gives Mb == Mf at 2:4).
    nm.perm.copy_(torch.randperm(3 * E))
    w = mha.parametrizations.in_proj_weight.original
    mf, mb = nm.masks(w)
    assert not torch.equal(mf, mb) and bool((mb <= mf).all())

    n, tgt, src = 3, 5, 7 if c["cross"] else 5
    query = torch.randn(n, tgt, E, dtype=torch.float64)
    key = torch.randn(n, src, E, dtype=torch.float64) if c["cross"] else query
    value = key
    attn_mask = kpm = None
    if c["masks"]:
        attn_mask = torch.rand(tgt, src) < 0.3
        attn_mask[:, 0] = False  # every query attends somewhere: no all -inf row
        kpm = torch.zeros(n, src, dtype=torch.bool)
        kpm[0, -2:] = True
    grad_out = torch.randn(n, tgt, E, dtype=torch.float64)
    grad_weights = torch.randn(n, tgt, src, dtype=torch.float64)

    # The module under test (inputs in its own layout).
    q_in, k_in = leaf(query), leaf(key)
    if c["cross"]:
        args = (q_in, k_in, k_in)
    else:
        args = (q_in, q_in, q_in)
    if not c["batch_first"]:
        args = tuple(a.transpose(0, 1) for a in args)
        if not c["cross"]:
            args = (args[0], args[0], args[0])  # keep the "is" identity: it selects the packed projection
    out, weights = mha(*args, attn_mask=attn_mask, key_padding_mask=kpm, need_weights=c["need_weights"])
    if not c["batch_first"]:
        out = out.transpose(0, 1)
    loss = (out * grad_out).sum() + ((weights * grad_weights).sum() if c["need_weights"] else 0.0)
    loss.backward()

    # The reference: projections with W * Mf as leaves, attention by hand.
    weff, b = w.detach() * mf, mha.in_proj_bias.detach()
    rows = [slice(0, E), slice(E, 2 * E), slice(2 * E, 3 * E)]
    inputs = [query, key, value]
    projs = [leaf(x @ weff[r].T + b[r]) for x, r in zip(inputs, rows)]
    if out_proj_bimask:
        ow = mha.out_proj.parametrizations.weight.original
        omf, omb = mha.out_proj.parametrizations.weight[0].masks(ow)
        o_fwd, o_bwd = ow.detach() * omf, ow.detach() * omb
    else:
        o_fwd = o_bwd = mha.out_proj.weight.detach()
    heads, ref_weights = reference_attention(*projs, attn_mask, kpm)
    ref_out = heads @ o_fwd.T + mha.out_proj.bias.detach()
    # out_proj by hand: its input gradient uses its backward weight (W * Mb when bidirectional).
    ref_loss = (heads * (grad_out @ o_bwd)).sum()
    if c["need_weights"]:
        ref_loss = ref_loss + (ref_weights.mean(1) * grad_weights).sum()
    ref_loss.backward()
    dys = [p.grad for p in projs]

    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    wmb = w.detach() * mb
    expected_dx = [dy @ wmb[r] for dy, r in zip(dys, rows)]
    if c["cross"]:
        torch.testing.assert_close(q_in.grad, expected_dx[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(k_in.grad, expected_dx[1] + expected_dx[2], rtol=1e-10, atol=1e-10)
    else:
        torch.testing.assert_close(q_in.grad, sum(expected_dx), rtol=1e-10, atol=1e-10)
    expected_dw = torch.cat([dy.reshape(-1, E).T @ x.reshape(-1, E) for dy, x in zip(dys, inputs)])
    expected_dw = expected_dw + decay * (1 - mf) * w.detach()
    torch.testing.assert_close(w.grad, expected_dw, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mha.in_proj_bias.grad, torch.cat([dy.sum((0, 1)) for dy in dys]))
    # The forward-mode answer (dx through Mf) is measurably different: the test can fail.
    wrong = [dy @ (w.detach() * mf)[r] for dy, r in zip(dys, rows)]
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(wrong, expected_dx))
    if out_proj_bimask:
        # out_proj's dW follows SR-STE too (its dx is covered by in_proj's dy above).
        ow_expected = grad_out.reshape(-1, E).T @ heads.detach().reshape(-1, E) + decay * (1 - omf) * ow.detach()
        torch.testing.assert_close(ow.grad, ow_expected, rtol=1e-10, atol=1e-10)


def test_bimask_attention_without_grad_is_torchs_forward():
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True)
    parametrize.register_parametrization(mha, "in_proj_weight", NMMask(2, 4, perm_candidates=2))
    plain = nn.MultiheadAttention(E, HEADS, batch_first=True)
    plain.load_state_dict(
        {k.replace("parametrizations.in_proj_weight.original", "in_proj_weight"): v for k, v in mha.state_dict().items()
         if "parametrizations.in_proj_weight.0" not in k}
    )
    with torch.no_grad():
        plain.in_proj_weight.copy_(mha.in_proj_weight)  # W * Mf
    x = torch.randn(2, 5, E)
    kpm = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with torch.no_grad():
        expected = plain(x, x, x, key_padding_mask=kpm)
        got_eval = mha(x, x, x, key_padding_mask=kpm)
    got_train = mha(x, x, x, key_padding_mask=kpm)  # grad enabled: our forward
    for got in (got_eval, got_train):
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)


def test_bimask_in_proj_permutation_search_counts_steps():
    mha = nn.MultiheadAttention(E, HEADS)
    nm = NMMask(2, 4, perm_every=2, perm_candidates=3)
    parametrize.register_parametrization(mha, "in_proj_weight", nm)
    assert nm._searches == 1  # at registration
    x = torch.randn(4, 2, E)
    for _ in range(4):
        mha(x, x, x)[0].sum().backward()
    # Searches run on the weights of the forward after every perm_every-th step (the reference
    # searches at forwards 0, I, 2I...): the one due after step 2 ran at forward 3, the one due
    # after step 4 waits for forward 5.
    assert nm._calls == 4 and nm._searches == 2
    mha(x, x, x)
    assert nm._searches == 3
    effective = mha.in_proj_weight.detach().clone()
    finalize(mha)
    assert type(mha) is nn.MultiheadAttention
    torch.testing.assert_close(mha.in_proj_weight.detach(), effective, rtol=0, atol=0)
    mha(x, x, x)[0].sum().backward()  # the hook left on the old tensor is inert
    assert nm._calls == 4


@pytest.mark.usefixtures("fresh_compiler")
def test_bimask_attention_compiles_in_one_graph_with_the_same_gradients():
    model = nn.Sequential(nn.Linear(E, E), nn.TransformerEncoderLayer(E, HEADS, 2 * E, dropout=0.0, batch_first=True))
    apply_nm(model, 2, 4, attention_in_proj=True, perm_candidates=2)
    attn = model[1].self_attn
    attn.parametrizations.in_proj_weight[0].perm.copy_(torch.randperm(3 * E))  # Mb != Mf
    twin = copy.deepcopy(model)
    x = torch.randn(2, 5, E)
    model(x).square().sum().backward()
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)  # fullgraph: no graph break
    compiled(x).square().sum().backward()
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("parts", [3, 1])
def test_supermask_in_proj_gradients_match_float64_reference(parts):
    """parts=3: StackedSupermask, what apply_supermask uses (one target per q/k/v); 1: one shared target."""
    tile = 4
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True).double()
    nn.init.normal_(mha.in_proj_bias)
    sm = (StackedSupermask((3 * E, E), 0.6, tile) if parts == 3 else Supermask((3 * E, E), 0.6, tile)).double()
    parametrize.register_parametrization(mha, "in_proj_weight", sm)
    w = mha.parametrizations.in_proj_weight.original
    x = torch.randn(3, 5, E, dtype=torch.float64)
    g = torch.randn(3, 5, E, dtype=torch.float64)
    (mha(x, x, x, need_weights=False)[0] * g).sum().backward()

    # Reference: the tile mask by hand (top-scoring tiles of each part), dense attention with W_eff as a leaf.
    tile_masks = []
    for scores in sm.scores.detach().chunk(parts):
        keep = scores.numel() - (1 + round(0.6 * (scores.numel() - 1))) + 1
        tile_mask = torch.zeros(scores.numel(), dtype=torch.float64)
        tile_mask[scores.reshape(-1).topk(keep).indices] = 1.0
        tile_masks.append(tile_mask.reshape(scores.shape))
    tile_mask = torch.cat(tile_masks)
    mask = tile_mask.repeat_interleave(tile, 0).repeat_interleave(tile, 1)
    weff = (w.detach() * mask).requires_grad_(True)
    b = mha.in_proj_bias.detach()
    projs = [x @ weff[i * E:(i + 1) * E].T + b[i * E:(i + 1) * E] for i in range(3)]
    heads, _ = reference_attention(*projs)
    out = heads @ mha.out_proj.weight.detach().T + mha.out_proj.bias.detach()
    (out * g).sum().backward()

    torch.testing.assert_close(w.grad, weff.grad * mask, rtol=1e-10, atol=1e-10)
    dscores = (weff.grad * w.detach()).reshape(3 * E // tile, tile, E // tile, tile).sum((1, 3))
    torch.testing.assert_close(sm.scores.grad, dscores, rtol=1e-10, atol=1e-10)
    # shared: 48 tiles, k = 1 + round(0.6 * 47) = 29, 28 dropped; per part: 16 tiles, k = 10, 9 dropped
    assert tile_mask.sum() == (3 * 7 if parts == 3 else 20) == sm.kept_tiles
    torch.testing.assert_close(mha.in_proj_weight.detach(), w.detach() * mask, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Model helpers


def test_apply_masks_in_proj_and_summary_finalize_show_it():
    model = tiny_vit(hidden=16, layers=3)
    names = apply_supermask(
        model, linear_sparsity=0.5, linear_tile_size=4, attention_in_proj=True, skip_first_transformer=True
    )
    in_projs = [n for n in names if n.endswith(".in_proj")]
    assert in_projs == [f"encoder.layers.encoder_layer_{i}.self_attention.in_proj" for i in (1, 2)]
    rows = {r["name"]: r for r in sparsity_summary(model, include_dense=True)}
    layer1 = "encoder.layers.encoder_layer_1.self_attention.in_proj"
    assert rows[layer1]["shape"] == (48, 16) and rows[layer1]["method"] == "supermask tile=4 per q/k/v"
    assert rows[layer1]["sparsity"] == pytest.approx(0.5)
    # one target each: q, k and v each keep half of their 16 tiles
    w1 = model.encoder.layers.encoder_layer_1.self_attention.in_proj_weight.detach()
    assert [(part != 0).float().mean().item() for part in w1.chunk(3)] == [0.5, 0.5, 0.5]
    assert rows["encoder.layers.encoder_layer_0.self_attention.in_proj"]["method"] == "dense"
    # default: in_proj stays dense (SuperBlock)
    assert not any(n.endswith("in_proj") for n in apply_supermask(tiny_vit(16, 3), linear_sparsity=0.5))
    # filter_fn sees the in_proj name
    only = apply_supermask(tiny_vit(16, 3), linear_sparsity=0.5, attention_in_proj=True,
                           filter_fn=lambda name, m: name.endswith("in_proj"))
    assert len(only) == 3 and all(n.endswith("in_proj") for n in only)

    attn = model.encoder.layers.encoder_layer_1.self_attention
    effective = attn.in_proj_weight.detach().clone()
    finalize(model)
    assert type(attn) is nn.MultiheadAttention and not parametrize.is_parametrized(attn)
    torch.testing.assert_close(attn.in_proj_weight.detach(), effective, rtol=0, atol=0)
    rows = {r["name"]: r for r in sparsity_summary(model, include_dense=True)}
    assert rows[layer1]["method"] == "dense" and rows[layer1]["sparsity"] == pytest.approx(0.5)


def test_apply_refuses_attention_it_cannot_mask():
    # a tile would straddle q/k/v (embed_dim 16, tile 32)
    model = tiny_vit(hidden=16, layers=1)
    with pytest.raises(ValueError, match="embed_dim 16, not a multiple of linear_tile_size 32.*filter_fn"):
        apply_supermask(model, linear_sparsity=0.5, linear_tile_size=32, attention_in_proj=True)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())

    class Cross(nn.Module):
        def __init__(self, **kw):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, **kw)
            self.fc = nn.Linear(8, 8)

    separate = Cross(kdim=4, vdim=4)
    with pytest.raises(ValueError, match="separate q/k/v weights.*filter_fn.*'attn.in_proj'"):
        apply_supermask(separate, linear_sparsity=0.5, attention_in_proj=True)
    assert not parametrize.is_parametrized(separate.fc)  # refused before the model changed
    bias_kv = Cross(add_bias_kv=True)
    with pytest.raises(ValueError, match="bidirectional N:M cannot run here.*'forward', 'post' or 'unstructured'"):
        apply_nm(bias_kv, 2, 4, attention_in_proj=True)
    assert not parametrize.is_parametrized(bias_kv.fc)
    assert apply_nm(bias_kv, 2, 4, mode="forward", attention_in_proj=True) == ["attn.out_proj", "fc", "attn.in_proj"]
    # N:M shape checks cover in_proj too (in features 6: not a multiple of 4)
    with pytest.raises(ValueError, match="layer 'in_proj'.*not divisible by M=4"):
        apply_nm(nn.MultiheadAttention(6, 2), 2, 4, mode="forward", attention_in_proj=True,
                 filter_fn=lambda name, m: name == "in_proj")
    # registering by hand on an unsupported attention warns (and names the reason)
    with pytest.warns(UserWarning, match="add_bias_kv.*forward-mode gradients"):
        parametrize.register_parametrization(nn.MultiheadAttention(8, 2, add_bias_kv=True), "in_proj_weight",
                                             NMMask(2, 4))


# --------------------------------------------------------------------------------------------
# Train, then compile: all four linears of every block are BSR


@pytest.mark.usefixtures("fresh_compiler")
# finalize_first=False: the mask is still a parametrization, and the in_proj matmul reaches the pass
# as bmm(x, expanded W^T) (MHA transposes its batch_first input); the pass takes that form too.
@pytest.mark.parametrize("finalize_first", [True, False])
def test_vit_trained_with_in_proj_compiles_to_bsr_everywhere(finalize_first):
    torch.manual_seed(0)
    model = tiny_vit(hidden=64, layers=2)
    apply_supermask(model, linear_sparsity=0.75, linear_tile_size=16, attention_in_proj=True, skip_last_layer=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):  # scores and weights move away from their initial values
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,))).backward()
        optimizer.step()
    model.eval()
    if finalize_first:
        finalize(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double())
        compiled = torch.compile(model, backend="sparse", options={"blocksize": 16})
        out = compiled(x)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    report = sparse_compile.report(compiled)
    formats = {layer.name: layer.format for layer in report.layers}
    for i in range(2):
        block = f"encoder.layers.encoder_layer_{i}"
        for linear in ("self_attention.in_proj", "self_attention.out_proj", "mlp.0", "mlp.3"):
            assert formats.get(f"{block}.{linear}") == "bsr", str(report)
    assert formats.get("heads.head") == "dense", str(report)


# --------------------------------------------------------------------------------------------
# Checkpoints and CLI


def test_superblock_checkpoint_without_in_proj_scores_loads_in_proj_dense():
    source = tiny_vit(hidden=16, layers=1)
    # A SuperBlock-layout state dict: Linear layers carry scores/scale/shift, in_proj is a plain weight.
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    for name in ("encoder.layers.encoder_layer_0.self_attention.out_proj", "encoder.layers.encoder_layer_0.mlp.0",
                 "encoder.layers.encoder_layer_0.mlp.3", "heads.head"):
        w = sd[f"{name}.weight"]
        sd[f"{name}.scores"] = torch.randn(math.ceil(w.shape[0] / 4), math.ceil(w.shape[1] / 4))
        sd[f"{name}.scale"], sd[f"{name}.shift"] = torch.ones(1), torch.zeros(1)
    target = tiny_vit(hidden=16, layers=1)
    apply_supermask(target, linear_sparsity=0.5, linear_tile_size=4, attention_in_proj=True)
    with pytest.warns(UserWarning, match="no scores for attention input projections.*left dense"):
        load_superblock_checkpoint(target, sd, strict=True)
    attn = target.encoder.layers.encoder_layer_0.self_attention
    assert not parametrize.is_parametrized(attn, "in_proj_weight")
    torch.testing.assert_close(attn.in_proj_weight, sd["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"])
    assert parametrize.is_parametrized(target.encoder.layers.encoder_layer_0.mlp[0], "weight")


def test_cli_attention_in_proj_trains_and_evaluates(tmp_path, capsys):
    pytest.importorskip("PIL")
    import numpy as np
    from PIL import Image

    from sparse_compile.training import evaluate as evaluate_cli
    from sparse_compile.training import train as train_cli

    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for c in range(2):
            folder = tmp_path / "data" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3)).astype(np.uint8)).save(folder / f"{i}.png")
    kwargs = {"patch_size": 4, "num_layers": 1, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}
    model = ["--model", "VisionTransformer", "--model-kwargs", json.dumps(kwargs), "--image-size", "16"]
    flags = ["--sparsity-linear", "0.5", "--sp-linear-tile-size", "4", "--attention-in-proj"]
    base = ["--data-path", str(tmp_path / "data"), "--device", "cpu", "--workers", "0", "--batch-size", "4"] + model
    trained = train_cli.run(base + flags + ["--epochs", "1", "--output-dir", str(tmp_path / "out")])
    assert "self_attention.in_proj" in capsys.readouterr().out  # the sparsity table lists it
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert "encoder.layers.encoder_layer_0.self_attention.parametrizations.in_proj_weight.0.scores" in ckpt["model"]
    evaluated = evaluate_cli.run(base + flags + ["--weights-path", str(tmp_path / "out" / "checkpoint.pth")])
    assert evaluated["acc1"] == trained["acc1"]
    # The flag alone masks nothing: a clear error instead of a silent no-op.
    with pytest.raises(SystemExit) as e:
        train_cli.main(base + ["--attention-in-proj"])
    assert e.value.code == 2 and "add --sparsity-linear or --nm" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# benchmarks.vit: the Supermask layout with and without in_proj


@pytest.mark.usefixtures("fresh_compiler")
def test_benchmark_supermask_layout_rows_count_in_proj():
    from benchmarks import vit

    args = vit.parse_args([
        "--device", "cpu", "--warmup", "0", "--reps", "1", "--model", "tiny", "--image-size", "32",
        "--patch-size", "16", "--num-layers", "1", "--hidden-dim", "64", "--mlp-dim", "128", "--num-heads", "2",
        "--batch-size", "2", "--sparsity", "0.75", "--blocksize", "16",
    ])  # fmt: skip
    torch.manual_seed(1)
    setup = vit.Setup(args, torch.device("cpu"), torch.float32, torch.randn(2, 3, 32, 32))
    jobs = vit.supermask_rows(setup, vit.build_model(args), sparsity=0.75, blocksize=16)
    incl, excl = (vit.build_row(setup, job, i, len(jobs)) for i, job in enumerate(jobs))
    assert incl.variant == "Supermask layout incl. in_proj" and excl.variant == "Supermask layout excl. in_proj"
    for row in (incl, excl):  # built and checked (not timed here): equal to eager of the same weights
        assert row.note == "" and row.rel_err <= row.tol, (row.note, row.rel_err)
    # one encoder block: in_proj, out_proj, two MLP linears (+ the dense head)
    assert (incl.sparse_layers, excl.sparse_layers) == ("4/5", "3/5")


# --------------------------------------------------------------------------------------------
# One sparsity target per q/k/v, or one shared: measured on the digits


class DigitsTransformer(nn.Module):
    """8x8 digits as 8 tokens (pixel rows) of 8 features; two encoder blocks of width 32."""

    def __init__(self, width=32, blocks=2):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.pos = nn.Parameter(torch.randn(1, 8, width) * 0.02)
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True) for _ in range(blocks)
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        h = self.embed(x.view(-1, 8, 8)) + self.pos
        for block in self.encoder:
            h = block(h)
        return self.head(h.mean(1))


def train_digits_transformer(target: str, seed: int, sparsity: float, epochs: int = 20):
    """Test accuracy and the trained model; ``target`` is "per-qkv" (apply_supermask's) or "shared".

    Supermask, tile 4, on every encoder linear including in_proj; embed and head stay dense.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:1347], order[1347:]
    torch.manual_seed(seed)
    model = DigitsTransformer()
    encoder_only = lambda name, m: name.startswith("encoder")  # noqa: E731
    apply_supermask(model, linear_sparsity=sparsity, linear_tile_size=4, attention_in_proj=(target == "per-qkv"),
                    filter_fn=encoder_only)
    if target == "shared":  # a plain Supermask over the whole [3E, E]: q, k and v compete for the tiles
        for block in model.encoder:
            attn = block.self_attn
            parametrize.register_parametrization(attn, "in_proj_weight", Supermask(attn.in_proj_weight.shape, sparsity, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(train), generator=gen).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[train[idx]]), y[train[idx]]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    return accuracy, model


@pytest.mark.slow
def test_in_proj_target_per_qkv_learns_digits():
    """Measured with this helper (torch 2.11 CPU; seeds 0-7; test accuracy, mean over seeds):
    see "Attention input projections" in training/apply.py for the table."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead on a shared CPU
    try:
        per_qkv, model = train_digits_transformer("per-qkv", seed=0, sparsity=0.9)
        shared, shared_model = train_digits_transformer("shared", seed=0, sparsity=0.9)
    finally:
        torch.set_num_threads(threads)
    print(f"\ndigits transformer, Supermask 90% tile 4 incl. in_proj: per q/k/v {per_qkv:.4f}  shared {shared:.4f}")
    # per q/k/v: each third (64 tiles of 4x4) keeps 64 - (1 + round(0.9 * 63)) + 1 = 7 tiles
    for block in model.encoder:
        w = block.self_attn.in_proj_weight.detach()
        assert [(part != 0).float().mean().item() for part in w.chunk(3)] == [7 / 64] * 3
    # shared: 192 tiles keep 20 in all, split among q, k and v as training went
    for block in shared_model.encoder:
        kept = [(p != 0).sum().item() / 16 for p in block.self_attn.in_proj_weight.detach().chunk(3)]
        assert sum(kept) == 20
    assert per_qkv >= 0.9
