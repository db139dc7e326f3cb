"""Model-wide helpers: layer selection, skips, finalize, summary, post projection, torch.compile."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from sparse_compile.training import (
    NMMask,
    Supermask,
    apply_nm,
    apply_supermask,
    finalize,
    first_transformer_block,
    format_sparsity_summary,
    sparsity_summary,
)

tvm = pytest.importorskip("torchvision.models")


def tiny_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=16, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10)


def tiny_resnet():
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, width_per_group=64)


def masked(model):
    return {n for n, m in model.named_modules() if parametrize.is_parametrized(m, "weight")}


def test_kinds_get_their_settings():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 4, 6, 6))
    names = apply_supermask(
        model, linear_sparsity=0.5, linear_tile_size=2, conv1x1_sparsity=0.25, conv1x1_tile_size=4, conv_sparsity=0.75
    )
    assert names == ["0", "1", "3"]
    sm = {n: model[int(n)].parametrizations.weight[0] for n in names}
    assert (sm["0"].sparsity, sm["0"].tile_size) == (0.75, 1)
    assert (sm["1"].sparsity, sm["1"].tile_size) == (0.25, 4)
    assert (sm["3"].sparsity, sm["3"].tile_size) == (0.5, 2)
    model2 = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8, 4))
    assert apply_supermask(model2, conv1x1_sparsity=0.5) == ["1"]  # 0 = leave dense


def test_vit_skips_and_attention():
    model = tiny_vit()
    names = apply_supermask(model, linear_sparsity=0.5, skip_first_transformer=True, skip_last_layer=True)
    assert first_transformer_block(model) == "encoder.layers.encoder_layer_0"
    assert "heads.head" not in names
    assert not any(n.startswith("encoder.layers.encoder_layer_0.") for n in names)
    assert "encoder.layers.encoder_layer_1.self_attention.out_proj" in names  # a Linear subclass
    assert "encoder.layers.encoder_layer_2.mlp.0" in names and "conv_proj" not in names
    # in_proj_weight is a raw Parameter of nn.MultiheadAttention: left dense (as SuperBlock)
    attn = model.encoder.layers.encoder_layer_1.self_attention
    assert not parametrize.is_parametrized(attn)
    # MultiheadAttention reads out_proj.weight directly: the mask is applied
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    assert attn.out_proj.parametrizations.weight[0].scores.grad is not None
    # everything else
    all_names = apply_supermask(tiny_vit(), linear_sparsity=0.5, conv_sparsity=0.5)
    assert "heads.head" in all_names and "conv_proj" in all_names
    assert "encoder.layers.encoder_layer_0.mlp.3" in all_names


def test_vit_bimask_trains():
    model = tiny_vit()
    names = apply_nm(model, 2, 4, skip_last_layer=True, perm_candidates=4)
    assert "heads.head" not in names and "conv_proj" not in names
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    w = model.encoder.layers.encoder_layer_0.mlp[0].parametrizations.weight.original
    assert w.grad is not None and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("mode", ["bidirectional", "forward"])
def test_apply_nm_leaves_the_patch_embedding_dense_unless_asked(mode):
    # The reference DeiT masks only its blocks' qkv/proj/fc1/fc2 (NMConv); PatchEmbed.proj is a
    # plain nn.Conv2d. conv_proj's 3x16x16 = 768 holds 2:4, so the shape rule alone would mask it.
    model = tiny_vit()
    names = apply_nm(model, 2, 4, mode=mode, perm_candidates=2, skip_last_layer=True)
    assert "conv_proj" not in names and type(model.conv_proj) is nn.Conv2d
    assert "encoder.layers.encoder_layer_0.mlp.0" in names
    row = next(r for r in sparsity_summary(model) if r["name"] == "conv_proj")
    assert row["method"].startswith("dense: patch embedding") and row["sparsity"] == 0.0
    flagged = tiny_vit()
    names = apply_nm(flagged, 2, 4, mode=mode, perm_candidates=2, skip_last_layer=True, patch_embedding=True)
    assert "conv_proj" in names and parametrize.is_parametrized(flagged.conv_proj, "weight")
    flagged(torch.randn(2, 3, 32, 32)).sum().backward()
    assert flagged.conv_proj.parametrizations.weight.original.grad is not None
    # no attention module, no patch embedding: a ResNet's convs are candidates as before
    from sparse_compile.training.apply import patch_embeddings

    assert patch_embeddings(tiny_vit()) == ["conv_proj"] and patch_embeddings(tiny_resnet()) == []
    assert apply_nm(tiny_resnet(), 2, 4, mode=mode, filter_fn=lambda n, m: n == "layer1.0.conv1") == ["layer1.0.conv1"]


def test_cli_flags_reach_apply_nm():
    # The N:M flags of the train/evaluate programs: --nm-patch-embedding, --nm-decay-per-sample.
    import argparse

    from sparse_compile.training import cli_args

    parser = argparse.ArgumentParser()
    cli_args.add_sparsity_args(parser)
    for flags, masked, per_sample in (([], False, False), (["--nm-patch-embedding", "--nm-decay-per-sample"], True, True)):
        args = parser.parse_args(["--nm", "2:4"] + flags)
        cli_args.check_sparsity_args(args, parser)
        model = tiny_vit()
        names = cli_args.apply_sparsity(model, args)
        assert ("conv_proj" in names) is masked
        assert model.encoder.layers.encoder_layer_0.mlp[0].parametrizations.weight[0].decay_per_sample is per_sample


def test_resnet_skip_last_and_kinds():
    model = tiny_resnet()
    names = apply_supermask(model, linear_sparsity=0.5, conv1x1_sparsity=0.5, conv_sparsity=0.5, skip_last_layer=True)
    assert "fc" not in names
    assert "conv1" in names and "layer2.0.downsample.0" in names
    assert model.layer2[0].downsample[0].parametrizations.weight[0].sparsity == 0.5
    with pytest.raises(ValueError, match="no transformer block"):
        apply_supermask(tiny_resnet(), linear_sparsity=0.5, skip_first_transformer=True)


def test_torch_transformer_encoder_detection_and_filter():
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoder(layer, 3, enable_nested_tensor=False), nn.Linear(16, 4))
    assert first_transformer_block(model) == "1.layers.0"
    names = apply_supermask(model, linear_sparsity=0.5, skip_first_transformer=True, filter_fn=lambda n, m: n != "0")
    assert "0" not in names and "2" in names
    assert not any(n.startswith("1.layers.0.") for n in names) and "1.layers.1.linear1" in names


def test_apply_nm_shape_error_leaves_model_untouched():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(ValueError, match="layer '2'.*output dim 10.*skip_last_layer"):
        apply_nm(model, 2, 4, on_incompatible="error")
    assert masked(model) == set()
    with pytest.raises(ValueError, match="on_incompatible"):
        apply_nm(model, 2, 4, on_incompatible="skip")
    assert apply_nm(model, 2, 4, skip_last_layer=True) == ["0"]
    with pytest.raises(ValueError, match="already has a parametrization"):
        apply_nm(model, 2, 4, skip_last_layer=True)


@pytest.mark.parametrize("mode", ["bidirectional", "forward"])
def test_apply_nm_leaves_a_resnet_stem_dense_with_a_warning(mode):
    # ResNet's stem conv has a reduction dim of 3 * 7 * 7 = 147: no 2:4 pattern fits. The
    # reference keeps it dense; so do we, by default, and say so.
    model = tiny_resnet()
    model.fc = nn.Linear(512, 3)  # 3 outputs: no room for the backward mask's groups of 4
    with pytest.warns(UserWarning, match=r"conv1 \(reduction dim 147 not divisible by M=4\)") as caught:
        names = apply_nm(model, 2, 4, mode=mode, perm_candidates=2)
    left = {"conv1", "fc"} if mode == "bidirectional" else {"conv1"}
    if mode == "bidirectional":
        assert "fc (output dim 3 not divisible by M=4" in str(caught[0].message)
    convs_and_linears = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(names) == masked(model) == convs_and_linears - left
    rows = {r["name"]: r for r in sparsity_summary(model)}
    assert rows["conv1"]["method"] == "dense: 2:4 does not fit: reduction dim 147 not divisible by M=4"
    assert rows["conv1"]["target_sparsity"] == 0.0 and rows["conv1"]["sparsity"] == 0.0
    assert rows["layer1.0.conv1"]["method"] == f"2:4 {mode}"
    assert "reduction dim 147" in format_sparsity_summary(model)
    assert type(model.conv1) is nn.Conv2d  # untouched (training end to end: test_cli's README command)


def test_bad_arguments():
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="linear_sparsity"):
        apply_supermask(model, linear_sparsity=1.0)
    with pytest.raises(ValueError, match="conv_tile_size"):
        apply_supermask(model, conv_tile_size=0)
    with pytest.raises(ValueError, match="1 <= N < M"):
        apply_nm(model, 4, 2)
    with pytest.raises(ValueError, match="unknown NMMask mode"):
        apply_nm(model, 2, 4, mode="both")
    assert masked(model) == set()


@pytest.mark.parametrize("method", ["supermask", "bimask", "unstructured"])
def test_finalize(method):
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 4))
    if method == "supermask":
        apply_supermask(model, linear_sparsity=0.6, linear_tile_size=4, conv_sparsity=0.5, conv_tile_size=2)
    elif method == "bimask":
        apply_nm(model, 2, 4)
    else:
        apply_nm(model, 2, 4, mode="unstructured", keep_ratio=0.3)
    x = torch.randn(3, 4, 6, 6)
    model.eval()
    with torch.no_grad():
        before = model(x)
        expected = {}
        for name, mod in model.named_modules():
            if parametrize.is_parametrized(mod):
                plist = mod.parametrizations.weight
                p = plist[0]
                mask = p.mask() if isinstance(p, Supermask) else p.forward_mask(plist.original)
                expected[name] = plist.original * mask
    assert finalize(model) is model
    assert masked(model) == set() and not any(parametrize.is_parametrized(m) for m in model.modules())
    for name, w in expected.items():
        mod = model.get_submodule(name)
        assert type(mod) in (nn.Linear, nn.Conv2d)
        assert torch.equal(mod.weight, w) and isinstance(mod.weight, nn.Parameter)
    assert not any(".parametrizations." in k for k in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


def test_sparsity_summary():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
    apply_supermask(model, linear_sparsity=0.5, linear_tile_size=4, filter_fn=lambda n, m: n == "0")
    apply_nm(model, 2, 4, filter_fn=lambda n, m: n == "2")
    rows = sparsity_summary(model)
    assert [r["name"] for r in rows] == ["0", "2"]
    assert rows[0]["method"] == "supermask tile=4" and rows[0]["kind"] == "linear" and rows[0]["shape"] == (32, 16)
    assert rows[0]["target_sparsity"] == 0.5 and rows[0]["sparsity"] == pytest.approx(0.5)
    assert rows[1]["method"] == "2:4 bidirectional" and rows[1]["sparsity"] == 0.5
    full = sparsity_summary(model, include_dense=True)
    assert full[-1]["method"] == "dense" and full[-1]["sparsity"] == 0.0
    table = format_sparsity_summary(model)
    assert "supermask tile=4" in table and "target_sparsity" in table
    assert format_sparsity_summary(nn.Linear(2, 2)) == "(no masked layers)"


def _train(model, fn, steps, x, t):
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(fn(x), t)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["supermask", "bimask"])
def test_torch_compile_matches_eager(method):
    torch._dynamo.reset()

    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
        if method == "supermask":
            apply_supermask(m, linear_sparsity=0.5, linear_tile_size=4)
        else:
            apply_nm(m, 2, 4, perm_every=2, perm_candidates=8, decay=0.01)
        return m

    eager, comp = build(), build()
    x, t = torch.randn(8, 16), torch.randint(0, 8, (8,))
    l_eager = _train(eager, eager, 5, x, t)
    l_comp = _train(comp, torch.compile(comp), 5, x, t)
    torch.testing.assert_close(l_comp, l_eager, rtol=1e-5, atol=1e-6)
    for (n, p), (_, q) in zip(eager.state_dict().items(), comp.state_dict().items()):
        if isinstance(p, torch.Tensor):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)
    if method == "bimask":
        assert eager[0].parametrizations.weight[0]._searches == comp[0].parametrizations.weight[0]._searches == 3
    torch._dynamo.reset()
