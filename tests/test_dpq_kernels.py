"""Fast DPQ logits from codes (compemb.dpq.kernels): the native kernel, the pure-PyTorch
path and the table + GEMM path against the dense product, at odd shapes; the blocked
code layout of CodebookEmbedding; bad codes."""
import warnings

import pytest
import torch

from compemb.dpq import CodebookEmbedding, DPQEmbedding
from compemb.dpq import kernels as K
from compemb.dpq.math import pack_codes

needs_native = pytest.mark.skipif(not K.native_available(),
                                  reason=f"native kernel not built: {K._lib_error}")


def _case(V, D, Kc, s, shared=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(Kc, (V, D), generator=g)
    values = torch.randn(1 if shared else D, Kc, s, generator=g)
    table = torch.cat([values.expand(D, -1, -1)[i][codes[:, i]] for i in range(D)], dim=1)
    return codes, values, table


@pytest.mark.parametrize("V,D,Kc,s,shared", [
    (1, 1, 2, 1, False), (37, 5, 7, 3, False), (50, 4, 256, 2, True), (129, 3, 300, 2, False),
    (33, 2, 40000, 1, False), (1000, 16, 256, 4, False)])
@pytest.mark.parametrize("M", [1, 3, 4, 5, 8, 9, 17])
def test_every_path_equals_the_dense_product(V, D, Kc, s, shared, M):
    codes, values, table = _case(V, D, Kc, s, shared)
    hidden = torch.randn(M, D * s, generator=torch.Generator().manual_seed(1))
    ref = (hidden.double() @ table.double().T).float()
    blocked = K.block_codes(codes, Kc)
    assert blocked.dtype == K.codes_dtype(Kc)
    impls = ["torch", "dense", "auto"] + (["native"] if K.native_available() else [])
    for impl in impls:
        out = K.logits_from_blocked(hidden, values, blocked, V, impl=impl)
        assert out.shape == (M, V) and out.is_contiguous()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=impl)


@needs_native
@pytest.mark.parametrize("Kc", [256, 300, 40000])  # uint8, int16 and int32 codes
def test_native_one_token_path_adds_in_the_same_order(Kc):
    """One token takes the kernel's one-token path (on AVX-512, in-register permutes for
    ``uint8`` codes and a 16-lane gather per group for wider ones); it adds the groups in
    the same order as the paths for several tokens: equal bits."""
    codes, values, _ = _case(2053, 24, Kc, 2)
    blocked = K.block_codes(codes, Kc)
    hidden = torch.randn(1, 48, generator=torch.Generator().manual_seed(3))
    one = K.logits_from_blocked(hidden, values, blocked, 2053, impl="native")
    # and so do the blocks of 2, 4 and 8 tokens (sums kept in vector registers)
    for m in (2, 4, 8, 7):
        many = K.logits_from_blocked(hidden.expand(m, -1).contiguous(), values, blocked, 2053,
                                     impl="native")
        assert all(torch.equal(one[0], row) for row in many), m


@needs_native
@pytest.mark.parametrize("Kc", [1, 5, 16, 17, 32, 33, 50, 64, 65, 80, 96, 97, 113, 128, 129,
                                200, 256])
def test_native_one_token_few_codes_adds_in_the_same_order(Kc):
    """Up to 256 codes per group, one token looks its codes up by in-register permutes
    (AVX-512; one to eight register pairs, blends on bits 5, 6 and 7 of the code; the
    products of 16 / R groups held while tiles of 64 blocks pass; wider codes take the
    gather): the same bits as the pure-PyTorch path (the same
    partial dot products, added in the same order) and the dense product to rounding, at
    a V that is not a multiple of 16."""
    codes, values, table = _case(2053, 19, Kc, 3)
    blocked = K.block_codes(codes, Kc)
    hidden = torch.randn(1, 57, generator=torch.Generator().manual_seed(4))
    one = K.logits_from_blocked(hidden, values, blocked, 2053, impl="native")
    assert torch.equal(one, K.logits_from_blocked(hidden, values, blocked, 2053, impl="torch"))
    torch.testing.assert_close(one, (hidden.double() @ table.double().T).float(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M,N,d", [(1, 1000, 576), (3, 37, 5), (8, 513, 129), (2, 0, 7),
                                   (5, 40, 33), (13, 7, 48), (16, 3, 16),
                                   (1, 5, 9001)])
