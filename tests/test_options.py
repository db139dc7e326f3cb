"""Options of the sparse backend: defaults, validation, and the errors users see."""

import pytest
import torch

from sparse_compile.options import (
    CANDIDATE_BLOCKSIZES,
    DEFAULT_DENSITY_THRESHOLD,
    SparseOptions,
    inductor_config_for_mode,
)


def test_defaults():
    options = SparseOptions.from_user(None)
    assert options.blocksize == "auto"
    assert options.blocksizes == CANDIDATE_BLOCKSIZES
    assert options.density_threshold == DEFAULT_DENSITY_THRESHOLD == "auto"
    assert options.measured
    assert options.check_graph is True
    assert options.min_saving_ms == "auto"
    assert options.min_saving_ms_for("cpu") == 0.02 and options.min_saving_ms_for("cuda") == 0.005
    assert SparseOptions.from_user({"min_saving_ms": 0.1}).min_saving_ms_for("cuda") == 0.1


@pytest.mark.parametrize("threshold", [0, 0.4, 1])
def test_a_number_means_no_measuring(threshold):
    options = SparseOptions.from_user({"density_threshold": threshold})
    assert not options.measured and options.density_threshold == threshold


@pytest.mark.parametrize("blocksize", CANDIDATE_BLOCKSIZES)
def test_fixed_blocksize(blocksize):
    assert SparseOptions.from_user({"blocksize": blocksize}).blocksizes == (blocksize,)


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['block_size'\].*\['blocksize', 'density_threshold', 'formats', 'check_graph', 'min_saving_ms'\]"):
        SparseOptions.from_user({"block_size": 32})


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"blocksize": 24}, ValueError, "power of two"),
        ({"blocksize": 8}, ValueError, r"one of \[16, 32, 64, 128\]"),
        ({"blocksize": 256}, ValueError, "not supported"),
        ({"blocksize": "big"}, ValueError, "'auto'"),
        ({"blocksize": 32.0}, TypeError, "int or 'auto'"),
        ({"blocksize": True}, TypeError, "int or 'auto'"),
        ({"density_threshold": 1.5}, ValueError, r"outside \[0, 1\]"),
        ({"density_threshold": -0.1}, ValueError, r"outside \[0, 1\]"),
        ({"density_threshold": "0.3"}, ValueError, r"'auto' \(measure each layer\) or a number"),
        ({"density_threshold": None}, TypeError, "'auto' or a number"),
        ({"check_graph": "no"}, TypeError, "check_graph must be True or False"),
        ({"check_graph": 0}, TypeError, "check_graph must be True or False"),
        ({"min_saving_ms": -0.01}, ValueError, r"min_saving_ms=-0.01 must be a number of ms >= 0"),
        ({"min_saving_ms": "fast"}, TypeError, "min_saving_ms must be 'auto' or a number"),
        ({"min_saving_ms": float("inf")}, ValueError, "must be a number of ms"),
    ],
)
def test_bad_values(options, error, match):
    with pytest.raises(error, match=match):
        SparseOptions.from_user(options)


def test_options_must_be_a_dict():
    with pytest.raises(TypeError, match="dict"):
        SparseOptions.from_user([("blocksize", 32)])


def test_modes():
    assert inductor_config_for_mode(None) == {}
    assert inductor_config_for_mode("default") == {}
    assert inductor_config_for_mode("max-autotune") == torch._inductor.list_mode_options("max-autotune")
    with pytest.raises(ValueError, match="valid modes"):
        inductor_config_for_mode("fastest")


def test_bad_option_through_torch_compile():
    model = torch.nn.Linear(32, 32)
    compiled = torch.compile(model, backend="sparse", options={"blocksize": 24})
    with torch.no_grad(), pytest.raises(Exception, match="power of two"):
        compiled(torch.randn(4, 32))
