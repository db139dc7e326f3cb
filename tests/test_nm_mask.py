"""N:M / Bi-Mask: mask invariants, gradients against hand-written references, permutation search."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from sparse_compile.training import NMMask, finalize, post_step_projection
from sparse_compile.training.nm_mask import (
    _BiMaskConv2d,
    _BiMaskLinear,
    _top_n_pairwise,
    _top_n_pointwise,
    backward_kept_counts,
    bimask_backward_mask,
    inverse_permutation,
    nm_keep,
    nm_mask,
)

NM = [(1, 4), (2, 4), (2, 8), (4, 8), (1, 16)]


def rand_weight(*shape):
    """float64, never zero, distinct magnitudes (no ties)."""
    w = torch.rand(shape, dtype=torch.float64) + 0.1
    return w * torch.where(torch.rand(shape) < 0.5, -1.0, 1.0).double()


def param(layer, nm):
    parametrize.register_parametrization(layer, "weight", nm)
    return layer.parametrizations.weight.original


@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("shape", [(32, 48), (16, 4, 2, 2), (32, 2, 3, 8)])
def test_mask_invariants(n, m, shape):
    w = rand_weight(*shape)
    nm = NMMask(n, m, seed=1).double()
    nm.right_inverse(w)
    nm.search_permutation(w)
    mf, mb = nm.masks(w)
    out = shape[0]
    mf2, mb2 = mf.reshape(out, -1), mb.reshape(out, -1)
    k = mf2.shape[1]
    # Mf: exactly N per group of M consecutive (flattened) input entries, and they are the largest |W|
    groups = mf2.reshape(out, k // m, m)
    assert bool((groups.sum(-1) == n).all())
    aw = w.reshape(out, -1).abs().reshape(out, k // m, m)
    kept_min = torch.where(groups.bool(), aw, torch.inf).amin(-1)
    pruned_max = torch.where(groups.bool(), -torch.inf, aw).amax(-1)
    assert bool((kept_min > pruned_max).all())
    # Mb ⊆ Mf
    assert bool((mb2 <= mf2).all())
    # Mb is N:M along the output dim inside each permuted group: min(N, #Mf in group), the largest |W|
    perm = nm.perm
    gp_b = mb2[perm].reshape(out // m, m, k)
    gp_f = mf2[perm].reshape(out // m, m, k)
    assert bool((gp_b.sum(1) == gp_f.sum(1).clamp(max=n)).all())
    awp = (w.reshape(out, -1).abs() * mf2)[perm].reshape(out // m, m, k)
    kept_min = torch.where(gp_b.bool(), awp, torch.inf).amin(1)
    other_max = torch.where(gp_b.bool(), -torch.inf, awp).amax(1)
    assert bool((kept_min > other_max).all())


def reference_forward_mask(w2, n, m):
    """The reference's get_n_m_sparse_matrix: in each group of M, zero the M - N smallest |W| (argsort)."""
    rows, k = w2.shape
    g = w2.abs().reshape(rows, k // m, m)
    drop = torch.argsort(g, dim=-1)[..., : m - n]
    return torch.ones_like(g).scatter_(-1, drop, 0.0).reshape(rows, k)


def reference_backward_mask(w2, mf, perm, n, m):
    """The reference's get_n_m_backward_matrix, in [out, K] layout: permute the rows, zero the M - N
    smallest |W * Mf| of each group of M rows, intersect with Mf, scatter the rows back."""
    out, k = w2.shape
    g = (w2 * mf)[perm].abs().reshape(out // m, m, k)
    drop = torch.argsort(g, dim=1)[:, : m - n]
    mb_p = torch.ones_like(g).scatter_(1, drop, 0.0).reshape(out, k) * mf[perm]
    return torch.zeros_like(mb_p).index_copy_(0, perm, mb_p)


@pytest.mark.parametrize("n,m", NM + [(3, 8), (5, 16)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masks_are_the_references(n, m, dtype):
    # Comparisons instead of topk (issue 20): on weights without ties, the very masks of the
    # reference's argsort formulas, for every N:M and a random permutation.
    torch.manual_seed(n * 100 + m)
    out, k = 4 * m, 3 * m
    w = rand_weight(out, k).to(dtype)
    perm = torch.randperm(out)
    mf = nm_mask(w, n, m)
    assert mf.dtype == dtype and torch.equal(mf, reference_forward_mask(w, n, m))
    mb = bimask_backward_mask(w, mf, perm, n, m)
    assert torch.equal(mb, reference_backward_mask(w, mf, perm, n, m))
    assert torch.equal(inverse_permutation(perm), torch.argsort(perm))


@pytest.mark.parametrize("m", [2, 4, 8, 16])
@pytest.mark.parametrize("dim", [1, 2])
def test_top_n_ties_go_to_the_lower_index_in_both_evaluation_orders(m, dim):
    # Integer values in 0..2: mostly ties. Kept: the first n of a stable descending sort, in the
    # pairwise form (eager) and the pointwise form (torch.compile) alike.
    torch.manual_seed(m + dim)
    shape = [5, 7, 3]
    shape[dim] = m
    a = torch.randint(0, 3, shape).float()
    for n in range(1, m):
        first = torch.sort(-a, dim=dim, stable=True).indices.narrow(dim, 0, n)
        want = torch.zeros_like(a, dtype=torch.bool).scatter_(dim, first, True)
        assert torch.equal(_top_n_pairwise(a, n, dim), want), n
        assert torch.equal(_top_n_pairwise(a, n, dim, torch.int32), want), n  # torch.compile's counts
        assert torch.equal(_top_n_pointwise(a, n, dim), want), n


def test_compiled_masks_equal_eager():
    # Under torch.compile the masks take other evaluation orders (the forward mask pairwise with
    # int32 counts, the backward mask pointwise), fused by Inductor with their consumers (and the
    # search hook is not traced): the same bits as eager.
    torch._dynamo.reset()
    w = torch.randn(16, 24)
    nm = NMMask(2, 4, seed=0)
    nm.right_inverse(w)
    nm.search_permutation(w)

    def masks(w):
        mf, mb = nm.keep_masks(w)
        return mf, mb, torch.where(mb, w, 0.0)

    got = torch.compile(masks, backend="inductor", fullgraph=True)(w)
    for a, b in zip(got, masks(w)):
        assert torch.equal(a, b)
    torch._dynamo.reset()


@pytest.mark.parametrize("n,m", [(2, 4), (3, 8), (1, 16)])
def test_compiled_forward_mask_is_the_reference_and_keeps_ties_low(n, m):
    # Under torch.compile the forward mask takes the pairwise form with int32 counts (one loop over
    # the groups, a concat of the m slices): the reference's mask on float64 weights without ties
    # (topk keeps that very set), and the first n of a stable descending sort on ties.
    torch._dynamo.reset()
    torch.manual_seed(m)
    keep = torch.compile(nm_keep, backend="inductor", fullgraph=True, dynamic=False)
    w = rand_weight(3 * m, 5 * m)
    want = reference_forward_mask(w, n, m).bool()
    top = w.abs().reshape(3 * m, 5, m).topk(n, dim=-1).indices
    assert torch.equal(want, torch.zeros(3 * m, 5, m, dtype=torch.bool).scatter_(-1, top, True).reshape(3 * m, 5 * m))
    assert torch.equal(keep(w, n, m), want)
    ties = torch.randint(-2, 3, (3 * m, 5 * m)).double()  # |values| in 0..2: mostly ties
    first = torch.sort(-ties.abs().reshape(3 * m, 5, m), dim=-1, stable=True).indices[..., :n]
    want = torch.zeros(3 * m, 5, m, dtype=torch.bool).scatter_(-1, first, True).reshape(3 * m, 5 * m)
    assert torch.equal(keep(ties, n, m), want)
    torch._dynamo.reset()


def test_unstructured_and_target():
    w = rand_weight(20, 30)
    nm = NMMask(2, 4, mode="unstructured", keep_ratio=0.3)
    mf, _ = nm.masks(w)
    assert int(mf.sum()) == int(600 * 0.3) == 180
    assert w.abs()[mf.bool()].min() > w.abs()[~mf.bool()].max()
    assert nm.target_sparsity == pytest.approx(0.7)
    assert NMMask(1, 4).target_sparsity == pytest.approx(0.75)


@pytest.mark.parametrize("numel,ratio", [(512, 0.3), (600, 0.29), (100, 0.07), (48, 0.5), (3, 0.2)])
def test_unstructured_keeps_int_of_numel_times_ratio(numel, ratio):
    # The fork's get_topk_sparse_matrix keeps int(num_elements * ratio): 512 at 0.3 -> 153
    # (round would give 154), 600 at 0.29 -> int(173.99999999999997) = 173. At least one.
    w = rand_weight(numel, 1)
    mf = NMMask(2, 4, mode="unstructured", keep_ratio=ratio).forward_mask(w)
    want = max(1, int(numel * ratio))
    assert int(mf.sum()) == want
    order = w.abs().reshape(-1).argsort(descending=True)
    assert torch.equal(mf.reshape(-1)[order[:want]], torch.ones(want, dtype=w.dtype))


@pytest.mark.parametrize("n,m", [(4, 4), (3, 2), (0, 4)])
def test_n_equal_m_is_rejected_by_the_class_and_the_flag(n, m):
    from sparse_compile.training.cli_args import parse_nm

    with pytest.raises(ValueError, match=r"1 <= N < M"):
        NMMask(n, m)
    with pytest.raises(ValueError, match=r"1 <= N < M"):
        parse_nm(f"{n}:{m}")


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_bimask_linear_gradients(n, m):
    lam = 0.05
    lin = nn.Linear(16, 24).double()
    with torch.no_grad():
        lin.weight.copy_(rand_weight(24, 16))
    w = param(lin, NMMask(n, m, decay=lam, seed=3))
    nm = lin.parametrizations.weight[0]
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 5, 24, dtype=torch.float64)
    y = lin(x)  # training forward: searches the permutation first
    mf, mb = nm.masks(w)
    assert not torch.equal(mf, mb)  # the case tests something
    wd = w.detach()
    torch.testing.assert_close(y, x.detach() @ (wd * mf).T + lin.bias.detach())
    y.backward(dy)
    torch.testing.assert_close(x.grad, dy @ (wd * mb))
    dy2, x2 = dy.reshape(-1, 24), x.detach().reshape(-1, 16)
    torch.testing.assert_close(w.grad, dy2.T @ x2 + lam * (1 - mf) * wd)
    torch.testing.assert_close(lin.bias.grad, dy2.sum(0))


@pytest.mark.parametrize("per_sample", [False, True])
def test_decay_once_or_per_sample_as_the_references(per_sample):
    # The reference DeiT layer (MyConv2d_Lay), transcribed: W_t = W^T is [in, out]; the per-sample
    # gradient x_b^T g_b is [B, in, out]; the decay is added to it, broadcast over the batch;
    # autograd then sums the batch (the returned gradient is bigger than W_t). The CNN layer sums
    # first and adds the decay once. float64, batch 3.
    lam, batch = 2e-4, 3
    lin = nn.Linear(16, 24).double()
    with torch.no_grad():
        lin.weight.copy_(rand_weight(24, 16))
    w = param(lin, NMMask(2, 4, decay=lam, seed=3, decay_per_sample=per_sample))
    nm = lin.parametrizations.weight[0]
    x = torch.randn(batch, 5, 16, dtype=torch.float64)
    dy = torch.randn(batch, 5, 24, dtype=torch.float64)
    lin(x).backward(dy)
    mf, _ = nm.masks(w)
    wt, mft = w.detach().t(), mf.t()
    per_sample_grad = x.transpose(1, 2).matmul(dy)  # [B, in, out]
    if per_sample:  # DeiT: g_w_s = x^T g + decay (1 - mask) W_t, then summed over B by autograd
        want_t = (per_sample_grad + lam * (1 - mft) * wt).sum(0)
    else:  # CNN: .sum(0), then + decay (1 - mask) W_t
        want_t = per_sample_grad.sum(0) + lam * (1 - mft) * wt
    torch.testing.assert_close(w.grad, want_t.t(), rtol=0, atol=1e-12)
    # the two differ by (B - 1) λ (1 - Mf) W: up to 4.4e-4 here (|W| <= 1.1)
    other = (per_sample_grad.sum(0) + (lam if per_sample else batch * lam) * (1 - mft) * wt).t()
    sign = 1 if per_sample else -1
    torch.testing.assert_close(w.grad - other, sign * (batch - 1) * lam * (1 - mf) * w.detach(), rtol=0, atol=1e-12)
    assert (w.grad - other).abs().max() > 1e-4
    assert ("decay_per_sample=True" in repr(nm)) is per_sample


def test_decay_per_sample_on_2d_inputs_attention_and_convs():
    lam = 0.01
    torch.manual_seed(0)
    # a 2-D input is one matrix: decay once, as without the option
    lin, lin1 = nn.Linear(8, 8).double(), nn.Linear(8, 8).double()
    lin1.load_state_dict(lin.state_dict())
    w = param(lin, NMMask(2, 4, decay=lam, seed=1, decay_per_sample=True))
    w1 = param(lin1, NMMask(2, 4, decay=lam, seed=1))
    x = torch.randn(6, 8, dtype=torch.float64)
    lin(x).sum().backward()
    lin1(x).sum().backward()
    assert torch.equal(w.grad, w1.grad)
    # attention projections (in_proj and out_proj, batch-first or not): decay x batch
    for batch_first in (True, False):
        grads = []
        for per_sample in (False, True):
            torch.manual_seed(1)
            mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).double()
            param_in = NMMask(2, 4, decay=lam, seed=2, decay_per_sample=per_sample)
            parametrize.register_parametrization(mha, "in_proj_weight", param_in)
            parametrize.register_parametrization(mha.out_proj, "weight", NMMask(2, 4, decay=lam, seed=3, decay_per_sample=per_sample))
            torch.manual_seed(2)
            q = torch.randn(4, 5, 8, dtype=torch.float64)  # batch 4 (dim 0 or 1)
            mha(q, q, q, need_weights=False)[0].sum().backward()
            grads.append([
                (mha.parametrizations.in_proj_weight.original, param_in),
                (mha.out_proj.parametrizations.weight.original, mha.out_proj.parametrizations.weight[0]),
            ])
        batch = 4 if batch_first else 5
        for (w0, _), (w1_, nm1) in zip(*grads):
            mf = nm1.masks(w1_)[0]
            torch.testing.assert_close(w1_.grad - w0.grad, (batch - 1) * lam * (1 - mf) * w1_.detach())
    # a Conv2d adds it once (the reference CNN layer), with or without the option
    conv, conv1 = nn.Conv2d(4, 8, 3).double(), nn.Conv2d(4, 8, 3).double()
    conv1.load_state_dict(conv.state_dict())
    wc = param(conv, NMMask(2, 4, decay=lam, seed=1, decay_per_sample=True))
    wc1 = param(conv1, NMMask(2, 4, decay=lam, seed=1))
    xc = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    conv(xc).sum().backward()
    conv1(xc).sum().backward()
    assert torch.equal(wc.grad, wc1.grad)
    with pytest.raises(ValueError, match="decay_per_sample applies to mode 'bidirectional'"):
        NMMask(2, 4, mode="forward", decay_per_sample=True)


@pytest.mark.parametrize(
    "kw",
    [
        dict(stride=1, padding=1),
        dict(stride=2, padding=0, dilation=2),
        dict(stride=1, padding=1, groups=2),
        dict(stride=1, padding=2, padding_mode="circular"),
        dict(padding="same", dilation=(1, 2)),
        dict(padding="same", k=(2, 4)),  # odd total padding: the extra pixel goes right/bottom
        dict(padding="valid"),
    ],
)
def test_bimask_conv_gradients(kw):
    lam = 0.03
    kw = dict(kw)
    k = kw.pop("k", 3)
    conv = nn.Conv2d(8, 8, k, **kw).double()
    with torch.no_grad():
        conv.weight.copy_(rand_weight(*conv.weight.shape))
    w = param(conv, NMMask(2, 4, decay=lam, seed=5))
    nm = conv.parametrizations.weight[0]
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    mf, mb = nm.masks(w)
    assert not torch.equal(mf, mb)
    wd = w.detach()
    # hand-written reference: ordinary convs with the masked weights, differentiated by autograd
    xr = x.detach().clone().requires_grad_()
    wf = (wd * mf).requires_grad_()
    ref = nn.Conv2d(8, 8, k, bias=False, **kw).double()
    yf = ref._conv_forward(xr, wf, conv.bias.detach())
    torch.testing.assert_close(y, yf)
    (gw,) = torch.autograd.grad(yf, wf, dy)
    (gx,) = torch.autograd.grad(ref._conv_forward(xr, wd * mb, None), xr, dy)
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(w.grad, gw + lam * (1 - mf) * wd)
    torch.testing.assert_close(conv.bias.grad, dy.sum((0, 2, 3)))


def test_forward_mode_gradients():
    lam = 0.1
    lin = nn.Linear(16, 12).double()
    with torch.no_grad():
        lin.weight.copy_(rand_weight(12, 16))
    w = param(lin, NMMask(2, 4, mode="forward", decay=lam))
    mf = lin.parametrizations.weight[0].forward_mask(w)
    x = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(7, 12, dtype=torch.float64)
    lin(x).backward(dy)
    wd = w.detach()
    torch.testing.assert_close(x.grad, dy @ (wd * mf))
    torch.testing.assert_close(w.grad, dy.T @ x.detach() + lam * (1 - mf) * wd)


def test_gradcheck_input_paths():
    """Exact gradients where they are exact: forward mode w.r.t. x, and the Bi-Mask ops with Mb = Mf."""
    lin = nn.Linear(8, 4).double()
    with torch.no_grad():
        lin.weight.copy_(rand_weight(4, 8))
    param(lin, NMMask(2, 4, mode="forward", decay=0.0))
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lin, (x,))
    w = rand_weight(4, 8)
    mf = NMMask(2, 4).forward_mask(w)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: _BiMaskLinear.apply(x, w, mf, mf, b, 0.0), (x, b))
    wc = rand_weight(4, 2, 2, 2)
    mfc = NMMask(2, 4).forward_mask(wc)
    xc = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    bc = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, b: _BiMaskConv2d.apply(x, wc, mfc, mfc, b, (2, 1), (1, 0), (1, 1), 1, 0.0), (xc, bc)
    )


