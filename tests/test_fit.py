"""compemb.fit: calibration statistics, weighted fits in the head's metric, FittedEmbedding,
the planner (core, torch only)."""
import pytest
import torch

from compemb import EmbeddingSpec
from compemb.dpq.math import kmeans
from compemb.fit import default_residual_share
from compemb.fit.residual import residual_row_bytes
from compemb.fit import (DEFAULT_PRIOR, SAMPLED_PRIOR, FittedEmbedding, SecondMoment, count_tokens,
                         default_rotation,
                         fit_codebook, fit_table, metric_root, plan_fit, prefix_order, rank_prior,
                         token_weights, weighted_error)
from compemb.tt import TTEmbedding


def _table(v=600, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, d, generator=g) @ torch.randn(d, d, generator=g) * 0.1


# ---------------------------------------------------------------------------- statistics
def test_count_tokens_streams_batches_and_checks_range():
    counts = count_tokens([torch.tensor([[0, 1, 1]]), torch.tensor([3])], 5)
    assert counts.tolist() == [1, 2, 0, 1, 0]
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        count_tokens(torch.tensor([5]), 5)


def test_token_weights_follow_the_documented_rule():
    counts = torch.tensor([1000.0, 10.0, 0.0, 0.0], dtype=torch.float64)
    w = token_weights(counts, prior=0.2, cap=100.0)
    p = counts / counts.sum() * 0.8 + 0.2 / 4
    expect = p * 4
    torch.testing.assert_close(w.double(), expect / expect.mean(), rtol=1e-6, atol=1e-6)
    assert w[2] > 0 and w[2] == w[3]  # an unseen token keeps a share: the prior
    capped = token_weights(torch.tensor([1e6] + [0.0] * 99), prior=0.1, cap=5.0)
    assert capped.max() / capped.min() == pytest.approx(5.0 / (0.1 / 100 * 100), rel=1e-5)
    assert float(capped.mean()) == pytest.approx(1.0)
    assert token_weights(torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]
    excluded = token_weights(counts, exclude=torch.tensor([0]))
    assert excluded[0] == 0 and float(excluded.mean()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="prior"):
        token_weights(counts, prior=1.5)
    with pytest.raises(ValueError, match="cap"):
        token_weights(counts, cap=0.5)


def test_rank_prior_is_a_zipf_law_over_ids_with_a_uniform_floor():
    p = rank_prior(1000, offset=10.0, exponent=1.0, uniform=0.25)
    assert p.shape == (1000,) and p.dtype == torch.float64
    assert float(p.sum()) == pytest.approx(1.0)
    assert bool((p[:-1] > p[1:]).all())  # lower ids are taken as more frequent
    z = (torch.arange(1000, dtype=torch.float64) + 10.0) ** -1.0
    torch.testing.assert_close(p, 0.25 / 1000 + 0.75 * z / z.sum())
    assert float(p.min()) >= 0.25 / 1000  # the floor under every row
    torch.testing.assert_close(rank_prior(7, uniform=1.0), torch.full((7,), 1 / 7, dtype=torch.float64))
    for bad, match in (({"num_embeddings": 0}, "num_embeddings"), ({"offset": 0.0}, "offset"),
                       ({"exponent": -1.0}, "exponent"), ({"uniform": 1.5}, "uniform")):
        with pytest.raises(ValueError, match=match):
            rank_prior(**{"num_embeddings": 10, **bad})


def test_token_weights_blend_the_counts_with_a_given_prior():
    counts = torch.tensor([0.0, 30.0, 0.0, 10.0], dtype=torch.float64)
    q = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)  # any scale: normalised
    w = token_weights(counts, prior=0.5, cap=100.0, prior_distribution=q)
    p = counts / 40 * 0.5 + 0.5 * q / 10
    torch.testing.assert_close(w.double(), p * 4 / (p * 4).mean(), rtol=1e-6, atol=1e-6)
    assert w[0] > w[2] > 0  # unseen tokens keep the prior's order
    # no counts: the prior's own weights
    torch.testing.assert_close(token_weights(torch.zeros(4), prior_distribution=q).double(),
                               q / q.mean(), rtol=1e-6, atol=1e-6)
    for bad in (torch.ones(3), -q, torch.zeros(4), torch.tensor([1.0, float("inf"), 1.0, 1.0])):
        with pytest.raises(ValueError, match="prior_distribution"):
            token_weights(counts, prior_distribution=bad)


