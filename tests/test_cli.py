"""The train / evaluate programs, end to end on a tiny ImageFolder (CPU, seconds each)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402

from sparse_compile.training import evaluate as evaluate_cli  # noqa: E402
from sparse_compile.training import train as train_cli  # noqa: E402

# A one-block ViT on 16 px images: 16 patches of 4x4, width 32. No batch norm, no dropout.
TINY_VIT = [
    "--model", "VisionTransformer",
    "--model-kwargs", json.dumps({"patch_size": 4, "num_layers": 1, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}),
    "--image-size", "16",
]  # fmt: skip
SUPERMASK = ["--sparsity-linear", "0.5", "--sp-linear-tile-size", "4"]


def make_image_folder(root, classes: int = 3, train_per_class: int = 8, val_per_class: int = 4, size: int = 16):
    """Random 16x16 PNGs whose class sets one colour channel high: learnable in a few steps."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
                img[:, :, c % 3] += 150
                Image.fromarray(img).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return str(make_image_folder(tmp_path_factory.mktemp("imagefolder")))


def common(data_path, out=None, epochs=1):
    argv = ["--data-path", data_path, "--device", "cpu", "--workers", "0", "--batch-size", "8"]
    argv += ["--epochs", str(epochs), "--lr", "0.05", "--print-freq", "1"]
    return argv + (["--output-dir", str(out)] if out is not None else [])


def load_ckpt(out):
    # weights_only=True: a checkpoint holds plain data only (no pickled classes such as Namespace)
    return torch.load(os.path.join(out, "checkpoint.pth"), map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs")


def test_train_supermask_vit_resume_and_evaluate(data_path, tmp_path, capsys, monkeypatch):
    # Uninterrupted: 2 epochs.
    full = tmp_path / "full"
    train_cli.main(common(data_path, full, epochs=2) + TINY_VIT + SUPERMASK)
    out = capsys.readouterr().out
    assert "Epoch: [0] [0/3]" in out and "Epoch: [1] [2/3]" in out
    progress = next(line for line in out.splitlines() if line.startswith("Epoch: [0] [1/3]"))
    for field in ("eta: ", "lr: 0.050000", "img/s: ", "loss: "):
        assert field in progress, progress
    assert "Test:  Acc@1 " in out and " Acc@5 " in out and "Test:  Total time: " in out
    assert "sparsity" in out.lower()  # the per-layer table at start
    acc1_full, acc5_full = map(float, re.findall(r"Test:  Acc@1 (\S+) Acc@5 (\S+)", out)[-1])
    ckpt = load_ckpt(full)
    assert set(ckpt) >= {"model", "optimizer", "lr_scheduler", "epoch", "args"}
    assert ckpt["epoch"] == 1
    assert any("scores" in k for k in ckpt["model"]), "Supermask scores missing from the checkpoint"

    # The same 2-epoch run killed right after saving epoch 0, then resumed: must end exactly
    # where the uninterrupted run did.
    part = tmp_path / "part"
    run_killed_after_first_save(monkeypatch, common(data_path, part, epochs=2) + TINY_VIT + SUPERMASK)
    assert load_ckpt(part)["epoch"] == 0
    capsys.readouterr()
    res_resumed = train_cli.run(
        common(data_path, part, epochs=2) + TINY_VIT + SUPERMASK + ["--resume", str(part / "checkpoint.pth")]
    )
    out = capsys.readouterr().out
    assert "continuing at epoch 1" in out and "Epoch: [0]" not in out
    resumed = load_ckpt(part)
    assert resumed["epoch"] == 1
    assert_same_state(resumed["model"], ckpt["model"])
    assert round(res_resumed["acc1"], 3) == acc1_full

    # Evaluate the checkpoint: online masks, then offline (finalized) weights: same accuracy.
    ev = ["--data-path", data_path, "--device", "cpu", "--workers", "0", "--batch-size", "5"]
    ev += TINY_VIT + SUPERMASK + ["--weights-path", str(full / "checkpoint.pth")]
    online = evaluate_cli.run(ev)
    offline = evaluate_cli.run(ev + ["--sparsify-weights"])
    out = capsys.readouterr().out
    assert "Test:  Acc@1 " in out and "Test:  Total time: " in out
    assert online["acc1"] == offline["acc1"] == res_resumed["acc1"]
    assert online["acc5"] == offline["acc5"] == res_resumed["acc5"]
    assert round(online["acc1"], 3) == acc1_full and round(online["acc5"], 3) == acc5_full


def test_a_crash_while_saving_keeps_the_previous_checkpoint(data_path, tmp_path, monkeypatch):
    train_cli.main(common(data_path, tmp_path) + TINY_VIT + SUPERMASK)
    first = load_ckpt(tmp_path)
    assert first["args"]["sparsity_linear"] == 0.5  # args as a plain dict

    def crash_mid_write(obj, f, *args, **kwargs):
        (f if hasattr(f, "write") else open(f, "wb")).write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        train_cli.main(common(data_path, tmp_path) + TINY_VIT + SUPERMASK + ["--lr", "0.2"])
    monkeypatch.undo()
    assert_same_state(load_ckpt(tmp_path)["model"], first["model"])
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]


