"""Tensor-Ring embedding (compemb.tr): what differs from the train. The shared layer
contract (lookups, gradients, logits, padding, round trips, autocast) is tested for both
forms in test_tt.py."""
from __future__ import annotations

import math

import pytest
import torch

import compemb.tt.math as ttm
from compemb.plan import plan
from compemb.registry import get_method
from compemb.tr import TRConfig, TREmbedding
from compemb.tt import TTEmbedding


def test_element_is_trace_of_the_ring_product():
    torch.manual_seed(0)
    layer = TREmbedding(60, 24, [2, 3, 4], shape=((3, 4, 5), (2, 3, 4))).double()
    assert layer.ranks == (2, 3, 4, 2)
    assert [tuple(c.shape) for c in layer.cores] == [(2, 3, 2, 3), (3, 4, 3, 4), (4, 5, 4, 2)]
    table = layer.materialize()
    for i, j in [(0, 0), (59, 23), (17, 11), (42, 5)]:
        di = [i // 20, (i // 5) % 4, i % 5]
        dj = [j % 2, (j // 2) % 3, j // 6]
        prod = torch.eye(2, dtype=torch.float64)
        for k, core in enumerate(layer.cores):
            prod = prod @ core[:, di[k], dj[k], :]
        assert abs(prod.trace().item() - table[i, j].item()) < 1e-12


def test_ring_with_r0_one_is_the_train():
    torch.manual_seed(0)
    ring = TREmbedding(100, 16, [1, 3, 4], shape=((5, 5, 4), (2, 2, 4))).double()
    train = TTEmbedding(100, 16, [3, 4], shape=((5, 5, 4), (2, 2, 4))).double()
    train.load_state_dict(ring.state_dict())
    torch.testing.assert_close(ring.materialize(), train.materialize(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("shape,v,ranks", [
    (((2, 3, 5), (2, 2, 2)), 30, [2, 2, 12]),
    (((3, 4), (4, 2)), 12, [2, 6]),
    (((2, 2, 3, 3), (2, 2, 1, 2)), 33, [2, 2, 8, 12]),
])
def test_tr_svd_full_rank_is_exact(shape, v, ranks):
    """Ranks that cover every unfolding (R0*R1 >= the first unfolding's rank, then as for
    TT with the ring index carried along) reproduce the table."""
    weight = torch.randn(v, math.prod(shape[1]), dtype=torch.float64)
    layer = TREmbedding.from_dense(weight, ranks, shape=shape)
    torch.testing.assert_close(layer.materialize(), weight, rtol=0, atol=1e-10)


def test_tr_svd_truncated_error_bounds():
    """Cutting a ring at bonds 0 and k leaves a matrix of rank <= R0*Rk, so the error is at
    least the best rank-R0*Rk error of unfolding k; TR-SVD is a chain of orthogonal
    projections, so it is below ||W||; and more rank does not hurt here."""
    shape = ((5, 6, 8), (2, 4, 4))
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(240, 32, dtype=torch.float64, generator=g)
    modes = ttm.to_modes(weight, shape)
    sizes = [10, 24, 32]
    errors = []
    for r in (2, 3, 4):
        layer = TREmbedding.from_dense(weight, r, shape=shape)
        err = (layer.materialize() - weight).norm().item()
        for k in range(2):
            sv = torch.linalg.svdvals(modes.reshape(math.prod(sizes[: k + 1]), -1))
            assert err >= sv[r * r:].pow(2).sum().sqrt().item() - 1e-9
        assert err < weight.norm().item()
        errors.append(err)
    assert errors[0] > errors[1] > errors[2]


def test_tr_from_dense_of_a_ring_table_recovers_it():
    torch.manual_seed(1)
    source = TREmbedding(240, 32, 3, shape=((5, 6, 8), (2, 4, 4))).double()
    table = source.materialize().detach()
    # TR-SVD is not rank-minimal: the split of the first factor into (r0, r1) is arbitrary,
    # so the later bonds must carry the ring index too. Rank 3 everywhere is not enough,
    # R2 = 27 recovers the ring exactly (documented limitation; ALS would be needed).
    shape = ((5, 6, 8), (2, 4, 4))
    rel = []
    for r2 in (3, 27):
        layer = TREmbedding.from_dense(table, [3, 3, r2], shape=shape)
        rel.append(((layer.materialize() - table).norm() / table.norm()).item())
    assert rel[0] > 0.1 and rel[1] < 1e-9


def test_tr_rank_arguments():
    with pytest.raises(ValueError, match=r"rank has 2 entries .*3 ranks \(R0..R2"):
        TREmbedding(100, 16, [2, 2])
    with pytest.raises(ValueError, match="rank must be >= 1"):
        TREmbedding(100, 16, [2, 0, 2])
    assert TREmbedding(100, 16, 4).ranks == (4, 4, 4, 4)


def test_tr_storage_registry_and_plan():
    layer = TREmbedding(32768, 1024, 16, shape=((32, 32, 32), (8, 8, 16)))
    s = layer.storage()
    assert s.method == "tr" and s.shape == "(32,32,32)x(8,8,16) r=16"
    assert s.stored_parameters == 16 * 16 * (32 * 8 + 32 * 8 + 32 * 16)
    # the paper's Big+TR2 row says 64x for embedding + untied softmax, i.e. 128x per table
    assert s.ratio == pytest.approx(128.0)
    assert get_method("tr").config_cls is TRConfig
    spec = plan(32768, 1024, "tr", 32)
    built = get_method("tr").build(spec.config, 32768, 1024)
    assert isinstance(built, TREmbedding) and built.storage().ratio >= 32
    assert spec.config.rank == 32  # the paper's Big+TR1: rank 32 at 16x for two tables
