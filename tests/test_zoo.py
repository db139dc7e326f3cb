"""Smoke tests for benchmarks/zoo.py: a tiny stand-in model, a missing package, Conv1D pruning.

They say nothing about speed (the conftest timer decides for the sparse backend).
"""

import re

import pytest
import torch
from torch import nn

from benchmarks import zoo


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)), torch.randn(1, 10, 64)


@pytest.fixture
def tiny_zoo(monkeypatch):
    models = {
        "tiny": zoo.ZooModel("tiny", "torch", "two linears", tiny_model),
        "absent": zoo.ZooModel("absent", "no_such_package_here", "needs a package that is missing", tiny_model),
    }
    monkeypatch.setattr(zoo, "MODELS", models)
    return models


def test_rows_for_every_variant_and_a_missing_package(tiny_zoo, capsys, tmp_path):
    output = tmp_path / "zoo.md"
    argv = [
        "--device", "cpu", "--models", "tiny,absent", "--warmup", "0", "--reps", "2", "--output", str(output),
        "--batch", "3",
    ]
    from torch._dynamo.utils import counters

    counters.clear()
    assert zoo.main(argv) == 0
    text = capsys.readouterr().out
    if torch.backends.mkldnn.is_available():
        # The freezing row froze: Inductor packed its two linear weights for oneDNN/MKL (its compile
        # was its own, not the plain row's code reused for a second instance). The sparse backend's
        # whole-graph check compiled no plain graph: the conftest's rewritten graph (1 ms) is below
        # the two linears' dense floor (2 ms) by more than the margin.
        assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] == 2
    rows = [line for line in text.splitlines() if line.startswith(("tiny ", "absent "))]
    assert len(rows) == 2 * len(zoo.VARIANTS), text
    tiny = {re.split(r"\s{2,}", line)[1]: line for line in rows if line.startswith("tiny")}
    assert set(tiny) == set(zoo.VARIANTS), text
    assert all(line.rstrip().endswith("ok") for line in tiny.values()), text
    # 90% of 8 blocks of 32 pruned: both linears sparse enough for the conftest timer.
    assert "2/2" in tiny['backend="sparse"']
    assert "batch 3" in text and "vs freezing" in text
    assert all("no_such_package_here is not installed" in line for line in rows if line.startswith("absent"))
    written = output.read_text()
    assert "python -m benchmarks.zoo" in written and "Raw per-call times" in written


def test_model_input_sets_batch_and_tokens():
    ids = torch.randint(0, zoo.VOCAB, (1, 64))
    resized = zoo.model_input(ids, 2, 24)
    assert resized.shape == (2, 24) and resized.dtype == ids.dtype
    assert 0 <= int(resized.min()) and int(resized.max()) < zoo.VOCAB and resized.unique().numel() > 1
    assert zoo.model_input(ids, None, None) is ids
    assert zoo.model_input(ids, 3, None).shape == (3, 64)
    image = torch.randn(1, 3, 32, 32)
    assert zoo.model_input(image, 2, 24).shape == (2, 3, 32, 32)  # tokens: text models only


def test_issue_21_models_are_in_the_zoo():
    transformers = pytest.importorskip("transformers")
    for name, kind, linears in [("bert_tiny", transformers.BertModel, 12), ("gpt2_tiny", transformers.GPT2Model, 8)]:
        model, ids = zoo.MODELS[name].build()
        inner = model.model
        assert isinstance(inner, kind) and inner.config.hidden_size == 128 and inner.config.num_hidden_layers == 2
        assert zoo.prune_every_linear(model, 0.9, 32) >= linears


def test_conv1d_weights_are_pruned_too():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(96, 64)  # weight [in 64, out 96]
    torch.nn.init.normal_(conv.weight)
    model = nn.Sequential(conv, nn.Linear(96, 64))
    assert zoo.prune_every_linear(model, 0.5, 32) == 2
    blocks = conv.weight.detach().view(2, 32, 3, 32).ne(0).any(dim=(1, 3))
    assert blocks.sum() == 3  # round(0.5 * 6) of 6 blocks zeroed


@pytest.mark.parametrize("argv, message", [
    (["--models", "resnet9000"], "unknown model"),
    (["--density-threshold", "1.5"], "outside"),
    (["--sparsity", "0.8,0.9"], "one value"),
])
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        zoo.parse_args(["--device", "cpu", *argv])
    assert message in capsys.readouterr().err