def test_evaluate_plain_state_dict_and_bad_flags(data_path, tmp_path, capsys):
    full = tmp_path / "run"
    train_cli.main(common(data_path, full) + TINY_VIT + SUPERMASK)
    sd_path = tmp_path / "plain.pth"
    torch.save(load_ckpt(full)["model"], sd_path)
    ev = ["--data-path", data_path, "--device", "cpu", "--workers", "0"] + TINY_VIT
    a = evaluate_cli.run(ev + SUPERMASK + ["--weights-path", str(sd_path)])
    b = evaluate_cli.run(ev + SUPERMASK + ["--weights-path", str(full / "checkpoint.pth")])
    assert a["acc1"] == b["acc1"]
    # The same weights in pytorch-labs/superblock's layout (L.weight, L.scores, L.scale, L.shift).
    sb = {}
    for k, v in load_ckpt(full)["model"].items():
        k = k.replace(".parametrizations.weight.original", ".weight").replace(".parametrizations.weight.0.", ".")
        sb[k] = v
        if k.endswith(".scores"):
            sb[k.replace(".scores", ".scale")], sb[k.replace(".scores", ".shift")] = torch.ones(1), torch.zeros(1)
    torch.save({"model": sb}, tmp_path / "superblock.pth")
    c = evaluate_cli.run(ev + SUPERMASK + ["--weights-path", str(tmp_path / "superblock.pth")])
    assert "as a SuperBlock checkpoint" in capsys.readouterr().out
    assert c["acc1"] == a["acc1"] and c["acc5"] == a["acc5"]
    # Without the sparsity flags the keys cannot match: the error says which flags to pass.
    with pytest.raises(RuntimeError, match="sparsity flags"):
        evaluate_cli.run(ev + ["--weights-path", str(sd_path)])


@pytest.mark.parametrize("mode", ["bidirectional", "post"])
def test_train_nm_2_4_and_evaluate(data_path, tmp_path, capsys, monkeypatch, mode):
    import sparse_compile.training as T

    calls = []
    real = T.post_step_projection
    monkeypatch.setattr(T, "post_step_projection", lambda m: (calls.append(1), real(m)))
    out_dir = tmp_path / mode
    # The 3-class head cannot be grouped by 4 along its outputs (the backward mask): keep it dense.
    nm = ["--nm", "2:4", "--mask-mode", mode, "--perm-every", "2", "--perm-candidates", "4", "--skip-last-layer-sparsity"]
    res = train_cli.run(common(data_path, out_dir) + TINY_VIT + nm + (["--amp"] if mode == "post" else []))
    out = capsys.readouterr().out
    assert "Epoch: [0] [2/3]" in out and "Test:  Acc@1 " in out
    assert load_ckpt(out_dir)["epoch"] == 0
    assert len(calls) == (3 if mode == "post" else 0)  # after each of the 3 optimizer steps

    ev = ["--data-path", data_path, "--device", "cpu", "--workers", "0"] + TINY_VIT + nm
    ev += ["--weights-path", str(out_dir / "checkpoint.pth")]
    online = evaluate_cli.run(ev)
    offline = evaluate_cli.run(ev + ["--sparsify-weights"])
    assert online["acc1"] == offline["acc1"] == res["acc1"]
    assert online["acc5"] == offline["acc5"]


