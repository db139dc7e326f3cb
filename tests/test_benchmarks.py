"""Smoke tests for the benchmarks: tiny CPU settings, a few seconds each.

They check that each benchmark runs end to end, prints every row and column, catches wrong
answers, and turns bad flags into argparse errors. They say nothing about speed.
"""

import pytest
import torch

from benchmarks import common, kernels, vit

CPU = ["--device", "cpu", "--warmup", "0", "--reps", "2"]
TINY_VIT = CPU + [
    "--model", "tiny", "--image-size", "32", "--patch-size", "16", "--num-layers", "1",
    "--hidden-dim", "64", "--mlp-dim", "128", "--num-heads", "2", "--batch-size", "2",
    "--sparsity", "0.75", "--blocksize", "32",
]
TINY_KERNELS = CPU + ["--shapes", "64x128", "--batch-size", "1", "--tokens", "40", "--sparsity", "0.5", "--blocksize", "32"]


def table_lines(text: str, first_column: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(first_column)]


def test_vit_prints_every_row_and_column(capsys, tmp_path):
    output = tmp_path / "result.md"
    assert vit.main(TINY_VIT + ["--output", str(output)]) == 0
    text = capsys.readouterr().out
    for header in vit.HEADERS:
        assert header in text
    for fact in ("device", "torch", "triton", "model", "sparsity", "block sizes", "fp32 matmul"):
        assert fact in text
    rows = {line.split("  ")[0]: line for line in text.splitlines() if "  " in line}
    for variant in ("dense eager", "dense torch.compile", "torch.sparse BSR (eager)", 'torch.compile backend="sparse"'):
        assert variant in rows, text
        assert rows[variant].rstrip().endswith("ok"), rows[variant]
    # One encoder block: attention in/out projections and two MLP linears, of 5 with the head.
    assert "4/5" in rows['torch.compile backend="sparse"']
    assert "4/5" in rows["torch.sparse BSR (eager)"]
    written = output.read_text()
    assert "python -m benchmarks.vit" in written and "Raw per-call times" in written
    assert 'torch.compile backend="sparse"' in written


def test_vit_model_output_is_not_trivially_zero():
    # torchvision zeroes the classifier head; a zero output would make every row "match".
    args = vit.parse_args(TINY_VIT)
    with torch.no_grad():
        out = vit.build_model(args)(torch.randn(2, 3, 32, 32))
    assert out.abs().min() > 0


def test_torch_sparse_path_matches_dense():
    args = vit.parse_args(TINY_VIT)
    model, names = vit.pruned_copy(vit.build_model(args), sparsity=0.75, blocksize=32)
    # The encoder block's attention in/out projections and two MLP linears; not the head.
    assert len(names) == 4 and not any(name.startswith("heads") for name in names)
    sparse_model, converted = vit.to_torch_sparse(model, blocksize=32)
    assert converted == 4
    layouts = {m.weight.layout for m in sparse_model.modules() if isinstance(m, vit.BsrLinear)}
    assert layouts == {torch.sparse_bsr}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(sparse_model(x), model(x), atol=1e-5, rtol=1e-5)


def test_kernels_prints_every_row_and_column(capsys):
    assert kernels.main(TINY_KERNELS) == 0
    text = capsys.readouterr().out
    for header in kernels.HEADERS:
        assert header in text
    lines = table_lines(text, "64x128")
    assert len(lines) == 3
    for line, variant in zip(lines, ["dense F.linear", "torch.sparse BSR", "sparse_compile bsr_linear"]):
        assert variant in line and line.rstrip().endswith("ok"), line


def test_a_path_that_cannot_run_gets_a_row_not_a_crash(capsys):
    # torch's CPU BSR matmul has no bf16 kernel.
    assert kernels.main(TINY_KERNELS + ["--dtype", "bf16"]) == 0
    lines = table_lines(capsys.readouterr().out, "64x128")
    assert "not run: NotImplementedError" in lines[1]
    assert lines[2].rstrip().endswith("ok")


def test_a_fast_wrong_answer_is_caught(capsys, monkeypatch):
    monkeypatch.setattr(kernels, "bsr_linear", lambda x, bsr, bias: torch.zeros(x.shape[0], bsr.out_features))
    assert kernels.main(TINY_KERNELS) == 1
    captured = capsys.readouterr()
    wrong = table_lines(captured.out, "64x128")[2]
    assert "WRONG" in wrong and "x" not in wrong.split()[8]  # no speedup shown for it
    assert "differs from dense" in captured.err


def test_list_flags_are_comma_separated_or_repeated():
    args = kernels.parse_args(CPU + ["--sparsity", "0.8", "--sparsity", "0.9,0.8", "--dtype", "bf16,float32"])
    assert args.sparsity == [0.8, 0.9]
    assert args.dtype == [torch.bfloat16, torch.float32]
    assert args.blocksize == kernels.DEFAULTS["cpu"]["blocksize"]


@pytest.mark.parametrize(
    "module, flags, message",
    [
        (vit, ["--sparsity", "1.5"], "outside [0, 1)"),
        (vit, ["--blocksize", "48"], "not supported"),
        (vit, ["--dtype", "float64"], "unknown dtype"),
        (vit, ["--model", "resnet50"], "invalid choice"),
        (vit, ["--model", "vit_b_16", "--num-layers", "2"], "applies to --model tiny only"),
        (vit, ["--image-size", "30"], "not a multiple of the patch size"),
        (vit, ["--batch-size", "0"], "positive integer"),
        (kernels, ["--shapes", "768x"], "KxN"),
        (kernels, ["--reps", "-1"], "positive integer"),
    ],
)
def test_bad_flags_are_argparse_errors(module, flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(CPU + flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_relative_error_is_scaled_by_the_output():
    ref = torch.tensor([10.0, -20.0])
    assert common.relative_error(ref + 0.2, ref) == pytest.approx(0.01, rel=1e-5)
    assert common.relative_error(torch.zeros(2), torch.zeros(2)) == 0.0


def test_gpu_defaults_are_the_seed_setting():
    # The GPU run itself is not tested here (no CUDA in CI); its defaults are.
    cuda = vit.DEFAULTS["cuda"]
    assert (cuda["model"], cuda["batch_size"], cuda["image_size"]) == ("vit_b_16", 256, 224)
    assert cuda["dtype"] == [torch.float32, torch.bfloat16]
    assert (cuda["sparsity"], cuda["blocksize"]) == ([0.8, 0.9], [32, 64])
    assert kernels.DEFAULTS["cuda"]["shapes"] == [(768, 3072), (3072, 768), (768, 2304), (768, 768)]
