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
    return torch.load(os.path.join(out, "checkpoint.pth"), map_location="cpu", weights_only=False)


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
    real_save = train_cli.D.save_on_main

    def save_then_die(obj, path):
        real_save(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cli.D, "save_on_main", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_cli.main(common(data_path, part, epochs=2) + TINY_VIT + SUPERMASK)
    monkeypatch.undo()
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


def test_evaluate_bsr_falls_back_or_compiles(data_path, tmp_path, capsys):
    tiles16 = ["--sparsity-linear", "0.5", "--sp-linear-tile-size", "16"]  # the backend takes blocks >= 16
    train_cli.main(common(data_path, tmp_path) + TINY_VIT + tiles16)
    ev = ["--data-path", data_path, "--device", "cpu", "--workers", "0"] + TINY_VIT + tiles16
    ev += ["--weights-path", str(tmp_path / "checkpoint.pth"), "--sparsify-weights"]
    dense = evaluate_cli.run(ev)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bsr = evaluate_cli.run(ev + ["--bsr", "16"])
    if not bsr["compiled"]:  # backend missing: a warning says the model ran dense
        assert any("DENSE" in str(w.message) for w in caught)
    assert bsr["acc1"] == pytest.approx(dense["acc1"])
    assert bsr["acc5"] == pytest.approx(dense["acc5"])


BAD_FLAGS = [
    (["--nm", "2:4", "--sparsity-linear", "0.5"], "cannot be combined with Supermask"),
    (["--nm", "5:4"], "1 <= N < M"),
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


def test_bsr_without_sparse_backend_falls_back_to_dense(monkeypatch):
    import torch._dynamo.backends.registry as registry

    def missing(name):
        raise RuntimeError(f"no backend named {name!r}")

    monkeypatch.setattr(registry, "lookup_backend", missing)
    model = torch.nn.Linear(4, 4)
    with pytest.warns(UserWarning, match="runs DENSE"):
        out, compiled = evaluate_cli.compile_sparse(model, 16)
    assert out is model and not compiled
