"""Tensor-Train embedding (compemb.tt), and the layer contract shared with the ring form.

The contract tests are parametrised over TTEmbedding and TREmbedding; ring-only behaviour
(trace, TR-SVD) is in test_tr.py."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compemb.tt.math as ttm
from compemb.registry import get_method
from compemb.spec import EmbeddingSpec, build_embedding, compress_embedding
from compemb.tr import TREmbedding
from compemb.tt import TTConfig, TTEmbedding
from compemb.tt.plan import max_useful_rank, plan_tt

LAYERS = [TTEmbedding, TREmbedding]


def make(cls, v, j, rank, **kw):
    torch.manual_seed(kw.pop("seed", 0))
    return cls(v, j, rank, **kw)


# ----------------------------------------------------------------------------- lookups
@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("n,v,j", [(2, 30, 12), (2, 36, 12), (3, 100, 24), (3, 125, 8),
                                   (4, 81, 16), (4, 90, 16), (5, 40, 32), (6, 64, 64), (6, 70, 64)])
def test_forward_equals_materialize_rows(cls, n, v, j):
    """Rows from the cores (shared prefixes, de-duplicated ids) equal the table's rows, for
    2..6 factors, with padding rows (V not a product of the Ik) and without."""
    layer = make(cls, v, j, 3, num_factors=n).double()
    assert len(layer.cores) == n and math.prod(layer.shape[1]) == j
    assert math.prod(layer.shape[0]) >= v
    table = layer.materialize()
    assert table.shape == (v, j)
    ids = torch.randint(0, v, (5, 23), generator=torch.Generator().manual_seed(n))
    ids[0, :3] = torch.tensor([0, v - 1, v - 1])
    out = layer(ids)
    assert out.shape == (5, 23, j) and out.dtype == torch.float64
    torch.testing.assert_close(out, table[ids], rtol=0, atol=1e-12)
    # the per-position path used under torch.compile gives the same rows
    rows = ttm.gather_rows(list(layer.cores), ids.reshape(-1), layer.shape[0], share=False)
    torch.testing.assert_close(rows.view(5, 23, j), table[ids], rtol=0, atol=1e-12)


def test_element_is_the_core_product():
    """W[i, j] = G1[i1, j1] ... GN[iN, jN] with i split row-major and j column-major."""
    layer = make(TTEmbedding, 60, 24, [2, 3], shape=((3, 4, 5), (2, 3, 4))).double()
    table = layer.materialize()
    for i, j in [(0, 0), (59, 23), (17, 11), (42, 5)]:
        di = [i // 20, (i // 5) % 4, i % 5]
        dj = [j % 2, (j // 2) % 3, j // 6]
        assert [int(d) for d in ttm.index_digits(torch.tensor(i), (3, 4, 5))] == di
        prod = torch.ones(1, 1, dtype=torch.float64)
        for k, core in enumerate(layer.cores):
            prod = prod @ core[:, di[k], dj[k], :]
        assert abs(prod.item() - table[i, j].item()) < 1e-12


def test_duplicates_and_prefix_paths_agree():
    """Zipf-like batches (many duplicates, few prefixes) and uniform ones (dense middle level)
    give the table's rows."""
    layer = make(TTEmbedding, 4000, 64, 8, shape=((16, 16, 16), (4, 4, 4))).double()
    table = layer.materialize()
    g = torch.Generator().manual_seed(0)
    weights = 1.0 / torch.arange(1, 4001, dtype=torch.float64)
    for ids in (torch.multinomial(weights, 3000, True, generator=g),
                torch.randint(0, 4000, (3000,), generator=g), torch.tensor([7])):
        torch.testing.assert_close(layer(ids), table[ids], rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_gradcheck(cls, n):
    """float64 gradients of forward (with duplicates and a padding row), materialize and
    both logits paths, through every core."""
    j = 2 ** n
    layer = make(cls, 20, j, 2, num_factors=n, padding_idx=3).double()
    ids = torch.tensor([[0, 3, 19, 5], [5, 5, 11, 3]])
    hidden = torch.randn(3, j, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    names = [f"cores.{k}" for k in range(n)]

    def f(*cores):
        return torch.func.functional_call(layer, dict(zip(names, cores)), (ids,))

    cores = tuple(c.detach().clone().requires_grad_() for c in layer.cores)
    assert torch.autograd.gradcheck(f, cores, fast_mode=True)

    def g(*cores):
        return (ttm.full_table(cores, 20),
                ttm.logits_through_cores(cores, hidden, 20))

    assert torch.autograd.gradcheck(g, cores, fast_mode=True)
    out = layer(ids)
    out.sum().backward()
    assert all(c.grad is not None for c in layer.cores)


# ----------------------------------------------------------------------------- init
@pytest.mark.parametrize("cls,rank", [(TTEmbedding, 16), (TTEmbedding, [4, 32]),
                                      (TTEmbedding, [8, 8, 16]), (TREmbedding, 6)])
def test_init_variance_is_glorot(cls, rank):
    """Materialised table: mean 0, variance 2/(V+J) within 10%, averaged over instances,
    for equal and unequal ranks (paper eq. 2, generalised)."""
    v, j = 1000, 64
    n = len(rank) + (0 if cls is TREmbedding else 1) if isinstance(rank, list) else 3
    variances, means = [], []
    for seed in range(8):
        table = make(cls, v, j, rank, num_factors=n, seed=seed).materialize().detach()
        variances.append(table.var().item())
        means.append(table.mean().item())
    expected = 2.0 / (v + j)
    assert abs(sum(variances) / len(variances) / expected - 1) < 0.10
    assert abs(sum(means) / len(means)) < 0.1 * math.sqrt(expected)


def test_reset_parameters_redraws_at_the_same_scale():
    layer = make(TTEmbedding, 1000, 64, 16)
    before = layer.cores[1].detach().clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.cores[1])
    std = ttm.init_std(1000, 64, layer.ranks, ring=False)
    assert abs(layer.cores[1].std().item() / std - 1) < 0.05


def test_init_std_formula():
    # equal ranks: the paper's (sigma^2 / R^(N-1))^(1/N) for the variance of a core element
    s = ttm.init_std(1000, 64, (1, 16, 16, 1), ring=False)
    assert s ** 2 == pytest.approx((2 / 1064 / 16 ** 2) ** (1 / 3))


# ----------------------------------------------------------------------------- TT-SVD
def _full_tt_ranks(shape):
    modes = [i * j for i, j in zip(*shape)]
    return [min(math.prod(modes[: k + 1]), math.prod(modes[k + 1:])) for k in range(len(modes) - 1)]


@pytest.mark.parametrize("shape,v", [(((2, 3, 5), (2, 2, 2)), 30), (((3, 4), (4, 2)), 10),
                                     (((2, 2, 3, 3), (2, 2, 1, 2)), 33)])
def test_tt_svd_full_rank_is_exact(shape, v):
    j = math.prod(shape[1])
    weight = torch.randn(v, j, dtype=torch.float64)
    layer = TTEmbedding.from_dense(weight, _full_tt_ranks(shape), shape=shape)
    assert layer.cores[0].dtype == torch.float64
    torch.testing.assert_close(layer.materialize(), weight, rtol=0, atol=1e-10)
    # float32 too, to float error
    layer32 = TTEmbedding.from_dense(weight.float(), _full_tt_ranks(shape), shape=shape)
    torch.testing.assert_close(layer32.materialize(), weight.float(), rtol=0, atol=1e-4)


def test_tt_svd_error_within_oseledets_bounds():
    """Truncated: max_k e_k <= ||W - TT|| <= sqrt(sum_k e_k^2), e_k the best rank-R_k error
    of the k-th unfolding (Oseledets 2011, Thm 2.2, and the rank of a TT unfolding)."""
    shape = ((5, 6, 8), (2, 4, 4))
    weight = torch.randn(240, 32, dtype=torch.float64)
    ranks = [5, 12]
    layer = TTEmbedding.from_dense(weight, ranks, shape=shape).double()
    err = (layer.materialize() - weight).norm().item()
    modes = ttm.to_modes(weight, shape)
    sizes = [10, 24, 32]
    e = []
    for k, r in enumerate(ranks):
        sv = torch.linalg.svdvals(modes.reshape(math.prod(sizes[: k + 1]), -1))
        e.append(sv[r:].pow(2).sum().sqrt().item())
    assert max(e) - 1e-9 <= err <= math.sqrt(sum(x * x for x in e)) + 1e-9


def test_tt_svd_against_truncated_svd_at_equal_parameters():
    """Neither format dominates; each wins on tables with its own structure, at the same
    number of stored parameters: a TT-structured table is recovered by TT-SVD and not by
    a truncated SVD of that size (its matrix rank is high); a rank-2 matrix is recovered by
    the SVD and not by TT-SVD (reshaped, a rank-1 matrix has TT-ranks up to min(Ik)*min(Jk))."""
    shape = ((10, 10, 10), (4, 4, 4))
    v, j = 1000, 64

    def svd_error(weight, params):
        k = params // (v + j)
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        return (weight - (u[:, :k] * s[:k]) @ vh[:k]).norm().item() / weight.norm().item()

    def tt_error(weight, rank):
        layer = TTEmbedding.from_dense(weight, rank, shape=shape).double()
        params = layer.storage().stored_parameters
        return (layer.materialize() - weight).norm().item() / weight.norm().item(), params

    tt_table = make(TTEmbedding, v, j, 16, shape=shape, seed=3).double().materialize().detach()
    tt_err, params = tt_error(tt_table, 16)
    assert params // (v + j) >= 10  # the SVD gets rank 10 for the same storage
    assert tt_err < 1e-8 and svd_error(tt_table, params) > 0.3

    g = torch.Generator().manual_seed(0)
    low = torch.randn(v, 2, dtype=torch.float64, generator=g) @ torch.randn(2, j, dtype=torch.float64, generator=g)
    tt_err, params = tt_error(low, 8)
    assert params // (v + j) >= 2
    assert svd_error(low, params) < 1e-10 and tt_err > 0.1


def test_from_dense_zeroes_padding_row_and_keeps_device_dtype():
    weight = torch.randn(30, 8)
    layer = TTEmbedding.from_dense(weight, [4, 10], shape=((2, 3, 5), (2, 2, 2)), padding_idx=4)
    expected = weight.clone()
    expected[4] = 0
    torch.testing.assert_close(layer.materialize(), expected, rtol=0, atol=1e-4)
    assert layer.cores[0].dtype == torch.float32 and layer.padding_idx == 4


# ----------------------------------------------------------------------------- logits
@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("batch", [1, 3, 64, 512])
def test_logits_equal_dense_product(cls, batch):
    layer = make(cls, 500, 32, 4, shape=((8, 8, 8), (2, 4, 4)), padding_idx=7).double()
    hidden = torch.randn(batch, 32, dtype=torch.float64)
    expected = hidden @ layer.materialize().T
    torch.testing.assert_close(layer.logits(hidden), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer._logits_through_cores(hidden), expected, rtol=1e-10, atol=1e-10)
    assert (layer.logits(hidden)[:, 7] == 0).all()
    # 3-d hidden states keep their leading dims
    assert layer.logits(hidden.view(batch, 1, 32)).shape == (batch, 1, 500)


def test_logits_picks_the_cheaper_path():
    shape, ranks = ((32, 32, 32), (8, 8, 16)), (1, 16, 16, 1)
    dense1, through1 = ttm.logits_costs(shape, ranks, 1)
    dense_big, through_big = ttm.logits_costs(shape, ranks, 4096)
    assert 2 * through1 < dense1  # one hidden vector: contract through the cores
    assert 2 * through_big >= dense_big  # a big batch: build the table once, one GEMM
    dense64, through64 = ttm.logits_costs(shape, (1, 64, 64, 1), 4096)
    assert through64 > dense64


# ----------------------------------------------------------------------------- padding
@pytest.mark.parametrize("cls", [TTEmbedding, TREmbedding])
def test_core_gradients_have_the_cores_strides(cls):
    """DistributedDataParallel compares a gradient's strides with its parameter's literally
    (also on size-1 dimensions, a TT's end ranks) and warns and copies when they differ."""
    layer = cls(1000, 64, 4)
    arriving = []  # what reaches the parameter (and DDP's hooks) before it is accumulated
    for core in layer.cores:
        core.register_hook(lambda grad, core=core: arriving.append((core.stride(), grad.stride())))
    for loss in (layer(torch.randint(0, 1000, (50,))).sum(), layer.logits(torch.randn(3000, 64)).sum(),
                 layer.logits(torch.randn(2, 64)).sum(), layer.materialize().sum()):
        loss.backward()
    assert len(arriving) == 4 * len(layer.cores)
    assert all(param == grad for param, grad in arriving), arriving


@pytest.mark.parametrize("cls", LAYERS)
def test_padding_row_is_zero_and_gets_no_gradient(cls):
    layer = make(cls, 50, 8, 3, padding_idx=0)
    ids = torch.tensor([0, 4, 0, 9, 4])
    out = layer(ids)
    assert (out[[0, 2]] == 0).all() and (out[1] != 0).any()
    assert (layer.materialize()[0] == 0).all()
    out.pow(2).sum().backward()
    with_pad = [c.grad.clone() for c in layer.cores]
    layer.zero_grad()
    layer(torch.tensor([4, 9, 4])).pow(2).sum().backward()
    for a, b in zip(with_pad, layer.cores):
        torch.testing.assert_close(a, b.grad)
    # only padding ids: zero rows and zero gradient
    layer.zero_grad()
    layer(torch.tensor([0, 0])).sum().backward()
    assert all((c.grad == 0).all() for c in layer.cores)
    assert make(cls, 50, 8, 3, padding_idx=-1).padding_idx == 49


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(num_embeddings=1000, embedding_dim=257, rank=8), r"embedding_dim=257 .*e\.g\. 256"),
    (dict(num_embeddings=1000, embedding_dim=12, rank=8, num_factors=4),
     r"embedding_dim=12 .*num_factors in \[2, 3\]"),
    (dict(num_embeddings=1000, embedding_dim=64, rank=0), r"rank must be >= 1"),
    (dict(num_embeddings=1000, embedding_dim=64, rank=[4, -1]), r"rank must be >= 1"),
    (dict(num_embeddings=1000, embedding_dim=64, rank=[4, 4, 4]), r"rank has 3 entries .*2 inner ranks"),
    (dict(num_embeddings=1000, embedding_dim=64, rank=2.5), r"rank must be an int or a list"),
    (dict(num_embeddings=1000, embedding_dim=64, rank=4, shape=((10, 10, 9), (4, 4, 4))),
     r"multiply to 900 < num_embeddings=1000"),
    (dict(num_embeddings=1000, embedding_dim=64, rank=4, shape=((10, 10, 10), (4, 4, 2))),
     r"multiply to 32 but embedding_dim=64"),
    (dict(num_embeddings=1000, embedding_dim=64, rank=4, shape=((10, 100), (4, 4, 4))),
     r"shape must be"),
    (dict(num_embeddings=1000, embedding_dim=64, rank=4, num_factors=1), r"num_factors must be"),
    (dict(num_embeddings=1000, embedding_dim=64, rank=4, shape=((10, 100), (8, 8)), num_factors=3),
     r"num_factors=3 disagrees with shape .* 2 factors; leave num_factors out .* set it to 2"),
    (dict(num_embeddings=1000, embedding_dim=64, rank=4, padding_idx=1000), r"padding_idx must be"),
    (dict(num_embeddings=0, embedding_dim=64, rank=4), r"num_embeddings must be"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TTEmbedding(**kwargs)


def test_bad_indices():
    layer = make(TTEmbedding, 50, 8, 3)
    with pytest.raises(ValueError, match="integer tensor"):
        layer(torch.tensor([1.0, 2.0]))
    with pytest.raises(IndexError, match="out of range"):
        layer(torch.tensor([1, 50]))
    with pytest.raises(IndexError, match="out of range"):
        layer(torch.tensor([-1]))
    assert layer(torch.tensor([1, 2], dtype=torch.int32)).shape == (2, 8)
    assert layer(torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3, 8)
    with pytest.raises(ValueError, match="embedding_dim=8"):
        layer.logits(torch.randn(2, 9))
    with pytest.raises(ValueError, match="weight must be"):
        TTEmbedding.from_dense(torch.randn(10), 4)


@pytest.mark.parametrize("cls", LAYERS)
def test_load_state_dict_of_another_shape_names_both(cls):
    a = make(cls, 100, 16, 4)
    b = make(cls, 100, 16, 6)
    before = [c.detach().clone() for c in b.cores]
    with pytest.raises(RuntimeError) as info:
        b.load_state_dict(a.state_dict())
    msg = str(info.value)
    assert str(tuple(a.cores[1].shape)) in msg and str(tuple(b.cores[1].shape)) in msg
    for x, y in zip(before, b.cores):  # nothing half-loaded
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("cls", LAYERS)
def test_state_dict_and_safetensors_round_trip(cls, tmp_path):
    from safetensors.torch import load_file, save_file

    a = make(cls, 300, 16, [3, 5] if cls is TTEmbedding else [2, 3, 4], padding_idx=2)
    b = make(cls, 300, 16, [3, 5] if cls is TTEmbedding else [2, 3, 4], padding_idx=2, seed=1)
    ids = torch.randint(0, 300, (40,))
    assert not torch.equal(a(ids), b(ids))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(ids), b(ids))
    save_file(a.state_dict(), str(tmp_path / "tt.safetensors"))
    c = make(cls, 300, 16, [3, 5] if cls is TTEmbedding else [2, 3, 4], padding_idx=2, seed=2)
    c.load_state_dict(load_file(str(tmp_path / "tt.safetensors")))
    assert torch.equal(a(ids), c(ids))
    assert list(a.state_dict()) == [f"cores.{k}" for k in range(3)]


