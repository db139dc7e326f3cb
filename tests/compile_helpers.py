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


class TileKernelCalls:
    """Calls of the CPU tile kernel's op (``sparse_compile::tile_linear``, what a converted layer of
    a compiled CPU graph calls) since this object was made: ``len(calls)``. The op is C++, called
    from Inductor's code without Python, so its own counter is read."""

    def __init__(self):
        from sparse_compile.kernels import cpu_tile_mm

        self._calls = cpu_tile_mm.tile_linear_calls
        self._start = self._calls()

    def __len__(self):
        return self._calls() - self._start


def cpu_bsr_op_name() -> str:
    """The op a converted BSR layer calls on CPU, as Inductor's code names it: the tile kernel's C++
    ``tile_linear``, or ``bsr_linear`` (gathered matmuls) where no compiler can build the kernel."""
    from sparse_compile.kernels import cpu_tile_mm

    return "sparse_compile.tile_linear" if cpu_tile_mm.unavailable_reason() is None else "sparse_compile.bsr_linear"