def test_post_mode_projection():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    for i in (0, 2):
        param(model[i], NMMask(2, 4, mode="post"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    post_step_projection(model)
    for i in (0, 2):
        orig = model[i].parametrizations.weight.original
        assert int((orig != 0).sum()) == orig.numel() // 2
        assert torch.equal(model[i].weight, orig)


def test_permutation_search_beats_identity():
    # 1:2 on a 4x2 weight: rows 0,1 keep column 0, rows 2,3 keep column 1. Identity groups
    # rows {0,1} and {2,3}: one survivor per (group, column) pair that has any -> 2; grouping
    # {0,2},{1,3} (or {0,3},{1,2}) keeps all 4.
    w = torch.tensor([[3.0, 1.0], [3.0, 1.0], [1.0, 3.0], [1.0, 3.0]], dtype=torch.float64)
    nm = NMMask(1, 2, perm_candidates=20, seed=0).double()
    nm.right_inverse(w)
    assert int(nm.masks(w)[1].sum()) == 2  # identity
    counts = nm.search_permutation(w)
    assert int(counts[1]) == 2  # candidate 1 is the identity
    assert int(counts.max()) == 4
    assert int(nm.masks(w)[1].sum()) == 4
    assert not torch.equal(nm.perm, torch.arange(4))


def test_permutation_search_never_worse_than_identity():
    torch.manual_seed(1)
    for _ in range(5):
        w = rand_weight(16, 16)
        nm = NMMask(2, 4, perm_candidates=10).double()
        nm.right_inverse(w)
        ident = int(nm.masks(w)[1].sum())
        counts = nm.search_permutation(w)
        after = int(nm.masks(w)[1].sum())
        assert after == int(counts.max()) >= ident
        # the count formula agrees with the mask it describes
        nz = (w * nm.forward_mask(w)) != 0
        assert int(backward_kept_counts(nz, nm.perm[None], 2, 4)[0]) == after


def test_search_schedule_and_eval_forward():
    lin = nn.Linear(8, 8)
    param(lin, NMMask(2, 4, perm_every=3, perm_candidates=2))
    nm = lin.parametrizations.weight[0]
    assert nm._searches == 1  # at registration
    for _ in range(7):
        lin(torch.randn(2, 8)).sum().backward()
    assert nm._calls == 7 and nm._searches == 3  # after backward 3 and 6
    lin.eval()
    lin(torch.randn(2, 8))
    with torch.no_grad():
        lin.train()
        y = lin(torch.randn(2, 8))
    assert nm._calls == 7
    assert type(lin).forward is not nn.Linear.forward and y.shape == (2, 8)
    # a deep copy (tensor hooks are not copied) counts on its own weight, the original is unaffected
    cp = copy.deepcopy(lin)
    for _ in range(3):
        cp(torch.randn(2, 8)).sum().backward()
    assert cp.parametrizations.weight[0]._calls == 10 and nm._calls == 7
    # after finalize the hook left on the weight is inert
    finalize(lin)
    lin(torch.randn(2, 8)).sum().backward()
    assert nm._calls == 7 and type(lin) is nn.Linear


@pytest.mark.parametrize("loop", ["optimizer", "manual update"])
def test_search_uses_the_weights_of_forwards_0_I_2I(loop):
    # The reference searches at forwards 0, I, 2I, ... on the weights that forward uses. dW
    # does not depend on the permutation (only dx does), so the weights follow one trajectory.
    every = 3
    lin = nn.Linear(16, 8).double()
    nm = NMMask(2, 4, perm_every=every, perm_candidates=3)
    searched = []
    real_search = nm.search_permutation

    def recording_search(weight):
        searched.append(weight.detach().clone())
        return real_search(weight)

    nm.search_permutation = recording_search
    param(lin, nm)
    original = lin.parametrizations.weight.original
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    other = nn.Linear(2, 2)  # another optimizer stepping first must not trigger the search early
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    seen = []  # weights of each forward
    for step in range(2 * every + 2):
        seen.append(original.detach().clone())
        opt.zero_grad()
        lin(torch.randn(4, 16, dtype=torch.float64)).square().sum().backward()
        other(torch.randn(1, 2)).sum().backward()
        other_opt.step()
        if loop == "optimizer":
            opt.step()
        else:
            with torch.no_grad():
                for p in lin.parameters():
                    p -= 0.5 * p.grad
    seen.append(original.detach().clone())
    # registration, then after step 3 and 6: at the optimizer step, or without one at the next forward
    assert len(searched) == 3
    for got, want in zip(searched, [seen[0], seen[every], seen[2 * every]]):
        assert torch.equal(got, want)
    assert not torch.equal(seen[every], seen[every - 1])  # the weights did move between steps


def test_bimask_on_weight_requires_linear_or_conv_weight():
    # (a plain attention's in_proj_weight is supported since issue 14: tests/test_in_proj.py)
    mha = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    with pytest.warns(UserWarning, match="forward-mode gradients"):
        parametrize.register_parametrization(mha, "in_proj_weight", NMMask(2, 4))
    x = torch.randn(3, 1, 8)
    mha(x, x, x)[0].sum().backward()  # works, with dx through W * Mf
    # forward mode is fine on any 2-D tensor, silently
    mha2 = nn.MultiheadAttention(8, 2)
    parametrize.register_parametrization(mha2, "in_proj_weight", NMMask(2, 4, mode="forward"))


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((3, 2), {}, "1 <= N < M"),
        ((4, 4), {}, "N == M keeps every weight"),
        ((2.0, 4), {}, "N must be an integer"),
        ((2, 4), {"mode": "m2"}, "unknown NMMask mode"),
        ((2, 4), {"keep_ratio": 0.5}, "keep_ratio only applies"),
        ((2, 4), {"mode": "unstructured", "keep_ratio": 0.0}, "keep_ratio must be"),
        ((2, 4), {"perm_every": 0}, "perm_every"),
        ((2, 4), {"decay": -1.0}, "decay"),
    ],
)
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        NMMask(*args, **kwargs)


def test_shape_errors_name_the_fix():
    with pytest.raises(ValueError, match="not divisible by M=4.*leave this layer dense"):
        parametrize.register_parametrization(nn.Linear(10, 8), "weight", NMMask(2, 4))
    with pytest.raises(ValueError, match="output dim.*mode='forward'"):
        parametrize.register_parametrization(nn.Linear(8, 10), "weight", NMMask(2, 4))
    parametrize.register_parametrization(nn.Linear(8, 10), "weight", NMMask(2, 4, mode="forward"))


def test_float32_and_no_grad_path():
    lin = nn.Linear(16, 8)
    param(lin, NMMask(2, 4))
    x = torch.randn(4, 16)
    y = lin(x)
    with torch.no_grad():
        y0 = lin(x)
    torch.testing.assert_close(y, y0)
    torch.testing.assert_close(y0, F.linear(x, lin.weight, lin.bias))


def test_bimask_under_autocast():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 25, 8))
    for i in (0, 3):
        param(model[i], NMMask(2, 4))
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    for i in (0, 3):
        g = model[i].parametrizations.weight.original.grad
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