def test_int8_row_dots_equal_the_float_product(M, N, d):
    g = torch.Generator().manual_seed(M + N + d)
    hidden = torch.randn(M, d, generator=g)
    rows = torch.randint(-128, 128, (N, d), generator=g, dtype=torch.int8)
    out = K.int8_row_dots(hidden, rows)
    assert out.shape == (M, N) and out.dtype == torch.float32
    ref = (hidden.double() @ rows.double().T).float()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-3 * d ** 0.5)
    # a hidden state that wants its gradient takes the autograd path, with the same numbers
    h = hidden.clone().requires_grad_(True)
    out_grad = K.int8_row_dots(h, rows)
    torch.testing.assert_close(out_grad.detach(), ref, rtol=1e-5, atol=1e-3 * d ** 0.5)
    if N:
        out_grad.sum().backward()
        torch.testing.assert_close(h.grad, rows.float().sum(0).expand(M, -1))
    with pytest.raises(ValueError, match="int8 rows"):
        K.int8_row_dots(hidden, rows.float())


@needs_native
def test_native_and_torch_paths_agree_to_rounding_at_decode_size():
    codes, values, _ = _case(2053, 48, 256, 4)  # V not a multiple of 16, D*Kc > V/2
    blocked = K.block_codes(codes, 256)
    for m in (1, 8, 11):
        hidden = torch.randn(m, 192)
        a = K.logits_from_blocked(hidden, values, blocked, 2053, impl="native")
        b = K.logits_from_blocked(hidden, values, blocked, 2053, impl="torch")
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


def test_block_layout_round_trip_and_rows():
    codes, _, _ = _case(35, 3, 300, 1)
    blocked = K.block_codes(codes, 300)
    assert blocked.shape == (3, 3, 16) and blocked.dtype == torch.int16
    assert torch.equal(K.unblock_codes(blocked, 35).long(), codes)
    assert torch.equal(blocked.view(3, 3, 16)[2, :, 3:].long(), torch.zeros(3, 13).long())
    ids = torch.tensor([[34, 0], [16, 15]])
    assert torch.equal(K.blocked_rows(blocked, ids).long(), codes[ids])
    assert torch.equal(K.block_codes_traceable(codes, 300), blocked)
    assert K.codes_dtype(256) == torch.uint8 and K.codes_dtype(257) == torch.int16
    assert K.codes_dtype(32769) == torch.int32


def test_bad_codes_and_impl():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, num_codes=5\)"):
        K.block_codes(torch.tensor([[0, 5]]), 5)
    with pytest.raises(ValueError, match="holds codes up to 255.*num_codes=300"):
        K.block_codes(torch.tensor([[0, 1]], dtype=torch.uint8), 300)
    codes, values, _ = _case(5, 2, 4, 2)
    with pytest.raises(ValueError, match="impl must be"):
        K.logits_from_blocked(torch.randn(1, 4), values, K.block_codes(codes, 4), 5, impl="gpu")


@pytest.mark.parametrize("dtype,Kc", [(torch.uint8, 300), (torch.int8, 200)])
def test_codebook_codes_dtype_that_does_not_fit_num_codes(dtype, Kc):
    with pytest.raises(ValueError, match=f"codes has dtype {dtype}.*num_codes={Kc}.*torch.long"):
        CodebookEmbedding(torch.zeros(4, 2, dtype=dtype), torch.randn(2, Kc, 3))
    layer = CodebookEmbedding(torch.full((4, 2), 255, dtype=torch.uint8), torch.randn(2, 256, 3))
    assert (layer.codes() == 255).all()