def test_train_resnet18_supermask_conv(data_path, tmp_path, capsys):
    flags = ["--model", "resnet18", "--image-size", "16", "--sparsity-conv", "0.5", "--sp-conv-tile-size", "2"]
    flags += ["--sparsity-conv1x1", "0.3", "--sparsity-linear", "0.5", "--skip-last-layer-sparsity"]
    flags += ["--opt", "adamw", "--lr-scheduler", "steplr", "--label-smoothing", "0.1"]
    res = train_cli.run(common(data_path, tmp_path) + flags + ["--batch-size", "24"])  # one step: resnet18 is big
    out = capsys.readouterr().out
    assert "Test:  Acc@1 " in out
    assert 0.0 <= res["acc1"] <= 100.0
    keys = load_ckpt(tmp_path)["model"].keys()
    assert any(k.startswith("layer1.0.conv1.parametrizations.weight") for k in keys)
    assert "fc.weight" in keys  # last layer skipped: stays a plain weight


def test_readme_bimask_resnet_command_leaves_the_stem_dense(data_path, tmp_path, capsys):
    # The README's Bi-Mask ResNet command, at test size (resnet18: the same 3x7x7 stem, whose
    # reduction dim 147 holds no 2:4; the 3-class head cannot hold the backward mask): both stay
    # dense with a warning and a line in the table, everything else trains with 2:4 Bi-Mask.
    readme = ["--model", "resnet18", "--lr", "0.1", "--label-smoothing", "0.1"]
    readme += ["--nm", "2:4", "--mask-mode", "bidirectional", "--perm-every", "100", "--perm-candidates", "2"]
    with pytest.warns(UserWarning, match=r"conv1 \(reduction dim 147 not divisible by M=4\)"):
        res = train_cli.run(common(data_path, tmp_path) + readme + ["--image-size", "16", "--batch-size", "24"])
    out = capsys.readouterr().out
    assert "Test:  Acc@1 " in out and 0.0 <= res["acc1"] <= 100.0
    table_lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("conv1 ", "fc ", "layer1.0.conv1 "))}
    assert "dense: 2:4 does not fit: reduction dim 147 not divisible by M=4" in table_lines["conv1"]
    assert "dense: 2:4 does not fit: output dim 3" in table_lines["fc"]
    assert "2:4 bidirectional" in table_lines["layer1.0.conv1"]
    keys = load_ckpt(tmp_path)["model"].keys()
    assert "conv1.weight" in keys and "fc.weight" in keys
    assert "layer1.0.conv1.parametrizations.weight.original" in keys


def test_sparsity_table_keeps_numeric_layer_names_as_text():
    import torch.nn as nn

    from sparse_compile import training
    from sparse_compile.training import cli_args

    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8)))
    training.apply_supermask(model, linear_sparsity=0.5, linear_tile_size=2)
    table = cli_args.sparsity_table(model)
    names = [line.split()[0] for line in table.splitlines()[2:]]
    assert names == ["0", "1.0"], table  # not 0.0000 / 1.0000
    assert table == training.format_sparsity_summary(model)  # one table for the library and the CLIs
    assert cli_args.sparsity_table(nn.Linear(2, 2)) == ""


