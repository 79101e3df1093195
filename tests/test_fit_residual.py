"""compemb.fit.residual: residual rows (graded mixed allocation) and their place in a fitted
table (core, torch only)."""
import pytest
import torch

from compemb import EmbeddingSpec
from compemb.fit import FittedEmbedding, fit_table, metric_root, plan_fit, weighted_error
from compemb.fit.residual import (ResidualRows, allocate_bits, dequantize_rows, quantize_rows,
                                  residual_row_bytes)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantized_rows_stay_in_range_and_each_bit_lowers_the_error(bits):
    r = _randn(50, 37)
    codes, scales = quantize_rows(r, bits)
    assert codes.shape == r.shape and scales.shape == (50,)
    assert int(codes.min()) >= 0 and int(codes.max()) < 2 ** bits
    err = (dequantize_rows(codes, scales, bits) - r).pow(2).sum() / r.pow(2).sum()
    coarser = (dequantize_rows(*quantize_rows(r, bits - 1), bits - 1) - r).pow(2).sum() / r.pow(2).sum()
    assert err < coarser
    # a uniform quantiser's error: at most a quarter of a step squared per entry, with the
    # largest scale tried (no clipping) as the bound
    step = r.abs().amax(1) / (2 ** (bits - 1) - 0.5)
    assert err * r.pow(2).sum() <= float((step.pow(2) / 4 * r.shape[1]).sum())


def test_a_row_on_the_grid_comes_back_exactly():
    scale = torch.tensor([0.25, 2.0])
    codes = torch.tensor([[0, 1, 2, 3], [3, 3, 0, 1]])
    rows = dequantize_rows(codes, scale, 2)
    got_codes, got_scale = quantize_rows(rows, 2)
    torch.testing.assert_close(dequantize_rows(got_codes, got_scale, 2), rows)


def test_allocation_stays_in_budget_and_gives_heavier_rows_more_bits():
    r = _randn(400, 32)
    w = torch.cat([torch.full((100,), 30.0), torch.ones(200), torch.zeros(100)])
    budget = 100 * residual_row_bytes(32, 4)
    bits = allocate_bits(r, w, budget)
    cost = sum(residual_row_bytes(32, int(b)) for b in bits if b > 0)
    assert cost <= budget and cost > budget * 0.9
    assert bits[:100].float().mean() > bits[100:300].float().mean()
    assert int(bits[300:].max()) == 0  # weight 0: never bits
    assert set(bits.unique().tolist()) <= {0, 2, 3, 4, 5, 6, 8}
    assert int(allocate_bits(r, w, 0).max()) == 0
    assert int(allocate_bits(r, torch.zeros(400), budget).max()) == 0
    with pytest.raises(ValueError, match="budget"):
        allocate_bits(r, w, -1)
    with pytest.raises(ValueError, match="weights"):
        allocate_bits(r, w[:10], budget)


def _residual(v=60, d=12):
    r = _randn(v, d, seed=1)
    bits = torch.zeros(v, dtype=torch.long)
    bits[[3, 7, 8]] = 2
    bits[[10, 59]] = 5
    bits[[0]] = 8
    return r, bits, ResidualRows.from_rows(r, bits)


def test_residual_rows_add_the_same_rows_to_lookup_table_and_logits():
    r, bits, res = _residual()
    assert res.counts == {2: 3, 5: 2, 8: 1}
    ids, rows = res.rows()
    for i, row in zip(ids.tolist(), rows):
        b = int(bits[i])
        torch.testing.assert_close(row, dequantize_rows(*quantize_rows(r[i:i + 1], b), b)[0])
    base = _randn(60, 12, seed=2)
    table = res.add_to_table(base)
    assert torch.equal(table[1], base[1]) and not torch.equal(table[0], base[0])
    look = torch.tensor([[0, 1, 59], [8, 8, 2]])
    torch.testing.assert_close(res.add_to_lookup(look, base[look], 60), table[look])
    h = _randn(2, 5, 12, seed=3)
    torch.testing.assert_close(res.add_to_logits(h, h @ base.T), h @ table.T, rtol=1e-5, atol=1e-5)
    # gradients (the scales' and the hidden states') are those of the table's product,
    # whichever path computed the dots (native int8 kernel for a hidden state that needs
    # no gradient, autograd otherwise)
    for needs_grad in (False, True):
        hh = h.clone().requires_grad_(needs_grad)
        res.scales.grad = None
        res.add_to_logits(hh, hh @ base.T).square().sum().backward()
        got = res.scales.grad.clone(), (hh.grad.clone() if needs_grad else None)
        res.scales.grad = None
        hh2 = h.clone().requires_grad_(needs_grad)
        (hh2 @ res.add_to_table(base).T).square().sum().backward()
        torch.testing.assert_close(got[0], res.scales.grad, rtol=1e-4, atol=1e-4)
        if needs_grad:
            torch.testing.assert_close(got[1], hh2.grad, rtol=1e-4, atol=1e-4)


