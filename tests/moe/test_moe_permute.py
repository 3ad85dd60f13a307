"""Gather-only dispatch / combine / permute against plain indexing + index_add_ (values and float64
gradcheck), with and without dropped slots."""
import pytest
import torch

from linear_moe.moe.dispatch import sort_by_expert
from linear_moe.moe.permute import combine, dispatch, gather_sum, inverse_order, permute


def _routing(n_tok, k, e, capacity, gen):
    idx = torch.rand(n_tok, e, generator=gen).topk(k, dim=-1).indices
    order, counts, _ = sort_by_expert(idx, e, capacity)
    return idx, order, counts, inverse_order(order, n_tok * k).view(n_tok, k)


@pytest.mark.parametrize("capacity", [None, 2])
def test_inverse_order_maps_slots_to_rows(capacity):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**30, ())))
    _, order, _, inv = _routing(7, 3, 5, capacity, gen)
    n = order.numel()
    inv = inv.reshape(-1)
    assert torch.equal(inv[order], torch.arange(n))
    absent = torch.ones(21, dtype=torch.bool)
    absent[order] = False
    assert torch.equal(inv[absent], torch.full((int(absent.sum()),), n))
    assert (n < 21) == (capacity is not None)


@pytest.mark.parametrize("capacity", [None, 2])
def test_dispatch_and_combine_match_indexing(capacity):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**30, ())))
    n_tok, k, e, c = 9, 3, 4, 5
    _, order, _, inv = _routing(n_tok, k, e, capacity, gen)
    token = order // k
    x = torch.randn(n_tok, c, dtype=torch.float64, requires_grad=True)
    xs = dispatch(x, token, inv)
    assert torch.equal(xs, x[token])
    g = torch.randn_like(xs)
    (gx,) = torch.autograd.grad(xs, x, g)
    torch.testing.assert_close(gx, torch.zeros_like(x).index_add_(0, token, g))

    y = torch.randn(order.numel(), c, dtype=torch.float64, requires_grad=True)
    w = torch.rand(n_tok, k, dtype=torch.float64, requires_grad=True)
    for weight in (None, w):
        out = combine(y, token, inv, weight)
        ws = torch.ones(order.numel(), dtype=torch.float64) if weight is None else weight.reshape(-1)[order]
        want = torch.zeros(n_tok, c, dtype=torch.float64).index_add(0, token, y * ws[:, None])
        torch.testing.assert_close(out, want)
        go = torch.randn_like(out)
        inputs = (y,) if weight is None else (y, w)
        got = torch.autograd.grad(out, inputs, go)
        ref = torch.autograd.grad(want, inputs, go)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("capacity", [None, 1])
def test_gradcheck_float64(capacity):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**30, ())))
    n_tok, k, e, c = 5, 2, 3, 3
    _, order, _, inv = _routing(n_tok, k, e, capacity, gen)
    token = order // k
    x = torch.randn(n_tok, c, dtype=torch.float64, requires_grad=True)
    y = torch.randn(order.numel(), c, dtype=torch.float64, requires_grad=True)
    w = torch.rand(n_tok, k, dtype=torch.float64, requires_grad=True)
    v = torch.randn(n_tok * k, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dispatch(t, token, inv), (x,))
    assert torch.autograd.gradcheck(lambda t: combine(t, token, inv), (y,))
    assert torch.autograd.gradcheck(lambda t, s: combine(t, token, inv, s), (y, w))
    assert torch.autograd.gradcheck(lambda t: permute(t, order, inv.reshape(-1)), (v,))
    # dispatch and combine are adjoint: <dispatch(x), y> == <x, combine(y)>
    torch.testing.assert_close((dispatch(x, token, inv) * y).sum(), (x * combine(y, token, inv)).sum())


def test_gather_sum_reads_zero_past_the_end():
    src = torch.randn(4, 3)
    index = torch.tensor([[0, 4], [4, 4], [3, 1]])
    w = torch.rand(3, 2)
    want = torch.stack([src[0] * w[0, 0], torch.zeros(3), src[3] * w[2, 0] + src[1] * w[2, 1]])
    torch.testing.assert_close(gather_sum(src, index, w), want)
    torch.testing.assert_close(gather_sum(src, index), torch.stack([src[0], torch.zeros(3), src[3] + src[1]]))
