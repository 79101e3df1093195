"""TT / TR logits at inference: the prefix products kept between no-grad calls, the path
chosen by batch size, equality with the dense product at odd shapes."""
import pytest
import torch

from compemb.tr import TREmbedding
from compemb.tt import TTEmbedding
from compemb.tt import math as ttm


def _layer(cls, seed=0):
    torch.manual_seed(seed)
    rank = [3, 5] if cls is TTEmbedding else [2, 3, 4]
    return cls(301, 30, rank, shape=((7, 6, 8), (3, 2, 5)), padding_idx=5).double().eval()


@pytest.mark.parametrize("cls", [TTEmbedding, TREmbedding])
@pytest.mark.parametrize("batch", [1, 3, 8, 9, 1024])
def test_no_grad_logits_equal_the_dense_product(cls, batch):
    layer = _layer(cls)
    hidden = torch.randn(batch, 30, dtype=torch.float64)
    with torch.no_grad():
        expected = hidden @ layer.materialize().T
        out = layer.logits(hidden)
        again = layer.logits(hidden)  # from the kept prefixes
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(again, expected, rtol=1e-10, atol=1e-10)
    assert (out[:, 5] == 0).all()
    # with autograd the same numbers, and nothing kept is used
    hidden.requires_grad_(True)
    grad_out = layer.logits(hidden)
    torch.testing.assert_close(grad_out, expected, rtol=1e-10, atol=1e-10)
    grad_out.sum().backward()
    assert all(c.grad is not None for c in layer.cores)


@pytest.mark.parametrize("cls", [TTEmbedding, TREmbedding])
@pytest.mark.parametrize("chunk", [1, 37, 6 * 30, 10**6])
def test_table_built_in_chunks_equals_the_dense_product(cls, chunk, monkeypatch):
    """The large-batch inference path builds the table a chunk of prefixes at a time (one row
    block, several, a last block cut at V=301 of 336, the whole table at once) and writes each
    block's products into its columns; float32 output from float64 cores when asked."""
    monkeypatch.setattr(ttm, "TABLE_CHUNK", chunk)
    layer = _layer(cls)
    cores = [c.detach() for c in layer.cores]
    table = ttm.full_table(cores, 301)
    for b in (0, 1, 7, 300):
        h = torch.randn(b, 30, dtype=torch.float64)
        out = ttm.logits_through_table(cores, h, 301)
        assert out.shape == (b, 301) and out.is_contiguous()
        torch.testing.assert_close(out, h @ table.T, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            ttm.logits_through_table(cores, h, 301, prefix=ttm.logits_prefix(cores),
                                     dtype=torch.float32), (h @ table.T).float())
    with torch.no_grad():  # the layer takes this path for a large batch, padding column zero
        h = torch.randn(2000, 30, dtype=torch.float64)
        out = layer.logits(h)
    torch.testing.assert_close(out, h @ layer.materialize().T, rtol=1e-10, atol=1e-10)
    assert (out[:, 5] == 0).all()


@pytest.mark.parametrize("cls", [TTEmbedding, TREmbedding])
def test_kept_prefixes_follow_changed_cores(cls):
    layer = _layer(cls)
    hidden = torch.randn(2, 30, dtype=torch.float64)
    with torch.no_grad():
        layer.logits(hidden)
        first = layer._prefix_cache[1]
        layer.logits(hidden)
        assert layer._prefix_cache[1] is first
        layer.cores[1].mul_(2)  # in place
        torch.testing.assert_close(layer.logits(hidden), hidden @ layer.materialize().T)
        other = _layer(cls, seed=1)
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer.logits(hidden), hidden @ other.materialize().T)
        layer.cores[0] = torch.nn.Parameter(layer.cores[0] + 1)  # replaced
        torch.testing.assert_close(layer.logits(hidden), hidden @ layer.materialize().T)
    assert "_prefix_cache" not in str(list(layer.state_dict()))


def test_through_cores_with_a_given_prefix_and_batched_gemm():
    layer = _layer(TTEmbedding)
    cores = [c.detach() for c in layer.cores]
    prefix = ttm.logits_prefix(cores)
    for b in (1, 5):
        h = torch.randn(b, 30, dtype=torch.float64)
        ref = h @ ttm.full_table(cores, 301).T
        torch.testing.assert_close(ttm.logits_through_cores(cores, h, 301, prefix=prefix), ref)
        torch.testing.assert_close(ttm.logits_through_cores(cores, h, 301), ref)
    torch.testing.assert_close(ttm.full_table(cores, 301, prefix=prefix), ttm.full_table(cores, 301))


