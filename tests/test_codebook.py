"""CodebookEmbedding (the DPQ inference form) and the bit packing of its codes."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compemb.dpq import CodebookEmbedding, DPQEmbedding
from compemb.dpq.math import code_bits, pack_codes, packed_num_bytes, unpack_codes, unpack_rows


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 70), seed=st.integers(0, 2 ** 16))
def test_pack_unpack_round_trip_every_width(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(1 << bits, (n,), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, torch.arange(n)), codes)
    if n:
        pick = torch.randint(n, (9,), generator=g)
        assert torch.equal(unpack_codes(packed, bits, pick), codes[pick])


def test_pack_layout_is_low_bit_first():
    assert pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_codes(torch.tensor([5, 7, 1]), 3).tolist() == [5 | 7 << 3 | (1 & 3) << 6, 0]
    assert pack_codes(torch.tensor([0xAB, 0x01]), 8).tolist() == [0xAB, 0x01]
    assert pack_codes(torch.tensor([1000, 3]), 10).tolist() == [1000 & 255, (1000 >> 8) | 3 << 2, 0]
    assert unpack_codes(pack_codes(torch.tensor([1000, 3]), 10), 10, torch.arange(2)).tolist() == [1000, 3]


def test_unpack_rows_of_a_code_table():
    codes = torch.randint(32, (17, 6), generator=torch.Generator().manual_seed(0))
    packed = pack_codes(codes, 5)
    rows = torch.tensor([[16, 0], [3, 3]])
    assert torch.equal(unpack_rows(packed, 5, 6, rows), codes[rows])


@pytest.mark.parametrize("num_codes,bits", [(2, 1), (3, 2), (4, 2), (5, 3), (16, 4), (17, 5),
                                            (33, 6), (100, 7), (256, 8)])
def test_code_width(num_codes, bits):
    assert code_bits(num_codes) == bits
    layer = CodebookEmbedding(torch.full((11, 3), num_codes - 1), torch.randn(3, num_codes, 2))
    assert layer.bits == bits
    assert layer.packed_codes.numel() == packed_num_bytes(33, bits)
    assert (layer.codes() == num_codes - 1).all()


def _table(V=50, K=16, D=4, s=3, shared=False, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(K, (V, D), generator=g)
    values = torch.randn(1 if shared else D, K, s, generator=g)
    return CodebookEmbedding(codes, values, **kw), codes, values


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("K", [16, 5, 256])
def test_forward_materialize_and_logits(shared, K):
    layer, codes, values = _table(K=K, shared=shared)
    books = values.expand(4, -1, -1)
    table = torch.cat([books[g][codes[:, g]] for g in range(4)], dim=1)  # [V, d]
    assert torch.equal(layer.materialize(), table)
    assert torch.equal(layer.codes(), codes)
    idx = torch.randint(50, (3, 4, 5))
    assert torch.equal(layer(idx), table[idx])
    hidden = torch.randn(6, 7, 12, requires_grad=True)
    logits = layer.logits(hidden)
    ref = hidden @ table.T
    torch.testing.assert_close(logits, ref)
    assert logits.shape == (6, 7, 50) and logits.is_contiguous()
    # gradients of logits reach hidden and the values as those of the dense product
    w = torch.randn_like(ref)
    gh, gv = torch.autograd.grad((logits * w).sum(), [hidden, layer.values])
    dense = layer.materialize()
    gh_ref, gv_ref = torch.autograd.grad((hidden @ dense.T * w).sum(), [hidden, layer.values])
    torch.testing.assert_close(gh, gh_ref)
    torch.testing.assert_close(gv, gv_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("K,D,shared", [(2, 8, False), (4, 4, False), (3, 8, True), (16, 6, False),
                                        (11, 2, True), (16, 1, False)])
def test_byte_table_lookup_equals_per_code_lookup(K, D, shared):
    """1-, 2- and 4-bit codes are looked up a byte at a time; the rows (and the
    gradients of the values) are those of the per-code gather."""
    layer, codes, values = _table(V=30, K=K, D=D, s=2, shared=shared)
    books = values.expand(D, -1, -1)
    table = torch.cat([books[g][codes[:, g]] for g in range(D)], dim=1)
    idx = torch.tensor([[0, 29, 7], [7, 3, 12]])
    out = layer(idx)
    assert torch.equal(out, table[idx])
    w = torch.randn_like(out)
    (out * w).sum().backward()
    ref = values.clone().requires_grad_(True)
    ref_table = torch.cat([ref.expand(D, -1, -1)[g][codes[:, g]] for g in range(D)], dim=1)
    (ref_table[idx] * w).sum().backward()
    torch.testing.assert_close(layer.values.grad, ref.grad)


def test_logits_over_many_symbols_use_tiles():
    layer, _, _ = _table(V=2500, K=8, D=2, s=4)
    hidden = torch.randn(5, 8)
    torch.testing.assert_close(layer.logits(hidden), hidden @ layer.materialize().T)


def test_padding_row():
    layer, _, _ = _table(padding_idx=4)
    idx = torch.tensor([4, 1, 4])
    out = layer(idx)
    assert (out[0] == 0).all() and (out[2] == 0).all() and out[1].abs().sum() > 0
    assert (layer.materialize()[4] == 0).all()
    hidden = torch.randn(2, 12)
    torch.testing.assert_close(layer.logits(hidden), hidden @ layer.materialize().T)
    out.sum().backward()
    assert layer.values.grad is not None


def test_storage_counts_packed_codes_and_values():
    layer, _, _ = _table(V=1000, K=16, D=8, s=4)
    s = layer.storage()
    assert s.method == "codebook"
    assert s.stored_bytes == 1000 * 8 * 4 // 8 + 8 * 16 * 4 * 4
    assert s.dense_bytes == 1000 * 32 * 4 and s.stored_parameters == 8 * 16 * 4
    assert s.ratio == pytest.approx(32 * 1000 * 32 / (1000 * 8 * 4 + 32 * 16 * 32))


@pytest.mark.parametrize("K,shared", [(16, False), (6, True), (256, False)])
def test_state_dict_and_safetensors_round_trip(tmp_path, K, shared):
    from safetensors.torch import load_file, save_file
    layer, _, _ = _table(K=K, shared=shared, padding_idx=0)
    state = layer.state_dict()
    assert set(state) == {"packed_codes", "values"} and state["packed_codes"].dtype == torch.uint8
    save_file(state, str(tmp_path / "cb.safetensors"))
    empty = CodebookEmbedding.empty(50, 12, K, 4, shared_subspace=shared, padding_idx=0)
    assert empty.packed_codes.shape == layer.packed_codes.shape
    empty.load_state_dict(load_file(str(tmp_path / "cb.safetensors")))
    idx = torch.arange(50)
    assert torch.equal(empty(idx), layer(idx))
    copy = CodebookEmbedding.empty(50, 12, K, 4, shared_subspace=shared, padding_idx=0)
    copy.load_state_dict(layer.state_dict())
    assert torch.equal(copy.materialize(), layer.materialize())


def test_load_errors_name_shapes_and_leave_module_unchanged():
    layer, _, _ = _table(K=16)
    other = CodebookEmbedding.empty(50, 12, 32, 4)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"packed_codes has shape \(100,\) in the checkpoint but \(125,\)"):
        other.load_state_dict(layer.state_dict())
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k])
    five = CodebookEmbedding.empty(50, 12, 5, 4)  # 3 bits hold codes up to 7
    bad = {"packed_codes": pack_codes(torch.full((50, 4), 6), 3), "values": five.values.detach()}
    with pytest.raises(RuntimeError, match="holds code 6, out of range for num_codes=5"):
        five.load_state_dict(bad)
    assert (five.codes() == 0).all()
    wrong = {"packed_codes": layer.packed_codes.to(torch.int32), "values": layer.values.detach()}
    with pytest.raises(RuntimeError, match="expected torch.uint8"):
        CodebookEmbedding.empty(50, 12, 16, 4).load_state_dict(wrong)


@pytest.mark.parametrize("codes,values,match", [
    (torch.tensor([[0, 5]]), torch.randn(2, 5, 3), r"codes must lie in \[0, num_codes=5\)"),
    (torch.tensor([[0, -1]]), torch.randn(2, 5, 3), r"codes must lie in \[0, num_codes=5\)"),
    (torch.tensor([[0.0, 1.0]]), torch.randn(2, 5, 3), "codes must be an integer tensor"),
    (torch.tensor([0, 1]), torch.randn(2, 5, 3), r"codes must be an integer tensor \[num_embeddings, num_groups\]"),
    (torch.tensor([[0, 1]]), torch.randn(3, 5, 3), r"values must have shape \[num_groups=2"),
    (torch.tensor([[0, 1]]), torch.randint(5, (2, 5, 3)), "values must be a floating-point tensor"),
    (torch.tensor([[0, 0]]), torch.randn(2, 1, 3), "num_codes >= 2"),
])
def test_bad_construction(codes, values, match):
    with pytest.raises(ValueError, match=match):
        CodebookEmbedding(codes, values)


def test_bad_indices_and_bad_empty():
    layer, _, _ = _table()
    with pytest.raises(ValueError, match="integer tensor"):
        layer(torch.tensor([0.5]))
    with pytest.raises(IndexError, match="out of range"):
        layer(torch.tensor([50]))
    with pytest.raises(ValueError, match=r"num_groups=5 must divide embedding_dim=12"):
        CodebookEmbedding.empty(10, 12, 4, 5)
    with pytest.raises(ValueError, match="num_codes must be >= 2"):
        CodebookEmbedding.empty(10, 12, 1, 4)
    with pytest.raises(ValueError, match="hidden has last dimension 5"):
        layer.logits(torch.randn(2, 5))


def test_autocast_and_compile():
    layer, _, _ = _table()
    hidden = torch.randn(3, 12)
    ref = layer.logits(hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer.logits(hidden)
        rows = layer(torch.tensor([1, 2]))
    assert out.dtype == torch.float32 and rows.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    compiled = torch.compile(layer, backend="aot_eager")
    idx = torch.tensor([[3, 1], [0, 49]])
    assert torch.equal(compiled(idx), layer(idx))


def test_export_of_a_trained_layer_round_trips_through_a_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    dpq = DPQEmbedding(64, 16, 8, 4, variant="vq", padding_idx=0)
    dpq(torch.randint(64, (32,)))
    dpq.eval()
    save_file(dpq.export().state_dict(), str(tmp_path / "x.safetensors"))
    loaded = CodebookEmbedding.empty(64, 16, 8, 4, padding_idx=0)
    loaded.load_state_dict(load_file(str(tmp_path / "x.safetensors")))
    idx = torch.randint(64, (4, 9))
    assert torch.equal(loaded(idx), dpq(idx))


def test_inference_lookup_follows_changed_values():
    """The 4-bit lookup table kept between no-grad calls is rebuilt when the values
    change in place, are replaced, or change dtype."""
    layer, codes, values = _table(K=16, D=4, s=3)
    idx = torch.tensor([0, 5, 49, 5])

    def dense(v):
        return torch.cat([v[g][codes[:, g]] for g in range(4)], dim=1)[idx]

    with torch.no_grad():
        assert torch.equal(layer(idx), dense(values))
        layer.values.mul_(2)
        assert torch.equal(layer(idx), dense(2 * values))
        layer.load_state_dict({"packed_codes": layer.packed_codes, "values": values})
        assert torch.equal(layer(idx), dense(values))
        layer.values = torch.nn.Parameter(values + 1)
        assert torch.equal(layer(idx), dense(values + 1))
        layer.double()
        assert layer(idx).dtype == torch.float64
        assert torch.equal(layer(idx), dense(values + 1).double())
    out = layer(idx)  # with autograd: a fresh, differentiable table
    out.sum().backward()
    assert layer.values.grad is not None and layer.values.grad.abs().sum() > 0
