"""compemb.fit.transform: the d x d transform of a fitted table kept as a Kronecker product
plus a low rank, and its use by fit_table, FittedEmbedding and the planner."""
import pytest
import torch

from compemb import EmbeddingSpec
from compemb.fit import FittedEmbedding, KroneckerLowRank, fit_table, metric_root, plan_fit
from compemb.fit.residual import residual_row_bytes
from compemb.fit.transform import (kron_apply, kronecker_factors, kronecker_low_rank_size,
                                   kronecker_low_rank_transform, kronecker_rotation,
                                   low_rank_root)
from compemb.tt import TTEmbedding

F64 = torch.float64


def _spd(d, rank, seed=0):
    """A covariance of ``rank`` strong directions plus a little of everything."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4000, rank, generator=g, dtype=F64) @ torch.randn(rank, d, generator=g, dtype=F64)
    return x.T @ x / 4000 + 0.05 * torch.eye(d, dtype=F64)


@pytest.mark.parametrize("dim,expect", [(576, (24, 24)), (384, (16, 24)), (30, (5, 6)),
                                        (13, (1, 13)), (1, (1, 1))])
def test_kronecker_factors_are_as_square_as_the_dimension_allows(dim, expect):
    assert kronecker_factors(dim) == expect
    with pytest.raises(ValueError, match="dim"):
        kronecker_factors(0)


def test_kron_apply_and_the_rotation():
    g = torch.Generator().manual_seed(1)
    left, right = torch.randn(4, 4, generator=g, dtype=F64), torch.randn(6, 6, generator=g, dtype=F64)
    x = torch.randn(3, 5, 24, generator=g, dtype=F64)
    torch.testing.assert_close(kron_apply(x, left, right), x @ torch.kron(left, right))
    q1, q2 = kronecker_rotation(24, seed=3)
    q = torch.kron(q1, q2)
    torch.testing.assert_close(q @ q.T, torch.eye(24, dtype=F64))
    assert torch.equal(kronecker_rotation(24, seed=3)[0], q1)  # seeded
    assert not torch.equal(kronecker_rotation(24, seed=4)[0], q1)


def test_low_rank_root_keeps_the_top_of_the_spectrum_and_inverts_exactly():
    m = _spd(20, 3)
    e, s, t = low_rank_root(m, 3)
    eye = torch.eye(20, dtype=F64)
    a = e @ torch.diag(s) @ e.T + t * (eye - e @ e.T)
    a_inv = e @ torch.diag(1 / s) @ e.T + (eye - e @ e.T) / t
    torch.testing.assert_close(a @ a_inv, eye)
    evals, evecs = torch.linalg.eigh(m)
    torch.testing.assert_close(a @ a @ evecs[:, -3:], m @ evecs[:, -3:])  # kept directions exact
    assert t * t == pytest.approx(float(evals[:-3].mean()))  # the rest: their mean
    with pytest.raises(ValueError, match="rank"):
        low_rank_root(m, 20)


def test_transform_factors_give_the_whole_matrix():
    d = 30
    root = low_rank_root(_spd(d, 4), 4)
    rot = kronecker_rotation(d, seed=0)
    t = kronecker_low_rank_transform(root, d, rot)
    e, s, tail = root
    eye = torch.eye(d, dtype=F64)
    a_inv = e @ torch.diag(1 / s) @ e.T + (eye - e @ e.T) / tail
    torch.testing.assert_close(t.matrix(), torch.kron(*rot).T @ a_inv)
    x = torch.randn(2, 7, d, dtype=F64)
    torch.testing.assert_close(t.rows(x), x @ t.matrix())
    torch.testing.assert_close(t.hidden(x), x @ t.matrix().T)
    assert sum(p.numel() for p in t.parameters()) == kronecker_low_rank_size(d, 4) == 25 + 36 + 240
    # no metric: the rotation alone; neither: the identity
    torch.testing.assert_close(kronecker_low_rank_transform(None, d, rot).matrix(), torch.kron(*rot).T)
    torch.testing.assert_close(kronecker_low_rank_transform(None, d, None).matrix(), eye)
    with pytest.raises(ValueError, match=r"\[30, k\]"):
        KroneckerLowRank(torch.eye(5), torch.eye(6), torch.zeros(30, 2), torch.zeros(29, 2))


def test_fit_with_a_low_rank_transform_matches_the_whole_one_when_the_metric_is_low_rank():
    """The metric of a real head is a few strong directions over a flat floor: keeping
    those directions (and a Kronecker rotation) fits as well as the d x d transform."""
    d, v = 24, 1500
    g = torch.Generator().manual_seed(0)
    w = torch.randn(v, d, generator=g) * 0.1
    metric = metric_root(_spd(d, 3), d, 0.1)
    spec = EmbeddingSpec("dpq", {"num_codes": 16, "num_groups": 12})
    m = (metric[0] @ metric[0]).float()

    def error(layer):
        e = layer.materialize().detach() - w
        return float(torch.einsum("vi,ij,vj->", e, m, e) / torch.einsum("vi,ij,vj->", w, m, w))

    def mean_error(**kw):  # over three rotations: one draw varies by about 10%
        return sum(error(fit_table(w, spec, metric=metric, num_exact=5, seed=s, **kw))
                   for s in range(3)) / 3

    low = fit_table(w, spec, metric=metric, num_exact=5, transform_rank=3)
    assert isinstance(low.transform, KroneckerLowRank) and low.transform.rank == 3
    assert mean_error(transform_rank=3) < 1.05 * mean_error()
    # the metric's three strong directions are all it needs: a higher rank fits the same
    assert error(low) == pytest.approx(error(fit_table(w, spec, metric=metric, num_exact=5,
                                                       transform_rank=20)), rel=1e-3)
    # the layer's paths agree with its table, and the bytes are counted
    table = low.materialize()
    ids = torch.tensor([[0, 3], [1499, 7]])
    torch.testing.assert_close(low(ids), table[ids])
    h = torch.randn(5, d)
    torch.testing.assert_close(low.logits(h), h @ table.T, rtol=1e-4, atol=1e-5)
    whole = fit_table(w, spec, metric=metric, num_exact=5)
    assert (whole.storage().stored_bytes - low.storage().stored_bytes
            == 4 * (d * d - kronecker_low_rank_size(d, 3)))
    with pytest.raises(ValueError, match="transform_rank"):
        fit_table(w, spec, metric=metric, transform_rank=d)


def test_fitted_embedding_with_a_low_rank_transform_round_trips_its_state():
    d, v = 8, 50
    g = torch.Generator().manual_seed(2)
    t = KroneckerLowRank(torch.randn(2, 2, generator=g), torch.randn(4, 4, generator=g),
                         torch.randn(d, 2, generator=g), torch.randn(d, 2, generator=g))
    layer = FittedEmbedding(TTEmbedding(v, d, rank=3), t, torch.tensor([1, 4]),
                            torch.randn(2, d, generator=g))
    assert {"transform.left", "transform.right", "transform.u", "transform.v"} <= set(layer.state_dict())
    empty = FittedEmbedding.empty(TTEmbedding(v, d, rank=3), True, 2, False, transform_rank=2)
    empty.load_state_dict(layer.state_dict())
    ids = torch.arange(v)
    torch.testing.assert_close(empty(ids), layer(ids))
    torch.testing.assert_close(layer.materialize()[[0, 2]], (layer.base.materialize() @ t.matrix())[[0, 2]])
    (layer.logits(torch.randn(3, d)).sum()).backward()
    assert all(p.grad is not None for p in layer.transform.parameters())
    with pytest.raises(ValueError, match="8 dimensions"):
        FittedEmbedding(TTEmbedding(v, d, rank=3), KroneckerLowRank.empty(6, 1))


def test_plan_counts_the_smaller_transform_and_spends_the_bytes_on_codes():
    full = plan_fit(49152, 576, "dpq", 10, transform=True, logit_bias=True)
    low = plan_fit(49152, 576, "dpq", 10, transform=True, logit_bias=True, transform_rank=32)
    assert full.transform_rank is None and low.transform_rank == 32
    assert "Kronecker + rank 32" in low.describe()
    bits = lambda p: p.spec.config.num_groups * (p.spec.config.num_codes.bit_length() - 1)
    assert bits(low) > bits(full) and low.ratio >= 10 and full.ratio >= 10
    # a rank whose factors are no smaller than d x d falls back to the whole matrix
    assert plan_fit(600, 8, "dpq", 4, transform=True, transform_rank=4).transform_rank is None
    with pytest.raises(ValueError, match="transform_rank"):
        plan_fit(600, 8, "dpq", 4, transform=True, transform_rank=-1)


def test_planned_storage_matches_the_built_layer_with_a_low_rank_transform():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3000, 48, generator=g) * 0.1
    plan = plan_fit(3000, 48, "dpq", 6, transform=True, transform_rank=4)
    assert plan.transform_rank == 4
    layer = fit_table(w, plan.spec, metric=metric_root(_spd(48, 4), 48), num_exact=plan.num_exact,
                      transform_rank=plan.transform_rank, residual_bytes=plan.residual_bytes)
    assert plan.residual_bytes > 0 and layer.residual is not None
    # the residual rows fill their budget to within a few rows
    stored = layer.storage().stored_bytes
    assert plan.stored_bytes - 4 * residual_row_bytes(48, 8) <= stored <= plan.stored_bytes


@pytest.mark.parametrize("transform_rank", [None, 2])
@pytest.mark.parametrize("method", ["dpq", "tt"])
def test_a_fitted_table_exports_and_matches_eager(method, transform_rank):
    """torch.export of a fitted table's lookup and logits (exact rows, residual rows, logit
    bias, row scale, either transform; DPQ as codes): the exported program gives the eager
    numbers."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 16, generator=g)
    spec = (EmbeddingSpec("dpq", {"num_codes": 16, "num_groups": 8}) if method == "dpq"
            else EmbeddingSpec("tt", {"rank": 3}))
    layer = fit_table(w, spec, metric=metric_root(_spd(16, 2), 16), num_exact=5,
                      transform_rank=transform_rank, head_mean=torch.randn(16, generator=g),
                      residual_bytes=1500).eval()
    assert layer.residual is not None and layer.residual.ids.numel() > 0
    layer.set_row_scale(torch.rand(300, generator=g) * 0.2 + 0.95)

    class Both(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = layer

        def forward(self, ids, hidden):
            return self.table(ids), self.table.logits(hidden)

    model = Both()
    ids = torch.tensor([[int(layer.exact_ids[0]), int(layer.residual.ids[0]), 2, 299]])
    hidden = torch.randn(1, 3, 16, generator=g)
    with torch.no_grad():
        program = torch.export.export(model, (ids, hidden))
        torch.testing.assert_close(model(ids, hidden)[0], layer.materialize()[ids])
        for got, want in zip(program.module()(ids, hidden), model(ids, hidden)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