def test_train_then_evaluate_bsr_runs_the_sparse_path(data_path, tmp_path, capsys):
    tiles16 = ["--sparsity-linear", "0.5", "--sp-linear-tile-size", "16"]  # the backend takes blocks >= 16
    train_cli.main(common(data_path, tmp_path) + TINY_VIT + tiles16)
    ev = ["--data-path", data_path, "--device", "cpu", "--workers", "0"] + TINY_VIT + tiles16
    ev += ["--weights-path", str(tmp_path / "checkpoint.pth"), "--sparsify-weights"]
    dense = evaluate_cli.run(ev)
    # Half the 16x16 blocks survive, above the default threshold (0.4): --density-threshold 1
    # converts every layer that spans a whole block, so BSR really runs and must agree with dense.
    bsr = evaluate_cli.run(ev + ["--bsr", "16", "--density-threshold", "1"])
    out = capsys.readouterr().out
    assert bsr["compiled"] and dense["bsr_layers"] == 0
    # in_proj, out_proj, mlp.0, mlp.3 (the 3x32 head is narrower than one block)
    assert bsr["bsr_layers"] >= 4, out[-3000:]
    assert re.search(r"mlp\.0 +linear +64x32 +float32 +bsr", out)
    assert bsr["acc1"] == pytest.approx(dense["acc1"])
    assert bsr["acc5"] == pytest.approx(dense["acc5"])


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--bsr", "7"], "blocksize=7 is not supported"),
        (["--bsr", "0"], "blocksize=0 is not supported"),
        (["--bsr", "16", "--density-threshold", "1.5"], "outside [0, 1]"),
        (["--bsr", "16", "--density-threshold", "dense"], "not a number in [0, 1]"),
        (["--density-threshold", "0.5"], "only applies with --bsr"),
    ],
)
def test_evaluate_checks_backend_flags_before_any_work(flags, message, capsys, tmp_path):
    # The data path does not exist: a flag error must come first, not a data (or compile) error.
    with pytest.raises(SystemExit) as e:
        evaluate_cli.main(["--data-path", str(tmp_path / "nowhere")] + TINY_VIT + flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bsr_without_sparse_backend_is_an_error_not_a_dense_run(monkeypatch, tmp_path):
    import torch._dynamo.backends.registry as registry

    def missing(name):
        raise RuntimeError(f"no backend named {name!r}")

    monkeypatch.setattr(registry, "lookup_backend", missing)
    with pytest.raises(RuntimeError, match="needs the 'sparse' torch.compile backend.*leave out --bsr"):
        evaluate_cli.run(["--data-path", str(tmp_path / "nowhere")] + TINY_VIT + ["--bsr", "16"])


def test_evaluate_shows_the_superblock_loaders_reason(data_path, tmp_path):
    train_cli.main(common(data_path, tmp_path) + TINY_VIT + SUPERMASK)
    sb = {}  # the trained weights in pytorch-labs/superblock's layout, tile 4
    for k, v in load_ckpt(tmp_path)["model"].items():
        k = k.replace(".parametrizations.weight.original", ".weight").replace(".parametrizations.weight.0.", ".")
        sb[k] = v
        if k.endswith(".scores"):
            sb[k.replace(".scores", ".scale")], sb[k.replace(".scores", ".shift")] = torch.ones(1), torch.zeros(1)
    torch.save({"model": sb}, tmp_path / "superblock.pth")
    ev = ["--data-path", data_path, "--device", "cpu", "--workers", "0"] + TINY_VIT
    ev += ["--sparsity-linear", "0.5", "--sp-linear-tile-size", "8", "--weights-path", str(tmp_path / "superblock.pth")]
    with pytest.raises(RuntimeError) as e:
        evaluate_cli.run(ev)
    msg = str(e.value)
    assert "sparsity flags" in msg
    assert "As a SuperBlock checkpoint:" in msg and "tile size the checkpoint was trained with" in msg


BAD_FLAGS = [
    (["--nm", "2:4", "--sparsity-linear", "0.5"], "cannot be combined with Supermask"),
    (["--nm", "5:4"], "1 <= N < M"),
    (["--nm", "4:4"], "N == M keeps every weight"),
    (["--nm", "2-4"], "expected N:M"),
    (["--nm", "a:4"], "must be integers"),
    (["--mask-mode", "post"], "add --nm"),
    (["--nm", "2:4", "--keep-ratio", "0.5"], "only applies to --mask-mode unstructured"),
    (["--sparsity-linear", "1.0"], "must be in [0, 1)"),
    (["--sp-linear-tile-size", "0", "--sparsity-linear", "0.5"], "must be >= 1"),
    (["--mask-mode", "sideways", "--nm", "2:4"], "invalid choice"),
    (["--model-kwargs", "[1]"], "JSON object"),
]


@pytest.mark.parametrize("program", ["train", "evaluate"])
@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_give_clear_errors(program, flags, message, capsys, tmp_path):
    cli = train_cli if program == "train" else evaluate_cli
    with pytest.raises(SystemExit) as e:
        cli.main(["--data-path", str(tmp_path)] + flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_model_and_missing_split(data_path, tmp_path):
    with pytest.raises(ValueError, match="not a torchvision classification model"):
        train_cli.main(common(data_path) + ["--model", "resnet_nope"])
    with pytest.raises(FileNotFoundError, match="no train/ folder"):
        train_cli.main(common(str(tmp_path)) + TINY_VIT)


def test_module_entry_points_run():
    for mod in ("sparse_compile.training.train", "sparse_compile.training.evaluate"):
        r = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "--sparsity-linear" in r.stdout and "--nm" in r.stdout


# --------------------------------------------------------------------------- the references' recipe flags

# The SuperBlock seed's vit_b_16 command, scaled down: every recipe flag it uses (warm-up
# 1 of 2 epochs, so the EMA both follows the model and averages), EMA updated every step.
SEED_RECIPE = [
    "--opt", "adamw", "--lr", "0.003", "--wd", "0.3",
    "--lr-scheduler", "cosineannealinglr", "--lr-warmup-method", "linear", "--lr-warmup-epochs", "1",
    "--lr-warmup-decay", "0.033", "--amp", "--label-smoothing", "0.11", "--mixup-alpha", "0.2", "--auto-augment", "ra",
    "--clip-grad-norm", "1", "--ra-sampler", "--cutmix-alpha", "1.0", "--model-ema", "--model-ema-steps", "1",
]  # fmt: skip


def test_seed_recipe_runs_saves_ema_and_resumes_exactly(data_path, tmp_path, capsys, monkeypatch):
    full = tmp_path / "full"
    res = train_cli.run(common(data_path, full, epochs=2) + TINY_VIT + SUPERMASK + SEED_RECIPE)
    out = capsys.readouterr().out
    assert "Epoch: [1] [2/3]" in out  # RASampler: 24 images per epoch, 3 steps of 8
    ema_lines = re.findall(r"Test: EMA Acc@1 (\S+) Acc@5 (\S+)", out)
    assert len(ema_lines) == 2 and float(ema_lines[-1][0]) == pytest.approx(res["ema_acc1"], abs=1e-3)
    ckpt = load_ckpt(full)
    ema = ckpt["model_ema"]
    assert int(ema["n_averaged"]) == 3  # epoch 1: 3 updates after the warm-up reset
    assert {f"module.{k}" for k in ckpt["model"]} | {"n_averaged"} == set(ema)
    scores = [k for k in ckpt["model"] if k.endswith(".scores")]
    assert scores and any(not torch.equal(ema[f"module.{k}"], ckpt["model"][k]) for k in scores)

    # Killed after saving epoch 0, resumed: model and EMA end exactly as uninterrupted.
    part = tmp_path / "part"
    run_killed_after_first_save(monkeypatch, common(data_path, part, epochs=2) + TINY_VIT + SUPERMASK + SEED_RECIPE)
    resume = ["--resume", str(part / "checkpoint.pth")]
    train_cli.main(common(data_path, part, epochs=2) + TINY_VIT + SUPERMASK + SEED_RECIPE + resume)
    resumed = load_ckpt(part)
    assert resumed["epoch"] == 1
    assert_same_state(resumed["model"], ckpt["model"])
    assert_same_state(resumed["model_ema"], ckpt["model_ema"])


def test_ra_sampler_index_stream():
    from sparse_compile.training.distributed import RASampler

    n, reps, seed, epoch = 4, 3, 7, 2
    p = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    repeated = [p[0]] * 3 + [p[1]] * 3 + [p[2]] * 3 + [p[3]] * 3  # 12 = 6 per rank, no padding
    # Under 256 images the epoch is not rounded to 256: n // W indices per rank.
    expected = {
        (1, 0): repeated[:4],
        (2, 0): [repeated[0], repeated[2]],  # positions 0, 2 of the repeated stream
        (2, 1): [repeated[1], repeated[3]],  # positions 1, 3
    }
    for (world, rank), want in expected.items():
        s = RASampler(range(n), num_replicas=world, rank=rank, seed=seed, repetitions=reps)
        s.set_epoch(epoch)
        assert list(s) == want and len(s) == len(want)
    # Another epoch: the permutation of seed + epoch + 1, whatever the sampler saw before.
    s = RASampler(range(n), num_replicas=1, rank=0, seed=seed, repetitions=reps)
    s.set_epoch(epoch + 1)
    q = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch + 1)).tolist()
    assert list(s) == [q[0]] * 3 + [q[1]]

    # 800 images, 2 ranks: 800 // 256 * 256 = 768, 384 per rank; together the first 768
    # positions of the stream = the first 256 images of the permutation, 3 copies each, the
    # copies of an image split over the two ranks (positions 3i, 3i+1, 3i+2).
    n = 800
    p = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    shares = []
    for rank in (0, 1):
        s = RASampler(range(n), num_replicas=2, rank=rank, seed=seed, repetitions=reps)
        s.set_epoch(epoch)
        shares.append(list(s))
    assert [len(x) for x in shares] == [384, 384]
    merged = [i for pair in zip(*shares) for i in pair]
    assert merged == [i for i in p[:256] for _ in range(reps)]
    assert all(i in shares[0] and i in shares[1] for i in p[:256])


