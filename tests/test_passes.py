"""The sparse-linear pass as Inductor sees it: its uuid() says its rewrite cannot be cached."""

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from sparse_compile.options import SparseOptions
from sparse_compile.passes import SparseLinearPass
from sparse_compile.passes.sparse_linear import chain_passes
from sparse_compile.report import GraphReport


class Cacheable(CustomGraphPass):
    def __init__(self, uuid):
        self._uuid = uuid

    def __call__(self, graph: torch.fx.Graph) -> None:
        pass

    def uuid(self):
        return self._uuid


def test_the_pass_is_never_cached():
    # Its rewrite depends on the weights' values and on timings, neither in Inductor's cache key.
    assert SparseLinearPass(SparseOptions(), GraphReport(graph_id=0)).uuid() is None


def test_a_chain_is_cacheable_only_when_every_pass_is():
    sparse = SparseLinearPass(SparseOptions(), GraphReport(graph_id=0))
    assert chain_passes(sparse, Cacheable("user")).uuid() is None
    assert chain_passes(Cacheable("a"), lambda graph: None).uuid() is None  # a plain callable has no uuid
    both = chain_passes(Cacheable("a"), Cacheable("b")).uuid()
    assert isinstance(both, str) and both != chain_passes(Cacheable("a"), Cacheable("c")).uuid()
    assert chain_passes(sparse, None) is sparse
