"""state_dict round trips, and import of SuperBlock SupermaskLinear checkpoints."""

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from sparse_compile.training import apply_nm, apply_supermask, load_superblock_checkpoint
from sparse_compile.training.checkpoint import atomic_save, model_state_dict


def mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))


def train_a_bit(model, steps=4):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()


def masks_of(model):
    out = {}
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod, "weight"):
            p, w = mod.parametrizations.weight[0], mod.parametrizations.weight.original
            out[name] = p.mask() if hasattr(p, "scores") else torch.stack(p.masks(w))
    return out


@pytest.mark.parametrize("method", ["supermask", "bimask"])
def test_state_dict_round_trip(method, tmp_path):
    def build(seed):
        torch.manual_seed(seed)
        m = mlp()
        if method == "supermask":
            apply_supermask(m, linear_sparsity=0.7, linear_tile_size=4)
        else:
            apply_nm(m, 2, 4, perm_every=2, perm_candidates=16)
        return m

    src = build(0)
    train_a_bit(src)
    if method == "bimask":
        p = src[0].parametrizations.weight[0]
        assert not torch.equal(p.perm, torch.arange(32))  # a searched permutation is what we round-trip
        assert p._searches == 3
    torch.save(src.state_dict(), tmp_path / "ck.pth")
    dst = build(1)  # different init, scores, permutation seed
    dst.load_state_dict(torch.load(tmp_path / "ck.pth", weights_only=True))
    for name, mask in masks_of(src).items():
        assert torch.equal(masks_of(dst)[name], mask), name
    if method == "bimask":
        for a, b in ((src[i], dst[i]) for i in (0, 2)):
            pa, pb = a.parametrizations.weight[0], b.parametrizations.weight[0]
            assert torch.equal(pa.perm, pb.perm)
            assert (pa._calls, pa._searches, pa.seed) == (pb._calls, pb._searches, pb.seed)
    x = torch.randn(5, 16)
    src.eval(), dst.eval()
    assert torch.equal(src(x), dst(x))


def superblock_reference(sd, prefix, x, sparsity, tile):
    """Hand computation of a SuperBlock SupermaskLinear: (W * scale + shift) * mask(scores), x W^T + b."""
    w, b, scores = sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], sd[f"{prefix}.scores"]
    flat = sorted(scores.reshape(-1).tolist())
    k = 1 + round(0.01 * float(sparsity * 100) * (len(flat) - 1))  # SuperBlock's percentile()
    tiles = (scores >= flat[k - 1]).to(w.dtype)
    mask = torch.zeros_like(w)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            mask[i, j] = tiles[i // tile, j // tile]
    w_eff = (w * sd[f"{prefix}.scale"] + sd[f"{prefix}.shift"]) * mask
    return x @ w_eff.T + b


def superblock_state_dict(tile):
    """A checkpoint in SuperBlock's layout: Linear layers replaced by SupermaskLinear, the last one dense."""
    g = torch.Generator().manual_seed(7)
    sd = {}
    for name, (o, i) in {"0": (32, 16), "2": (16, 32)}.items():
        sd[f"{name}.weight"] = torch.randn(o, i, generator=g, dtype=torch.float64)
        sd[f"{name}.bias"] = torch.randn(o, generator=g, dtype=torch.float64)
        sd[f"{name}.scores"] = torch.randn(-(-o // tile), -(-i // tile), generator=g, dtype=torch.float64)
        sd[f"{name}.scale"] = torch.tensor([1.5], dtype=torch.float64)  # non-trivial: the fold is tested
        sd[f"{name}.shift"] = torch.tensor([0.25], dtype=torch.float64)
    sd["4.weight"] = torch.randn(8, 16, generator=g, dtype=torch.float64)
    sd["4.bias"] = torch.randn(8, generator=g, dtype=torch.float64)
    return sd


@pytest.mark.parametrize("wrap", ["bare", "checkpoint_file_ddp"])
def test_superblock_import(wrap, tmp_path):
    tile, sparsity = 4, 0.6
    sd = superblock_state_dict(tile)
    model = mlp().double()
    apply_supermask(model, linear_sparsity=sparsity, linear_tile_size=tile, skip_last_layer=True)
    if wrap == "bare":
        load_superblock_checkpoint(model, sd)
    else:  # torchvision-references checkpoint of a DDP model, from a path
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "sb.pth")
        load_superblock_checkpoint(model, str(tmp_path / "sb.pth"))
    x = torch.randn(6, 16, dtype=torch.float64)
    h = torch.relu(superblock_reference(sd, "0", x, sparsity, tile))
    h = torch.relu(superblock_reference(sd, "2", h, sparsity, tile))
    ref = h @ sd["4.weight"].T + sd["4.bias"]
    torch.testing.assert_close(model(x), ref)
    torch.testing.assert_close(model[0].parametrizations.weight.original, sd["0.weight"] * 1.5 + 0.25)


def test_superblock_import_errors():
    sd = superblock_state_dict(4)
    model = mlp().double()
    apply_supermask(model, linear_sparsity=0.5, linear_tile_size=8, skip_last_layer=True)
    with pytest.raises(ValueError, match="tile size"):
        load_superblock_checkpoint(model, sd)
    dense = mlp().double()
    with pytest.raises(KeyError, match="apply_supermask first"):
        load_superblock_checkpoint(dense, sd)
    # non-strict: dense model takes what fits (weights as stored, scores ignored)
    load_superblock_checkpoint(dense, sd, strict=False)
    assert torch.equal(dense[0].weight, sd["0.weight"])


def test_model_state_dict_strips_wrapper_prefixes_once_for_all():
    sd = {"0.weight": torch.randn(2, 2), "2.bias": torch.randn(2)}
    plain = model_state_dict(sd)
    assert list(plain) == ["0.weight", "2.bias"] and plain is not sd
    for wrapped in (
        {f"module.{k}": v for k, v in sd.items()},  # DDP
        {f"_orig_mod.{k}": v for k, v in sd.items()},  # torch.compile
        {f"module._orig_mod.{k}": v for k, v in sd.items()},  # DDP around a compiled model
        {"model": {f"_orig_mod.module.{k}": v for k, v in sd.items()}, "epoch": 3},  # checkpoint layout
    ):
        got = model_state_dict(wrapped)
        assert got.keys() == sd.keys() and all(got[k] is sd[k] for k in sd)
    with pytest.raises(TypeError, match="'model' entry"):
        model_state_dict([1, 2])


def test_atomic_save_keeps_the_old_file_when_saving_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    old = {"epoch": 0, "w": torch.randn(3)}
    atomic_save(old, path)
    real_save = torch.save

    def crash_mid_write(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"epoch": 1, "w": torch.randn(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    back = torch.load(path, weights_only=True)
    assert back["epoch"] == 0 and torch.equal(back["w"], old["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]  # no temporary file left behind
    atomic_save({"epoch": 2}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 2}