def test_transforms_are_v2_throughout_and_normalise_like_to_tensor():
    from torchvision.transforms import v2

    from sparse_compile.training import data

    pipelines = [
        data.train_transform(16, auto_augment=policy, random_erase=0.25) for policy in data.AUTO_AUGMENT_POLICIES
    ] + [data.train_transform(16, augment=False), data.val_transform(16)]
    for pipeline in pipelines:  # no v1 transform (ToTensor...) beside the v2 MixUp/CutMix
        assert isinstance(pipeline, v2.Compose)
        assert all(isinstance(t, v2.Transform) for t in pipeline.transforms), pipeline
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
    out = data.val_transform(16, resize_size=16)(Image.fromarray(pixels))  # resize and crop are identities here
    assert type(out) is torch.Tensor and out.dtype == torch.float32
    mean = torch.tensor(data.IMAGENET_MEAN, dtype=torch.float64)[:, None, None]
    std = torch.tensor(data.IMAGENET_STD, dtype=torch.float64)[:, None, None]
    want = (torch.from_numpy(pixels).double().permute(2, 0, 1) / 255.0 - mean) / std
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-6)


def test_mixup_cutmix_collate():
    from sparse_compile.training import data

    torch.manual_seed(0)
    batch = [(torch.rand(3, 8, 8), i % 5) for i in range(6)]
    assert data.mixup_cutmix_collate(5, 0.0, 0.0) is None  # the loader's default collate
    for mixup, cutmix in ((0.2, 0.0), (0.0, 1.0), (0.2, 1.0)):
        images, targets = data.mixup_cutmix_collate(5, mixup, cutmix)(batch)
        assert images.shape == (6, 3, 8, 8)
        assert targets.shape == (6, 5) and targets.is_floating_point()
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(6))
        loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(torch.randn(6, 5), targets)
        assert torch.isfinite(loss)