def test_metric_root_is_the_square_root_of_the_scaled_moment_plus_identity():
    h = torch.randn(500, 6, dtype=torch.float64) + 2.0
    m = SecondMoment(6)
    m.update(h[:200])
    m.update(h[200:], mask=torch.ones(300, dtype=torch.bool))
    s = h.T @ h / 500
    torch.testing.assert_close(m.value(), s)
    a, a_inv = metric_root(m.value(), 6, identity_weight=0.5)
    target = s * (6 / torch.trace(s)) + 0.5 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(a @ a, target)
    torch.testing.assert_close(a @ a_inv, torch.eye(6, dtype=torch.float64))
    eye, _ = metric_root(None, 6)
    assert torch.equal(eye, torch.eye(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="no vectors"):
        SecondMoment(3).value()


# ---------------------------------------------------------------------------- weighted k-means
def test_weighted_kmeans_gives_weighted_means_and_ignores_zero_weights():
    x = torch.tensor([[0.0], [1.0], [10.0], [100.0]]).view(1, 4, 1)
    w = torch.tensor([3.0, 1.0, 0.0, 0.0])
    c, assign = kmeans(x, 1, weights=w)
    assert float(c[0, 0, 0]) == pytest.approx(0.25)
    c2, _ = kmeans(x, 2, iters=10, weights=torch.tensor([1.0, 1.0, 0.0, 5.0]))
    assert sorted(c2[0, :, 0].tolist())[1] == pytest.approx(100.0)  # the heavy point is a centre
    with pytest.raises(ValueError, match="weights"):
        kmeans(x, 1, weights=torch.tensor([1.0, -1.0, 0.0, 0.0]))


# ---------------------------------------------------------------------------- FittedEmbedding
def _fitted(padding_idx=None):
    v, d = 50, 8
    base = TTEmbedding(v, d, rank=3)
    g = torch.Generator().manual_seed(1)
    return FittedEmbedding(base, torch.randn(d, d, generator=g), torch.tensor([3, 7, 40]),
                           torch.randn(3, d, generator=g), torch.randperm(v, generator=g),
                           padding_idx=padding_idx)


@pytest.mark.parametrize("padding_idx", [None, 5])
def test_fitted_embedding_forward_logits_and_table_agree(padding_idx):
    layer = _fitted(padding_idx)
    table = layer.materialize()
    base = layer.base.materialize()[layer.row_index.long()] @ layer.transform
    base[[3, 7, 40]] = layer.exact_rows
    if padding_idx is not None:
        base[padding_idx] = 0
    torch.testing.assert_close(table, base)
    ids = torch.tensor([[3, 5, 9], [40, 0, 49]])
    torch.testing.assert_close(layer(ids), table[ids])
    h = torch.randn(2, 4, 8)
    torch.testing.assert_close(layer.logits(h), h @ table.T, rtol=1e-5, atol=1e-5)
    # every part is trained through logits (tied head) and forward
    (layer.logits(h).sum() + layer(ids).sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fitted_embedding_state_round_trip_and_storage():
    layer = _fitted()
    empty = FittedEmbedding.empty(TTEmbedding(50, 8, rank=3), True, 3, True)
    empty.load_state_dict(layer.state_dict())
    ids = torch.arange(50)
    torch.testing.assert_close(empty(ids), layer(ids))  # the exact-row map follows the load
    s = layer.storage()
    cores = sum(c.numel() for c in layer.base.cores)
    assert s.stored_bytes == 4 * (cores + 64 + 3 * 8) + 4 * 3 + 4 * 50
    assert s.dense_bytes == 50 * 8 * 4 and s.method == "tt+fit"


def test_fitted_embedding_refuses_bad_parts():
    base = TTEmbedding(20, 8, rank=2)
    with pytest.raises(ValueError, match="transform"):
        FittedEmbedding(base, torch.eye(3))
    with pytest.raises(ValueError, match="permutation"):
        FittedEmbedding(base, row_index=torch.zeros(20, dtype=torch.long))
    with pytest.raises(ValueError, match="distinct"):
        FittedEmbedding(base, exact_ids=torch.tensor([1, 1]), exact_rows=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="together"):
        FittedEmbedding(base, exact_ids=torch.tensor([1]))


# ---------------------------------------------------------------------------- fits
def test_fit_in_the_metric_lowers_the_error_that_metric_measures():
    # hidden states dominated by their mean, as a real LM head's input is
    w = _table()
    g = torch.Generator().manual_seed(3)
    h = torch.randn(16, dtype=torch.float64, generator=g) * 3 + torch.randn(
        2000, 16, dtype=torch.float64, generator=g)
    moment = SecondMoment(16)
    moment.update(h)
    s = moment.value().float()
    spec = EmbeddingSpec("dpq", {"num_codes": 8, "num_groups": 8})

    def cost(layer):  # what the logits see: sum_i e_i^T S e_i, relative
        e = layer.materialize().detach() - w
        return float(((e @ s) * e).sum() / ((w @ s) * w).sum())

    plain = fit_table(w, spec)
    fitted = fit_table(w, spec, metric=metric_root(moment.value(), 16, identity_weight=1.0))
    assert cost(fitted) < 0.5 * cost(plain)


def test_exact_rows_are_exact_and_frequent_rows_fit_better():
    w = _table()
    counts = torch.zeros(600)
    counts[:100] = 50.0
    tw = token_weights(counts)
    layer = fit_table(w, EmbeddingSpec("dpq", {"num_codes": 8, "num_groups": 4}),
                      token_weights=tw, num_exact=10)
    table = layer.materialize().detach()
    kept = layer.exact_ids.long()
    assert set(kept.tolist()) <= set(range(100))
    torch.testing.assert_close(table[kept], w[kept])
    err = ((table - w).norm(dim=1) / w.norm(dim=1))
    assert err[10:100].median() < err[100:].median()


def test_rows_missing_from_the_calibration_text_are_not_given_up():
    # issue 17: median relative error of unseen tokens <= 1.5x the median over all rows
    w = _table(v=1000)
    g = torch.Generator().manual_seed(2)
    counts = torch.zeros(1000)
    seen = torch.randperm(1000, generator=g)[:600]
    counts[seen] = torch.rand(600, generator=g) ** 4 * 1000  # Zipf-like, 40% never seen
    unseen = counts == 0
    for spec in (EmbeddingSpec("dpq", {"num_codes": 16, "num_groups": 8}),
                 EmbeddingSpec("tt", {"rank": 4})):
        layer = fit_table(w, spec, token_weights=token_weights(counts), num_exact=20)
        err = (layer.materialize().detach() - w).norm(dim=1) / w.norm(dim=1)
        assert err[unseen].median() <= 1.5 * err.median(), spec.method
        # the default of compress_pretrained: the rank prior, with its larger share when
        # the text is sampled
        for prior in (DEFAULT_PRIOR, SAMPLED_PRIOR):
            ranked = fit_table(w, spec, token_weights=token_weights(
                counts, prior=prior, prior_distribution=rank_prior(1000)), num_exact=20)
            r_err = (ranked.materialize().detach() - w).norm(dim=1) / w.norm(dim=1)
            assert r_err[unseen].median() <= 1.5 * r_err.median(), (spec.method, prior)
        # raw frequencies (no prior, no cap) do give them up: the rule is what protects them
        raw = fit_table(w, spec, token_weights=token_weights(counts, prior=1e-6, cap=1e6))
        raw_err = (raw.materialize().detach() - w).norm(dim=1) / w.norm(dim=1)
        assert raw_err[unseen].median() > err[unseen].median()


def test_default_prior_follows_the_text_and_the_prior():
    from compemb.fit import SAMPLED_UNIFORM_PRIOR, default_prior

    assert default_prior(False, False) == default_prior(False, True) == DEFAULT_PRIOR
    assert default_prior(True, False) == SAMPLED_PRIOR == 1.0
    assert default_prior(True, True) == SAMPLED_UNIFORM_PRIOR < 1.0
    # at 1.0 the counts play no part: the weights are the (capped) prior's
    counts = torch.rand(300, generator=torch.Generator().manual_seed(2)) * 50
    q = rank_prior(300)
    torch.testing.assert_close(token_weights(counts, prior=1.0, prior_distribution=q),
                               token_weights(torch.zeros(300), prior=1.0, prior_distribution=q))


def test_tt_weighted_steps_lower_the_weighted_error_and_row_order_is_a_permutation():
    w = _table(v=512)
    tw = token_weights(torch.rand(512, generator=torch.Generator().manual_seed(5)) ** 6 * 100,
                       prior=0.05)
    spec = EmbeddingSpec("tt", {"rank": 4, "shape": [[8, 8, 8], [2, 2, 4]]})
    svd = fit_table(w, spec, token_weights=tw, tt_steps=0)
    steps = fit_table(w, spec, token_weights=tw, tt_steps=60)
    e0 = weighted_error(svd.materialize().detach(), w, tw)
    e1 = weighted_error(steps.materialize().detach(), w, tw)
    assert e1 < e0
    order = prefix_order(w, (8, 8, 8))
    assert torch.equal(order.sort().values, torch.arange(512))
    # rows made of 8 tight clusters: the first digit i1 takes one cluster each
    g = torch.Generator().manual_seed(4)
    centres = torch.randn(8, 16, generator=g) * 10
    clustered = centres.repeat_interleave(64, 0) + 0.01 * torch.randn(512, 16, generator=g)
    shuffled = clustered[torch.randperm(512, generator=g)]
    order = prefix_order(shuffled, (8, 8, 8))
    blocks = shuffled[order].view(8, 64, 16)
    assert float((blocks - blocks.mean(1, keepdim=True)).norm(dim=2).max()) < 1.0
    ordered = fit_table(shuffled, EmbeddingSpec("tt", {"rank": 2, "shape": [[8, 8, 8], [2, 2, 4]]}),
                        row_order=True, tt_steps=0)
    unordered = fit_table(shuffled, EmbeddingSpec("tt", {"rank": 2, "shape": [[8, 8, 8], [2, 2, 4]]}),
                          tt_steps=0)
    assert (weighted_error(ordered.materialize().detach(), shuffled, None)
            < 0.75 * weighted_error(unordered.materialize().detach(), shuffled, None))


def test_tt_residual_rows_are_rounded_in_a_rotated_space_by_default():
    # rows whose dimensions differ 10x in spread, with heavy tails: one scale per residual
    # row serves them badly until a rotation evens the dimensions out
    g = torch.Generator().manual_seed(6)
    spread = torch.logspace(0, -1, 16)
    u = torch.rand(512, 16, generator=g) - 0.5
    w = -u.sign() * torch.log1p(-2 * u.abs()) * spread  # Laplace
    eye = torch.eye(16, dtype=torch.float64)
    spec = EmbeddingSpec("tt", {"rank": 2, "shape": [[8, 8, 8], [2, 2, 4]]})
    budget = 512 * residual_row_bytes(16, 3)
    assert default_rotation("tt", budget, has_metric=True)
    assert not default_rotation("tt", 0, has_metric=True)  # nothing to round
    assert not default_rotation("tt", budget, has_metric=False)  # no transform to hold it
    assert default_rotation("dpq", 0, has_metric=False)
    rotated = fit_table(w, spec, metric=(eye, eye), residual_bytes=budget, tt_steps=0)
    plain = fit_table(w, spec, metric=(eye, eye), residual_bytes=budget, tt_steps=0, rotate=False)
    t = rotated.transform.detach().double()
    assert not torch.allclose(t, eye, atol=1e-3)  # the rotation is stored in the transform
    torch.testing.assert_close(t @ t.T, eye, atol=1e-4, rtol=0)  # and is one
    assert torch.allclose(plain.transform.detach().double(), eye)
    e_rot = weighted_error(rotated.materialize().detach(), w, None)
    e_plain = weighted_error(plain.materialize().detach(), w, None)
    assert e_rot < 0.8 * e_plain
    # the rows come out in the table's space either way: logits and lookups agree
    h = torch.randn(3, 16, generator=g)
    torch.testing.assert_close(rotated.logits(h), h @ rotated.materialize().T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rotated(torch.tensor([0, 511])), rotated.materialize()[[0, 511]])


def test_fit_codebook_gives_every_row_its_nearest_centroids():
    x = _table(v=300, d=8)
    book = fit_codebook(x, 4, 2, weights=torch.zeros(300).index_fill_(0, torch.arange(50), 1.0))
    table = book.materialize()
    groups = book.values  # [2, 4, 4]
    for g in range(2):
        d = torch.cdist(x[:, 4 * g:4 * g + 4], groups[g])
        torch.testing.assert_close(table[:, 4 * g:4 * g + 4], groups[g][d.argmin(1)])


# ---------------------------------------------------------------------------- planner
@pytest.mark.parametrize("method", ["dpq", "tt", "tr"])
@pytest.mark.parametrize("ratio", [4, 10, 32])
def test_plan_fit_reaches_the_ratio_with_the_bytes_it_counts(method, ratio):
    plan = plan_fit(49152, 576, method, ratio, transform_rank=32)
    assert plan.ratio >= ratio and plan.ratio < ratio * 1.05
    assert plan.transform
    # the default: what the base leaves goes to residual rows, none to exact rows
    assert plan.residual_bytes > 0 and plan.num_exact == 0
    share = plan.residual_bytes / plan.stored_bytes
    assert share >= default_residual_share(method)  # its share, and what the base leaves
    assert plan.residual_share == default_residual_share(method)
    # no user text: DPQ takes a larger share, TT/TR the same (compemb.fit.*_SAMPLED_RESIDUAL_SHARE)
    sampled = plan_fit(49152, 576, method, ratio, transform_rank=32,
                       residual_share=default_residual_share(method, only_sampled=True))
    assert sampled.residual_share == {"dpq": 0.2, "tt": 0.93, "tr": 0.93}[method]
    assert sampled.residual_bytes >= plan.residual_bytes
    assert ratio <= sampled.ratio < ratio * 1.05
    no_residual = plan_fit(49152, 576, method, ratio, transform_rank=32, residual_share=0,
                           exact_share=0.1)
    assert no_residual.num_exact > 0 and no_residual.residual_bytes == 0


def test_plan_fit_storage_matches_the_built_layer():
    w = _table(v=2000, d=32)
    for method in ("dpq", "tt"):
        plan = plan_fit(2000, 32, method, 6)
        layer = fit_table(w, plan.spec, metric=metric_root(None, 32), rotate=True,
                          num_exact=plan.num_exact, residual_bytes=plan.residual_bytes)
        stored = layer.storage().stored_bytes
        if plan.residual_bytes:  # the residual rows use their budget to within a few rows
            assert layer.residual is not None
            assert plan.stored_bytes - 4 * residual_row_bytes(32, 8) <= stored <= plan.stored_bytes
        else:
            assert stored == plan.stored_bytes
        assert layer.storage().ratio >= 6


def test_plan_fit_names_the_closest_ratio_when_out_of_reach():
    with pytest.raises(ValueError, match=r"closest ratio that can be had is \d+\.\dx"):
        plan_fit(49152, 576, "dpq", 1000)
    with pytest.raises(ValueError, match="ratio must be"):
        plan_fit(100, 8, "tt", 0.5)
    with pytest.raises(ValueError, match="method"):
        plan_fit(100, 8, "dense", 2)


def test_logit_bias_cancels_each_rows_error_along_the_head_mean():
    w = _table()
    mu = torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 3
    spec = EmbeddingSpec("dpq", {"num_codes": 4, "num_groups": 4})
    layer = fit_table(w, spec, head_mean=mu, num_exact=5)
    plain = fit_table(w, spec, num_exact=5)
    h = mu.float().unsqueeze(0)
    torch.testing.assert_close(layer.logits(h), h @ w.T, rtol=1e-4, atol=1e-4)
    assert (plain.logits(h) - h @ w.T).abs().max() > 0.1
    torch.testing.assert_close(layer.materialize(), plain.materialize())  # rows: no bias
    ids = torch.tensor([1, 2, 3])
    torch.testing.assert_close(layer(ids), plain(ids))
    assert layer.storage().stored_bytes == plain.storage().stored_bytes + 600 * 4
    with pytest.raises(ValueError, match="head_mean"):
        fit_table(w, spec, head_mean=torch.zeros(3))


def test_shrinkage_scale_is_the_documented_power_of_each_rows_projection():
    from compemb.fit import ROW_SCALE_POWER, shrinkage_scale

    w = _table(v=5, d=4)
    w[3] = 0
    fitted = w * torch.tensor([0.81, 1.0, 0.64, 1.0, 0.9]).unsqueeze(1)
    fitted[4] += 0.3 * torch.linalg.norm(w[4]) * torch.nn.functional.normalize(
        torch.tensor([w[4, 1], -w[4, 0], 0.0, 0.0]), dim=0)  # orthogonal: no projection
    scale = shrinkage_scale(fitted, w)
    assert ROW_SCALE_POWER == 1.0
    torch.testing.assert_close(scale, torch.tensor([1 / 0.81, 1.0, 1 / 0.64, 1.0, 1 / 0.9]))
    assert shrinkage_scale(w * 0.01, w)[0] == pytest.approx(1 / 0.5)  # clamped
    assert shrinkage_scale(fitted, w, power=0.5)[0] == pytest.approx(1 / 0.9)
    with pytest.raises(ValueError, match="same"):
        shrinkage_scale(w[:3], w)


def test_row_scale_scales_the_fitted_rows_everywhere_at_8_bits_and_round_trips():
    w = _table()
    mu = torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    spec = EmbeddingSpec("dpq", {"num_codes": 4, "num_groups": 4})
    layer = fit_table(w, spec, head_mean=mu, num_exact=5)
    assert layer.row_scale() is None
    rows = layer.materialize().detach()
    exact = layer.exact_ids.long()
    h = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    scale = torch.linspace(0.9, 1.3, 600)
    layer.set_row_scale(scale)
    assert layer.row_scale_codes.dtype == torch.uint8
    got = layer.row_scale()
    assert (got - scale).abs().max() <= 0.4 / 255 / 2 + 1e-6  # 8 bits
    want = rows * got.unsqueeze(1)
    want[exact] = w[exact]  # exact rows stay exact
    torch.testing.assert_close(layer.materialize(), want)
    ids = torch.tensor([[0, 7], [int(exact[0]), 599]])
    torch.testing.assert_close(layer(ids), want[ids])
    torch.testing.assert_close(layer.logits(h), h @ want.T + layer.logit_bias, rtol=1e-5,
                               atol=1e-5)
    plain = fit_table(w, spec, head_mean=mu, num_exact=5)
    assert layer.storage().stored_bytes == plain.storage().stored_bytes + 600 + 8
    assert "row scale" in layer.storage().shape
    # a checkpoint loads into the empty structure, and the inference form keeps it
    empty = FittedEmbedding.empty(fit_table(w, spec).base, transform=True, num_exact=5,
                                  row_index=False, logit_bias=True, row_scale=True)
    empty.load_state_dict(layer.state_dict())
    torch.testing.assert_close(empty.logits(h), layer.logits(h))
    torch.testing.assert_close(empty(ids), layer(ids))
    torch.testing.assert_close(layer.export().logits(h), layer.logits(h))
    for bad, match in [(torch.ones(5), r"\[600\]"), (-scale, "positive"),
                       (scale * float("nan"), "positive and finite"), ([1.0] * 600, "tensor")]:
        with pytest.raises(ValueError, match=match):
            layer.set_row_scale(bad)
    with pytest.raises(ValueError, match="logit bias"):
        fit_table(w, spec).set_row_scale(scale, head_mean=mu.float())
    with pytest.raises(ValueError, match="head_mean"):
        layer.set_row_scale(scale, head_mean=torch.zeros(3))
    torch.testing.assert_close(layer.row_scale(), got)  # refused: unchanged
    # with the head's mean input, the logits there stay as they were (also when a scale is
    # replaced), and only the context-dependent part is scaled
    centred = fit_table(w, spec, head_mean=mu, num_exact=5)
    m = mu.float().unsqueeze(0)
    at_mean = centred.logits(m).detach()
    bias = centred.logit_bias.detach().clone()
    for s in (scale, scale.flip(0)):
        centred.set_row_scale(s, head_mean=mu.float())
        torch.testing.assert_close(centred.logits(m), at_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(centred.logit_bias[exact], bias[exact])  # not scaled there
    torch.testing.assert_close(centred.logits(h) - centred.logits(m),
                               (h - m) @ centred.materialize().T, rtol=1e-4, atol=1e-4)


def test_plan_fit_pays_for_the_row_scale_from_the_same_budget():
    without = plan_fit(49152, 576, "dpq", 10, logit_bias=True, transform_rank=32)
    with_scale = plan_fit(49152, 576, "dpq", 10, logit_bias=True, transform_rank=32,
                          row_scale=True)
    assert with_scale.row_scale and "row scale" in with_scale.describe()
    assert with_scale.stored_bytes <= with_scale.dense_bytes / 10
    assert with_scale.spec == without.spec
    assert with_scale.residual_bytes == without.residual_bytes - 49152 - 8


# ---------------------------------------------------------------------------- head fit
def _head_case(seed=7):
    from compemb.fit.head import head_kl

    g = torch.Generator().manual_seed(seed)
    w = _table(v=300, d=16, seed=seed) * 20  # logits of a few nats
    mu = torch.randn(16, generator=g)
    spec = EmbeddingSpec("dpq", {"num_codes": 4, "num_groups": 4})
    layer = fit_table(w, spec, head_mean=mu.double(), num_exact=3,
                      metric=metric_root(torch.eye(16, dtype=torch.float64), 16))
    sources = [mu + torch.randn(400, 16, generator=g), mu + 0.5 * torch.randn(200, 16, generator=g)]
    return w, layer, sources, head_kl


def test_fit_head_lowers_the_heldout_kl_and_trains_only_what_it_is_given():
    from compemb.fit.head import fit_head

    w, layer, sources, head_kl = _head_case()
    teacher = lambda h: h @ w.T  # noqa: E731
    trained = [layer.base.values, layer.logit_bias, layer.exact_rows]
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    fresh = [s[-40:] for s in sources]  # rows the fit holds out (the last 10% of each)
    kl0 = sum(head_kl(layer.logits, teacher, s) for s in fresh)
    result = fit_head(layer.logits, teacher, sources, trained, steps=60, batch_size=64,
                      lr=0.02, eval_every=10)
    assert result.steps == 60
    assert result.heldout_after < 0.8 * result.heldout_before
    assert sum(head_kl(layer.logits, teacher, s) for s in fresh) < kl0
    after = dict(layer.named_parameters())
    for name in ("base.values", "logit_bias", "exact_rows"):
        assert not torch.equal(after[name], before[name]), name
    assert torch.equal(after["transform"], before["transform"])  # not given: unchanged
    assert all(p.requires_grad for p in layer.parameters())  # flags restored


def test_fit_head_keeps_the_start_when_nothing_helps_and_checks_its_arguments():
    from compemb.fit.head import fit_head

    w, layer, sources, _ = _head_case()
    start = layer.logit_bias.detach().clone()
    result = fit_head(layer.logits, lambda h: h @ w.T, sources, [layer.logit_bias], steps=5,
                      lr=50.0, eval_every=1)  # a step far too large: every state is worse
    assert result.heldout_after == result.heldout_before
    assert torch.equal(layer.logit_bias.detach(), start)
    with pytest.raises(ValueError, match="steps=... or deadline"):
        fit_head(layer.logits, lambda h: h @ w.T, sources, [layer.logit_bias])
    with pytest.raises(ValueError, match="floating-point parameters"):
        fit_head(layer.logits, lambda h: h @ w.T, sources, [], steps=1)
    with pytest.raises(ValueError, match="needs head inputs"):
        fit_head(layer.logits, lambda h: h @ w.T, [], [layer.logit_bias], steps=1)
    with pytest.raises(ValueError, match="too few"):
        fit_head(layer.logits, lambda h: h @ w.T, [torch.randn(1, 16)], [layer.logit_bias],
                 steps=1)