@pytest.mark.parametrize("cls", LAYERS)
def test_autocast_bf16_close_to_fp32(cls):
    layer = make(cls, 1000, 64, 8)
    ids = torch.randint(0, 1000, (4, 30))
    hidden = torch.randn(30, 64)
    ref, ref_logits = layer(ids), layer.logits(hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, logits = layer(ids), layer.logits(hidden)
        small = layer.logits(hidden[:1])
    assert out.dtype == torch.float32  # products accumulated in float32, like nn.Embedding
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert logits.dtype == torch.bfloat16 and small.dtype == torch.bfloat16
    scale = ref_logits.abs().max()
    assert (logits.float() - ref_logits).abs().max() < 2e-2 * scale
    assert (small.float() - ref_logits[:1]).abs().max() < 2e-2 * scale
    # bf16 parameters: computed in float32, returned in bf16
    half = make(cls, 1000, 64, 8).to(torch.bfloat16)
    assert half(ids).dtype == torch.bfloat16


def test_torch_compile_matches_eager():
    layer = make(TTEmbedding, 200, 16, 4, padding_idx=1)
    ids = torch.tensor([[1, 5, 5, 199], [0, 1, 77, 3]])
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(ids)
    torch.testing.assert_close(out, layer(ids))
    out.sum().backward()
    assert all(c.grad is not None for c in layer.cores)


# ----------------------------------------------------------------------------- properties
@settings(max_examples=12, deadline=None)
@given(n=st.integers(2, 5), v=st.integers(2, 300), log_j=st.integers(2, 6), ring=st.booleans(),
       data=st.data())
def test_property_random_shapes_and_ranks(n, v, log_j, ring, data):
    j = 2 ** max(log_j, n)
    cls = TREmbedding if ring else TTEmbedding
    ranks = data.draw(st.lists(st.integers(1, 4), min_size=n if ring else n - 1,
                               max_size=n if ring else n - 1))
    layer = make(cls, v, j, ranks, num_factors=n).double()
    assert layer.ranks == (tuple(ranks) + (ranks[0],) if ring else (1, *ranks, 1))
    for k, core in enumerate(layer.cores):
        assert tuple(core.shape) == (layer.ranks[k], layer.shape[0][k], layer.shape[1][k],
                                     layer.ranks[k + 1])
    ids = torch.tensor(data.draw(st.lists(st.integers(0, v - 1), min_size=1, max_size=40)))
    table = layer.materialize()
    torch.testing.assert_close(layer(ids), table[ids], rtol=0, atol=1e-12)
    hidden = torch.randn(2, j, dtype=torch.float64)
    torch.testing.assert_close(layer._logits_through_cores(hidden), hidden @ table.T,
                               rtol=1e-9, atol=1e-9)
    storage = layer.storage()
    assert storage.stored_parameters == ttm.num_parameters(layer.shape, layer.ranks)


# ----------------------------------------------------------------------------- shapes, report, registry
def test_automatic_shape():
    assert ttm.choose_shape(32768, 1024, 3) == ((32, 32, 32), (8, 8, 16))
    rows, cols = ttm.choose_shape(25000, 256, 3)
    assert cols == (4, 8, 8) and math.prod(rows) >= 25000
    assert max(rows) / min(rows) <= 1.5 and math.prod(rows) - 25000 < 250
    assert ttm.choose_shape(10, 64, 6) == ((2,) * 6, (2,) * 6)


def test_storage_and_ratio():
    layer = TTEmbedding(25000, 256, 16, shape=((25, 30, 40), (4, 8, 8)))
    s = layer.storage()
    params = 1 * 25 * 4 * 16 + 16 * 30 * 8 * 16 + 16 * 40 * 8 * 1
    assert (s.method, s.shape, s.stored_parameters) == ("tt", "(25,30,40)x(4,8,8) r=16", params)
    assert s.ratio == pytest.approx(25000 * 256 / params)
    assert TTEmbedding(100, 16, [2, 5]).storage().shape.endswith("r=(2,5)")


def test_registry_spec_and_plan():
    spec = EmbeddingSpec.from_json(EmbeddingSpec("tt", {"rank": [4, 6], "shape": [[5, 5, 4], [2, 2, 4]]}).to_json())
    layer = build_embedding(spec, 100, 16, padding_idx=0)
    assert isinstance(layer, TTEmbedding) and layer.ranks == (1, 4, 6, 1) and layer.padding_idx == 0
    weight = torch.randn(100, 16)
    assert isinstance(compress_embedding(spec, weight), TTEmbedding)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        EmbeddingSpec("tt", {"rank": 0})
    assert get_method("tt").config_cls is TTConfig
    for target in (5, 50, 500):
        config = plan_tt(32768, 1024, target)
        layer = get_method("tt").build(config, 32768, 1024)
        assert layer.storage().ratio >= target
        bigger = TTEmbedding(32768, 1024, config.rank + 1, shape=config.shape)
        assert bigger.storage().ratio < target or config.rank == max_useful_rank(config.shape)
    with pytest.raises(ValueError, match="cannot be reached"):
        plan_tt(100, 16, 1e6)


@pytest.mark.parametrize("cls", LAYERS)
def test_rescale_sets_the_table_std_and_keeps_the_init_structure(cls):
    layer = make(cls, 500, 32, 4, padding_idx=3)
    before = [c.detach().clone() for c in layer.cores]
    layer.rescale_(0.05)
    with torch.no_grad():
        table = layer.materialize()
    assert float(table.std()) == pytest.approx(0.05, rel=1e-5)
    assert table[3].abs().max() == 0
    ratios = [float((c / b).mean()) for c, b in zip(layer.cores, before)]
    for c, b, r in zip(layer.cores, before, ratios):
        torch.testing.assert_close(c.detach(), b * r)  # one factor per core ...
    assert ratios == pytest.approx([ratios[0]] * len(ratios))  # ... the same for all
    with pytest.raises(ValueError, match="std must be > 0"):
        layer.rescale_(0.0)


def test_num_factors_comes_from_the_shape_or_defaults_to_three():
    from compemb import TRConfig, TTConfig

    assert TTConfig(rank=4).num_factors == 3
    assert TTConfig(rank=4, shape=((10, 100), (8, 8))).num_factors == 2
    assert TTConfig(rank=4, shape=((10, 100), (8, 8)), num_factors=2).num_factors == 2
    with pytest.raises(ValueError, match="num_factors=4 disagrees with shape"):
        TRConfig(rank=4, shape=((10, 10, 10), (4, 4, 4)), num_factors=4)
    assert TTEmbedding(1000, 64, rank=4, shape=((10, 100), (8, 8))).config.num_factors == 2
