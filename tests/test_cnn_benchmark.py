"""benchmarks.cnn at tiny settings: it runs end to end, the sparse row runs the 1x1 convolutions
as BSR and agrees with eager, and a row of ours that cannot run fails the run. Nothing here says
anything about speed: the round-robin timer is a stand-in (every call 1 ms)."""

import pytest
import torch

from benchmarks import cnn, common

TINY = [
    "--device", "cpu", "--model", "tiny", "--image-size", "32", "--batch-size", "2", "--train-batch-size", "4",
    "--sparsity", "0.75", "--blocksize", "16", "--warmup", "0", "--reps", "2",
]  # fmt: skip


def one_ms_per_call(fn, device):
    fn()
    return 1.0


@pytest.fixture(autouse=True)
def _stand_in_timer(monkeypatch):
    monkeypatch.setattr(common, "time_call_ms", one_ms_per_call)


def test_tiny_inference_runs_the_1x1_convs_as_bsr(capsys, tmp_path, monkeypatch):
    # The measured choice would keep the tiny convs dense on a loaded machine: a numeric threshold
    # makes the sparse path run whatever the timings, which is what this test is about.
    real_compile = torch.compile

    def compile_with_threshold(model, backend="inductor", options=None, **kwargs):
        if backend == "sparse":
            options = {"density_threshold": 0.6, "blocksize": 16}
        return real_compile(model, backend=backend, options=options, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_with_threshold)
    output = tmp_path / "cnn.md"
    assert cnn.main(TINY + ["--passes", "inference", "--no-dense", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("inference") and " / 16 " in line]
    assert len(rows) == 3, out
    sparse_row = next(line for line in rows if 'backend="sparse"' in line)
    assert " 5/5 " in sparse_row and sparse_row.rstrip().endswith("ok"), out  # all five 1x1 convs as BSR
    assert all(line.rstrip().endswith("ok") for line in rows), out
    assert out.strip().splitlines()[-1].startswith("targets: ")
    assert "python -m benchmarks.cnn" in output.read_text()


def test_a_row_of_ours_that_cannot_run_fails_the_run(capsys, monkeypatch):
    def fake_compile(model, backend="inductor", options=None, **kwargs):
        if backend == "sparse":
            def broken(*args):
                raise RuntimeError("sparse backend broke")

            return broken
        return model  # no compile: the other rows as eager, to keep the test fast

    monkeypatch.setattr(torch, "compile", fake_compile)
    assert cnn.main(TINY + ["--no-dense", "--output", ""]) == 1
    captured = capsys.readouterr()
    assert "a row of sparse_compile did not run: inference 75% / 16" in captured.err
    assert "a row of sparse_compile did not run: training 75% / 16" in captured.err


def test_a_training_row_with_wrong_gradients_fails_the_run(capsys, monkeypatch):
    # The reference is eager in float64: a "sparse" step whose gradients are off by a third
    # (its output scaled) must fail, while the eager and Inductor yardsticks (eager here) pass.
    class Scaled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x) * 1.5

    def fake_compile(model, backend="inductor", options=None, **kwargs):
        return Scaled(model) if backend == "sparse" else model

    monkeypatch.setattr(torch, "compile", fake_compile)
    assert cnn.main(TINY + ["--passes", "training", "--output", ""]) == 1
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("training") and " / 16 " in line]
    assert len(rows) == 3 and "WRONG" in rows[2] and rows[0].rstrip().endswith("ok"), out


def test_bad_flags_are_argparse_errors(capsys):
    with pytest.raises(SystemExit):
        cnn.parse_args(["--passes", "fly"])
    with pytest.raises(SystemExit):
        cnn.parse_args(["--dtype", "bfloat16"])


def test_the_bimask_rows_say_why_the_2_4_convs_stay_dense_on_cpu(capsys):
    # Bi-Mask 2:4 on every conv but the stem, finalized: on CPU no 2:4 convolution kernel (the 2:4
    # kernels are CUDA's) and no all-zero block for BSR, so the sparse row runs them as oneDNN
    # does, says why, and agrees with eager.
    assert cnn.main(TINY + ["--passes", "bimask", "--no-dense", "--output", ""]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("inference") and "Bi-Mask 2:4" in line]
    assert len(rows) == 3 and all(line.rstrip().endswith("ok") for line in rows), out
    sparse_row = next(line for line in rows if 'backend="sparse"' in line)
    assert "0/5 (dense: no_block_to_skip)" in sparse_row, out


def test_bimask_masks_every_conv_but_the_stem_2_4():
    model, masked = cnn.bimask_2_4(cnn.build_model("tiny"))
    convs = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert masked == len(convs) - 1  # the stem ("0") keeps its weights
    for name, conv in convs.items():
        if conv.kernel_size != (1, 1):
            continue
        # A 1x1 conv's weight is its [out, in] matrix: at most 2 nonzeros in every 4 inputs.
        nonzeros = (conv.weight.detach().reshape(conv.weight.shape[0], -1, 4) != 0).sum(-1)
        assert (nonzeros <= 2).all() and (nonzeros == 2).float().mean() > 0.99, name
    assert (convs["0"].weight != 0).all()  # the stem keeps every weight