def test_path_choice_at_decode_and_at_large_batches(monkeypatch):
    """At inference, a few hidden states go through the cores, a large batch builds the
    table (SmolLM's head: 49152 x 576 at rank 64)."""
    layer = TTEmbedding(49152, 576, 64, shape=((32, 32, 48), (8, 8, 9)))
    calls = []
    monkeypatch.setattr(type(layer), "_logits_through_cores",
                        lambda self, flat, cached=False: calls.append(("through", cached))
                        or torch.zeros(flat.shape[0], 49152))
    monkeypatch.setattr(type(layer), "_logits_through_table",
                        lambda self, flat: calls.append(("table", True))
                        or torch.zeros(flat.shape[0], 49152))
    with torch.no_grad():
        for b in (1, 8, 1024):
            layer.logits(torch.zeros(b, 576))
    assert calls == [("through", True), ("through", True), ("table", True)]
    dense, through = ttm.logits_costs(layer.shape, layer.ranks, 1, cached_prefix=True)
    assert through < 0.5 * ttm.logits_costs(layer.shape, layer.ranks, 1)[1]


@pytest.mark.parametrize("cls", [TTEmbedding, TREmbedding])
@pytest.mark.parametrize("n", [1, 7, 64, 65, 300])
def test_no_grad_lookup_equals_the_table(cls, n):
    """A few ids at inference come from the kept prefixes, more through the prefix tree;
    both give the table's rows (padding row zero), and with autograd the tree is used."""
    layer = _layer(cls)
    ids = torch.randint(301, (n,), generator=torch.Generator().manual_seed(n))
    ids[0] = 5  # the padding row
    ids[-1] = 300
    table = layer.materialize()
    with torch.no_grad():
        torch.testing.assert_close(layer(ids), table[ids], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer(ids.view(1, -1)), table[ids].view(1, n, 30),
                                   rtol=1e-12, atol=1e-12)
    assert (layer._prefix_cache is not None) if n <= 64 else True
    out = layer(ids)
    torch.testing.assert_close(out, table[ids], rtol=1e-12, atol=1e-12)
    out.sum().backward()
    assert layer.cores[0].grad is not None


def test_rows_from_prefix():
    layer = _layer(TREmbedding)
    cores = [c.detach() for c in layer.cores]
    ids = torch.tensor([300, 0, 47, 47])
    rows = ttm.rows_from_prefix(cores, ttm.logits_prefix(cores), ids)
    torch.testing.assert_close(rows, ttm.full_table(cores, 301)[ids])


@pytest.mark.parametrize("cls", [TTEmbedding, TREmbedding])
@pytest.mark.parametrize("shape, order", [
    (((6, 7, 8), (5, 3, 2)), "hidden first"),  # last core of many rows: hidden first
    (((8, 8, 5), (2, 3, 7)), "last core first"),  # few rows, wide columns: last core first
])
def test_both_contraction_orders_equal_the_table(cls, shape, order, monkeypatch):
    """Both orders of the contraction (picked by multiply-adds), in chunks of hidden states
    too, give the dense product, with and without kept prefixes, with gradients."""
    rows, cols = shape
    rank = [3, 5] if cls is TTEmbedding else [2, 3, 4]
    torch.manual_seed(1)
    layer = cls(301, cols[0] * cols[1] * cols[2], rank, shape=shape).double()
    cores = [c.detach() for c in layer.cores]
    last_first, hidden_first = ttm._through_costs(shape, layer.ranks)
    assert (hidden_first <= last_first) == (order == "hidden first")
    table = ttm.full_table(cores, 301)
    prefix = ttm.logits_prefix(cores)
    # a chunk of 2 hidden states for the hidden-first order: 5 states run as 2 + 2 + 1
    monkeypatch.setattr(ttm, "HIDDEN_FIRST_CHUNK", 2 * prefix.shape[0] * prefix.shape[2] * cols[-1])
    for b in (0, 1, 5):
        h = torch.randn(b, table.shape[1], dtype=torch.float64)
        torch.testing.assert_close(ttm.logits_through_cores(cores, h, 301, prefix=prefix), h @ table.T)
        torch.testing.assert_close(ttm.logits_through_cores(cores, h, 301), h @ table.T)
    h = torch.randn(5, table.shape[1], dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 301, dtype=torch.float64)
    (ttm.logits_through_cores(layer.cores, h, 301) * g).sum().backward()
    ref_h = h.detach().clone().requires_grad_(True)
    ref_cores = [c.detach().clone().requires_grad_(True) for c in layer.cores]
    (ref_h @ ttm.full_table(ref_cores, 301).T * g).sum().backward()
    torch.testing.assert_close(h.grad, ref_h.grad)
    for c, r in zip(layer.cores, ref_cores):
        torch.testing.assert_close(c.grad, r.grad)


def test_smollm_head_contracts_hidden_first():
    """SmolLM2's head (49152 x 576 at rank 64): the hidden-first order costs a third of the
    other's multiply-adds (2.3 against 7.2 times the dense product's)."""
    shape, ranks = ((32, 32, 48), (8, 8, 9)), (1, 64, 64, 1)
    last_first, hidden_first = ttm._through_costs(shape, ranks)
    dense = 49152 * 576
    assert hidden_first / dense == pytest.approx(2.33, abs=0.01)
    assert last_first / dense == pytest.approx(7.17, abs=0.01)
