"""``train --compile``: the sparse backend in the train program, end to end on a tiny ImageFolder.

Every compiled run asserts that the masked path ran (the printed compile report, the pass's and
the op's counters), not only that training finished. A compile of the tiny ViT's training step
takes 30-100 s on this project's shared 2-core CPU: those tests are marked ``slow``, and each
compiles once.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

pytest.importorskip("torchvision")

from sparse_compile.training import train as train_cli  # noqa: E402

from test_cli import SEED_RECIPE, TINY_VIT, common, load_ckpt, make_image_folder  # noqa: E402

# 16x16 tiles: the smallest the masked op takes (passes/masked_linear.py, MIN_TILE_SIZE). The tiny
# ViT has 5 linears: in_proj (inside nn.MultiheadAttention, not masked without --attention-in-proj),
# out_proj 32x32, mlp.0 64x32, mlp.3 32x64 and the 3x32 head, so 4 run masked.
TILES16 = ["--sparsity-linear", "0.5", "--sp-linear-tile-size", "16"]
MASKED = 4
SUMMARY = re.compile(r"sparse backend, graph \d+: (\d+) of (\d+) linear layers run masked \(training graph\)")


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return str(make_image_folder(tmp_path_factory.mktemp("imagefolder")))


def assert_states_close(a: dict, b: dict, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


# --------------------------------------------------------------------------- flags (no compiling)


@pytest.mark.parametrize(
    "flags,backend",
    [(["--compile"], "sparse"), (["--compile", "--compile-backend", "inductor"], "inductor")],
)
def test_compile_flag_picks_the_backend_and_compiles_before_ddp(data_path, monkeypatch, capsys, flags, backend):
    # The flags' plumbing only: torch.compile is a spy that records what it was given and
    # compiles with the "eager" backend (no code generation). The real backend runs in the
    # slow tests below.
    seen = []
    real_compile = torch.compile

    def spy(model, *args, backend=None, **kwargs):
        seen.append((type(model).__name__, backend))
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", spy)
    res = train_cli.run(common(data_path) + TINY_VIT + TILES16 + flags)
    out = capsys.readouterr().out
    # The model itself, not a DDP wrapper (compile first, then wrap).
    assert seen == [("VisionTransformer", backend)]
    assert f"compile_backend='{backend}'" in out
    if backend == "inductor":
        assert "Compiled with --compile-backend inductor: every linear runs dense" in out
        assert res["masked_layers"] is None
    else:  # the spy compiled nothing with the sparse backend: the report says so, 0 masked
        assert "sparse backend: nothing compiled yet" in out
        assert res["masked_layers"] == 0


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--compile-backend", "inductor"], "--compile-backend inductor only applies with --compile"),
        (["--compile", "--compile-backend", "nope"], "--compile-backend nope: not available"),
    ],
)
def test_compile_backend_flag_errors_before_any_work(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--data-path", str(tmp_path / "nowhere")] + TINY_VIT + flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "inductor" in err


def test_missing_sparse_backend_is_an_error_not_a_dense_run(monkeypatch, capsys, tmp_path):
    import torch._dynamo.backends.registry as registry

    def missing(name):
        raise RuntimeError(f"no backend named {name!r}")

    monkeypatch.setattr(registry, "lookup_backend", missing)
    with pytest.raises(SystemExit):
        train_cli.main(["--data-path", str(tmp_path / "nowhere")] + TINY_VIT + ["--compile"])
    assert "--compile-backend sparse: not available" in capsys.readouterr().err


# --------------------------------------------------------------------------- the sparse backend for real

# The seed's recipe (test_cli.SEED_RECIPE: AdamW, warm-up, label smoothing, MixUp, CutMix,
# RandAugment, --clip-grad-norm, --ra-sampler, --model-ema every step) without --amp, which has
# its own test below.
RECIPE_FP32 = [flag for flag in SEED_RECIPE if flag != "--amp"]


def masked_summaries(out: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in SUMMARY.findall(out)]


@pytest.mark.slow
def test_seed_recipe_with_compile_trains_masked_like_eager(data_path, tmp_path, capsys, fresh_compiler):
    argv = common(data_path, tmp_path / "eager", epochs=2) + TINY_VIT + TILES16 + RECIPE_FP32
    eager = train_cli.run(argv)
    capsys.readouterr()

    counters.clear()
    argv = common(data_path, tmp_path / "compiled", epochs=2) + TINY_VIT + TILES16 + RECIPE_FP32
    res = train_cli.run(argv + ["--compile"])
    out = capsys.readouterr().out

    # The report, once, after the first step (before step 0's progress line), and what it says.
    assert masked_summaries(out) == [(MASKED, 5)], out[-3000:]
    assert out.index("linear layers run masked") < out.index("Epoch: [0] [0/3]")
    assert re.search(r"mlp\.0 +linear +64x32 +float32 +masked +tile kernel \(cpu\) +16", out), out[-3000:]
    assert res["masked_layers"] == MASKED
    # The rewrite happened once (one graph: no recompile over 2 epochs with evaluations between)
    # and the op ran at each of the 6 steps, forward and input gradient of every masked layer:
    # out_proj and the MLP keep half their tiles (the tile kernel); the head's 1x2 tiles at 50%
    # keep both (SuperBlock's rounding, k = 1 + round(0.5)), so the op computes it densely.
    assert counters["sparse_compile"]["masked_linear_rewrites"] == MASKED
    assert counters["sparse_compile"]["masked_mm_cpu_tiles"] == 2 * (MASKED - 1) * 6
    assert counters["sparse_compile"]["masked_mm_cpu_dense"] == 2 * 1 * 6

    # Same training as eager (weights, scores, EMA), and the checkpoint has the model's own keys.
    # atol 1e-4: AdamW turns rounding differences in near-zero gradients into steps of up to lr
    # (seen: 1.7e-5 on in_proj_bias); a wrong mask or gradient moves weights by ~lr per step.
    compiled, reference = load_ckpt(tmp_path / "compiled"), load_ckpt(tmp_path / "eager")
    assert not any("_orig_mod" in k for k in compiled["model"])
    assert_states_close(compiled["model"], reference["model"], rtol=1e-3, atol=1e-4)
    assert_states_close(compiled["model_ema"], reference["model_ema"], rtol=1e-3, atol=1e-4)
    # Evaluation scores the weights of each epoch (the plain model: the sparse backend's
    # inference graph would keep the first evaluation's weights).
    assert (res["acc1"], res["acc5"], res["ema_acc1"]) == (eager["acc1"], eager["acc5"], eager["ema_acc1"])
    assert res["loss"] == pytest.approx(eager["loss"], rel=1e-4)


@pytest.mark.slow
def test_seed_recipe_with_amp_and_compile_runs_masked(data_path, tmp_path, capsys, fresh_compiler):
    # The seed's command as written (with --amp: bf16 autocast) plus --compile.
    argv = common(data_path, tmp_path, epochs=2) + TINY_VIT + TILES16 + SEED_RECIPE
    eager = train_cli.run(argv)
    capsys.readouterr()
    counters.clear()
    res = train_cli.run(argv + ["--compile"])
    out = capsys.readouterr().out
    assert masked_summaries(out) == [(MASKED, 5)], out[-3000:]
    assert re.search(r"mlp\.0 +linear +64x32 +bfloat16 \(autocast, float32 weights\) +masked +tile kernel \(cpu\)", out)
    assert res["masked_layers"] == MASKED
    # As without --amp (see above): 6 steps, forward and input gradient of every masked layer.
    assert counters["sparse_compile"]["masked_linear_rewrites"] == MASKED
    assert counters["sparse_compile"]["masked_mm_cpu_tiles"] == 2 * (MASKED - 1) * 6
    assert counters["sparse_compile"]["masked_mm_cpu_dense"] == 2 * 1 * 6
    # Trains like eager autocast, within bf16 rounding (eager: 1.056 mean loss in epoch 1, from 1.099).
    assert res["loss"] == pytest.approx(eager["loss"], abs=0.02)
    assert load_ckpt(tmp_path)["epoch"] == 1


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_torchrun_compile_runs_masked_and_matches_one_eager_process(data_path, tmp_path):
    from test_ddp import acc_lines, free_port, model_state, run_argv

    # --no-augment: the images of a step are the same tensors however they are split (as in
    # test_ddp); the recipe flags that keep it so: RASampler, EMA every step, gradient clipping.
    recipe = ["--ra-sampler", "--model-ema", "--model-ema-steps", "1", "--clip-grad-norm", "1"]
    single = train_cli.run(run_argv(data_path, tmp_path / "single", batch_size=8) + TILES16 + recipe)

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"]
    cmd += ["--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "sparse_compile.training.train"]
    cmd += run_argv(data_path, tmp_path / "ddp", batch_size=4) + TILES16 + recipe + ["--compile"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # Rank 0 alone prints the report; compiled before the DDP wrapper, the linears run masked
    # (the other order graph-breaks in DDP's forward and masks none).
    assert masked_summaries(r.stdout) == [(MASKED, 5)], r.stdout[-3000:]
    assert "world_size=2" in r.stdout
    ddp = torch.load(tmp_path / "ddp" / "checkpoint.pth", map_location="cpu", weights_only=True)
    ref = torch.load(tmp_path / "single" / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert_states_close(model_state(tmp_path / "ddp"), model_state(tmp_path / "single"), rtol=1e-4, atol=1e-5)
    assert_states_close(ddp["model_ema"], ref["model_ema"], rtol=1e-4, atol=1e-5)
    assert acc_lines(r.stdout) == [f"Test:  Acc@1 {single['acc1']:.3f} Acc@5 {single['acc5']:.3f}"]


@pytest.mark.slow
def test_test_only_with_compile_evaluates_the_compiled_model_and_prints_its_report(
    data_path, tmp_path, capsys, fresh_compiler
):
    train_cli.run(common(data_path, tmp_path) + TINY_VIT + TILES16)
    resume = ["--resume", str(tmp_path / "checkpoint.pth"), "--test-only"]
    eager = train_cli.run(common(data_path) + TINY_VIT + TILES16 + resume)
    capsys.readouterr()
    res = train_cli.run(common(data_path) + TINY_VIT + TILES16 + resume + ["--compile"])
    out = capsys.readouterr().out
    # The weights do not change here: the sparse backend's inference graph (weights frozen, each
    # layer BSR or dense as measured) evaluates, and its report follows.
    assert re.search(r"sparse backend, graph \d+: \d+ of 5 linear layers run as BSR", out), out[-3000:]
    assert "(training graph)" not in out
    assert (res["acc1"], res["acc5"]) == (eager["acc1"], eager["acc5"])