def test_codebook_codes_out_of_range_in_a_checkpoint():
    """Codes 200..255 fit 8 bits but not num_codes=200: load_state_dict refuses them, and
    a buffer filled by other means (e.g. a loader that bypasses load_state_dict) fails
    at first use with a ValueError instead of reading past the values."""
    layer = CodebookEmbedding(torch.zeros(10, 3, dtype=torch.long), torch.randn(3, 200, 2))
    bad = pack_codes(torch.full((10, 3), 250), 8)
    with pytest.raises(RuntimeError, match="holds code 250, out of range for num_codes=200"):
        layer.load_state_dict({"packed_codes": bad, "values": layer.values.detach()})
    with torch.no_grad():
        layer.packed_codes.copy_(bad)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, num_codes=200\), got range \[250, 250\]"):
        layer.logits(torch.randn(1, 6))
    with pytest.raises(ValueError, match="num_codes=200"):
        layer(torch.tensor([1]))


@pytest.mark.parametrize("K_,D,shared", [(256, 6, False), (5, 4, True), (16, 4, False),
                                         (1000, 3, False)])
def test_codebook_fast_paths_equal_reference(K_, D, shared):
    """Lookup and no-grad logits (native kernel where built) equal the dense table's,
    at V not a multiple of 16; the blocked codes follow a reloaded checkpoint."""
    V, s = 83, 2
    codes, values, table = _case(V, D, K_, s, shared, seed=3)
    layer = CodebookEmbedding(codes, values, padding_idx=7)
    table[7] = 0
    idx = torch.tensor([[0, 82, 7], [16, 15, 15]])
    hidden = torch.randn(2, 5, D * s)
    with torch.no_grad():
        assert torch.equal(layer(idx), table[idx])
        torch.testing.assert_close(layer.logits(hidden), hidden @ table.T, rtol=1e-5, atol=1e-5)
        first = layer.blocked_codes()
        assert layer.blocked_codes() is first  # kept between calls
        assert "_blocked_cache" not in layer.state_dict() and all(
            "blocked" not in k for k in layer.state_dict())
        codes2, _, _ = _case(V, D, K_, s, shared, seed=4)
        layer.load_state_dict({"packed_codes": pack_codes(codes2, layer.bits),
                               "values": values})
        assert layer.blocked_codes() is not first
        table2 = torch.cat([values.expand(D, -1, -1)[i][codes2[:, i]] for i in range(D)], 1)
        table2[7] = 0
        assert torch.equal(layer(idx), table2[idx])
        torch.testing.assert_close(layer.logits(hidden), hidden @ table2.T, rtol=1e-5, atol=1e-5)


def test_dpq_eval_logits_equal_its_table():
    torch.manual_seed(0)
    layer = DPQEmbedding(77, 12, 8, 3, padding_idx=2).eval()
    hidden = torch.randn(3, 12)
    with torch.no_grad():
        ref = hidden @ layer.materialize().T
        torch.testing.assert_close(layer.logits(hidden), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.export().logits(hidden), ref, rtol=1e-5, atol=1e-5)


def test_logits_from_codes_keeps_the_layout_of_the_same_tensor():
    codes, values, table = _case(40, 2, 4, 3)
    hidden = torch.randn(2, 6)
    first = K.logits_from_codes(hidden, values, codes)
    blocked = K._blocked_memo[codes][2]
    K.logits_from_codes(hidden, values, codes)
    assert K._blocked_memo[codes][2] is blocked
    codes[0, 0] = (codes[0, 0] + 1) % 4  # in place: the version changes, the layout follows
    table = torch.cat([values[i][codes[:, i]] for i in range(2)], dim=1)
    torch.testing.assert_close(K.logits_from_codes(hidden, values, codes), hidden @ table.T)
    assert first.shape == (2, 40)


def test_no_compiler_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(K, "_tried", False)
    monkeypatch.setattr(K, "_lib", None)
    monkeypatch.setattr(K, "_lib_error", None)
    monkeypatch.setenv("COMPEMB_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert not K.native_available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not K.native_available()  # tried once only
        codes, values, table = _case(20, 2, 4, 3)
        hidden = torch.randn(1, 6)
        torch.testing.assert_close(K.logits_from_codes(hidden, values, codes), hidden @ table.T)
    with pytest.raises(RuntimeError, match="native DPQ kernel is not available"):
        K.logits_from_blocked(hidden, values, K.block_codes(codes, 4), 20, impl="native")