def test_ema_update_formula_and_adjusted_decay():
    from sparse_compile.training.ema import ExponentialMovingAverage, adjusted_decay

    # The recipe: 8 processes x 512 images, every 32 steps, 300 epochs.
    assert adjusted_decay(0.99998, 512, 8, 32, 300) == pytest.approx(1 - 2e-5 * 8 * 512 * 32 / 300, rel=1e-12)
    assert adjusted_decay(0.9, 512, 8, 32, 300) == 0.0  # capped: EMA = the model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).double()
    d = 0.75
    ema = ExponentialMovingAverage(model, d)
    snapshots = []
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(4, 3, dtype=torch.float64))  # training mode: BN running stats move
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        ema.update_parameters(model)
    s1, s2, s3 = snapshots
    for k in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var"):
        # Update 1 copies (n_averaged was 0); updates 2 and 3 average.
        want = d * (d * s1[k] + (1 - d) * s2[k]) + (1 - d) * s3[k]
        torch.testing.assert_close(ema.module.state_dict()[k], want, rtol=0, atol=1e-15)
    assert int(ema.module[1].num_batches_tracked) == 3  # integer buffer: copied, not averaged
    assert int(ema.n_averaged) == 3


def test_ema_of_supermask_model_keeps_its_own_masks():
    import torch.nn.utils.parametrize as P

    from sparse_compile.training import Supermask
    from sparse_compile.training.ema import ExponentialMovingAverage

    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8, bias=False).double()
    P.register_parametrization(lin, "weight", Supermask(lin.weight.shape, sparsity=0.5, tile_size=2).double())
    ema = ExponentialMovingAverage(lin, 0.5)
    with torch.no_grad():
        lin.parametrizations.weight[0].scores.neg_()  # the model's mask becomes the complement
        lin.parametrizations.weight.original.mul_(2)
    ema.update_parameters(lin)  # copies
    own = ema.module.parametrizations.weight
    assert own.original is not lin.parametrizations.weight.original
    assert own[0].scores is not lin.parametrizations.weight[0].scores
    with torch.no_grad():
        old_scores, old_w = own[0].scores.clone(), own.original.clone()
        lin.parametrizations.weight[0].scores.add_(torch.randn(4, 4, dtype=torch.float64))
        lin.parametrizations.weight.original.add_(1.0)
    ema.update_parameters(lin)
    scores = 0.5 * old_scores + 0.5 * lin.parametrizations.weight[0].scores.detach()
    torch.testing.assert_close(own[0].scores, scores)
    torch.testing.assert_close(own.original, 0.5 * old_w + 0.5 * lin.parametrizations.weight.original.detach())
    # The copy's weight is its averaged W times the mask of its averaged scores.
    with torch.no_grad():
        torch.testing.assert_close(ema.module.weight, own.original * own[0].mask())
        assert not torch.equal(own[0].mask(), lin.parametrizations.weight[0].mask())


RECIPE_BAD_FLAGS = [
    (["--mixup-alpha", "-0.1"], "must be >= 0"),
    (["--cutmix-alpha", "-1"], "must be >= 0"),
    (["--auto-augment", "rand"], "invalid choice"),
    (["--ra-reps", "0"], "--ra-reps 0: must be >= 1"),
    (["--model-ema-steps", "0"], "must be >= 1"),
    (["--model-ema-decay", "1.5"], "must be in [0, 1]"),
    (["--random-erase", "2"], "probability"),
    (["--ra-magnitude", "31"], "must be in [0, 30]"),
    (["--no-augment", "--auto-augment", "ra"], "contradicts"),
]


@pytest.mark.parametrize("flags,message", RECIPE_BAD_FLAGS, ids=[" ".join(f) for f, _ in RECIPE_BAD_FLAGS])
def test_recipe_bad_flags_give_clear_errors(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--data-path", str(tmp_path)] + flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def run_killed_after_first_save(monkeypatch, argv):
    """Runs train with ``argv`` and stops it right after its first checkpoint is written."""
    real_save = train_cli.D.save_on_main

    def save_then_die(obj, path):
        real_save(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cli.D, "save_on_main", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_cli.main(argv)
    monkeypatch.undo()
