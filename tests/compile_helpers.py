"""Helpers the backend's test files share (imported by name: pytest puts tests/ on sys.path)."""

import copy

import torch


def compile_and_run(model, x, options=None):
    """``model`` compiled with ``backend="sparse"`` and ``options``, and its output on ``x`` (no grad)."""
    compiled = torch.compile(model, backend="sparse", options=options)
    with torch.no_grad():
        out = compiled(x)
    return compiled, out


def float64_reference(model, *inputs):
    """What a float64 copy of ``model`` returns on ``inputs`` in float64: the tests' independent reference."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(*(x.double() for x in inputs))