def test_residual_rows_load_into_an_empty_layout_and_train_their_scales():
    _, _, res = _residual()
    back = ResidualRows(12, res.counts)  # placeholder values of the same layout
    look = torch.tensor([0, 3, 10, 11])
    zeros = torch.zeros(4, 12)
    back.add_to_lookup(look, zeros, 60)  # its caches (slot map, unpacked codes) built now
    back.load_state_dict(res.state_dict())
    for a, b in zip(res.rows(), back.rows()):
        torch.testing.assert_close(a, b)
    # the caches follow the loaded state
    torch.testing.assert_close(back.add_to_lookup(look, zeros, 60), res.add_to_lookup(look, zeros, 60))
    assert set(res.state_dict()) == {"ids", "codes", "scales"}
    back.add_to_table(torch.zeros(60, 12)).sum().backward()
    assert back.scales.grad is not None and bool((back.scales.grad != 0).all())


@pytest.mark.parametrize("method", ["dpq", "tt"])
def test_a_fitted_table_with_residual_rows_is_one_table_everywhere(method):
    w = _randn(500, 16) * 0.2
    weights = torch.ones(500)
    weights[:50] = 20.0
    spec = (EmbeddingSpec("dpq", {"num_codes": 16, "num_groups": 8}) if method == "dpq"
            else EmbeddingSpec("tt", {"rank": 3}))
    kw = dict(token_weights=weights, metric=metric_root(None, 16), rotate=True, num_exact=4,
              head_mean=_randn(16, seed=4), padding_idx=7)
    plain = fit_table(w, spec, **kw)
    layer = fit_table(w, spec, residual_bytes=4000, **kw)
    assert plain.residual is None and layer.residual is not None
    ids = layer.residual.ids.long()
    assert 7 not in ids.tolist() and not set(ids.tolist()) & set(layer.exact_ids.tolist())
    assert float(weights[ids].mean()) > float(weights.mean())  # the heavy rows get them
    # more bits where they cost most: the weighted error falls
    with torch.no_grad():
        assert (weighted_error(layer.materialize(), w, weights)
                < 0.8 * weighted_error(plain.materialize(), w, weights))
    grow = layer.storage().stored_bytes - plain.storage().stored_bytes
    assert 0 < grow <= 4000
    table = layer.materialize()
    look = torch.tensor([[int(ids[0]), 7, 1], [499, int(layer.exact_ids[0]), int(ids[-1])]])
    torch.testing.assert_close(layer(look), table[look])
    h = _randn(3, 16, seed=5)
    want = h @ table.T + layer.logit_bias
    want[:, 7] = 0
    torch.testing.assert_close(layer.logits(h), want, rtol=1e-5, atol=1e-5)
    empty = FittedEmbedding.empty(fit_table(w, spec).base, True, 4, False, padding_idx=7,
                                  logit_bias=True, residual_counts=layer.residual.counts)
    empty.load_state_dict(layer.state_dict())
    torch.testing.assert_close(empty.materialize(), table)


def test_bad_residual_settings_are_refused():
    w = _randn(100, 8)
    spec = EmbeddingSpec("dpq", {"num_codes": 4, "num_groups": 4})
    with pytest.raises(ValueError, match="residual_bytes"):
        fit_table(w, spec, residual_bytes=-5)
    with pytest.raises(ValueError, match="residual_share"):
        plan_fit(1000, 16, "dpq", 4, residual_share=1.5)
    with pytest.raises(ValueError, match="residual_share"):
        plan_fit(1000, 16, "dpq", 4, exact_share=0.6, residual_share=0.5)
    with pytest.raises(ValueError, match="bits"):
        quantize_rows(w, 9)
    _, _, res = _residual(d=8)
    base = fit_table(w, spec).base
    with pytest.raises(ValueError, match="dim 8"):
        FittedEmbedding(base, residual=ResidualRows.from_rows(_randn(100, 6), torch.full((100,), 2)))
    far = ResidualRows.from_rows(_randn(200, 8), torch.full((200,), 2))
    with pytest.raises(ValueError, match=r"residual ids must lie in \[0, 100\)"):
        FittedEmbedding(base, residual=far)


def test_the_planner_gives_dpq_residual_rows_and_can_turn_them_off():
    with_res = plan_fit(49152, 576, "dpq", 10, logit_bias=True, transform_rank=32)
    without = plan_fit(49152, 576, "dpq", 10, logit_bias=True, transform_rank=32, residual_share=0)
    assert with_res.residual_bytes > 0.04 * with_res.stored_bytes and with_res.num_exact == 0
    assert without.residual_bytes == 0 and without.num_exact > 0
    for plan in (with_res, without):
        assert 10 <= plan.ratio < 10.01
    assert "residual rows" in with_res.describe()


def test_the_config_takes_a_residual_layout_and_refuses_a_bad_one():
    pytest.importorskip("transformers")
    from compemb_hf import CompressedEmbeddingConfig

    fit = {"transform": True, "exact_rows": 0, "row_order": False, "logit_bias": True}
    good = CompressedEmbeddingConfig("dpq", num_codes=16, num_groups=4,
                                     fit={**fit, "residual_rows": {"input": {"2": 5, "8": 1}}})
    again = CompressedEmbeddingConfig.from_dict(good.to_dict())
    assert again.fit["residual_rows"] == {"input": {"2": 5, "8": 1}}
    for bad in ({"decoder": {"2": 5}}, {"input": {"9": 5}}, {"input": {"2": -1}}, [1, 2]):
        with pytest.raises(ValueError, match="residual_rows"):
            CompressedEmbeddingConfig("dpq", num_codes=16, num_groups=4,
                                      fit={**fit, "residual_rows": bad})
