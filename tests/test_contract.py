"""Every registered method of the core keeps the layer contract
(:class:`compemb.EmbeddingLayer`), checked by behaviour."""
import pytest
import torch
from torch import nn

import compemb
from compemb import EmbeddingLayer, LayerStorage
from compemb.registry import get_method

V, J, PAD = 48, 16, 5
#: settings that fit a 48 x 16 table; a method not listed here uses its config's defaults
OPTIONS = {"tt": {"rank": 4}, "tr": {"rank": 2}, "dpq": {"num_codes": 8, "num_groups": 4}}


def _core_methods():
    """The methods the core registers (tests may register fakes of their own)."""
    return [m for m in compemb.available_methods()
            if get_method(m).layer_cls.__module__.startswith("compemb.")]


def test_the_core_registers_the_known_methods():
    assert {"dense", "tt", "tr", "dpq"} <= set(_core_methods())


@pytest.mark.parametrize("method", _core_methods())
def test_every_registered_method_keeps_the_layer_contract(method):
    torch.manual_seed(0)
    spec = compemb.EmbeddingSpec(method, OPTIONS.get(method, {}))
    weight = torch.randn(V, J, dtype=torch.float64)
    fresh = compemb.build_embedding(spec, V, J, padding_idx=PAD)
    from_dense = compemb.compress_embedding(spec, weight, padding_idx=PAD)
    for layer in (fresh, from_dense):
        assert isinstance(layer, nn.Module) and isinstance(layer, EmbeddingLayer)
        assert (layer.num_embeddings, layer.embedding_dim, layer.padding_idx) == (V, J, PAD)
        layer.eval()
        ids = torch.tensor([[0, PAD, 7], [V - 1, 3, 3]])
        with torch.no_grad():
            table = layer.materialize()
            assert table.shape == (V, J) and torch.all(table[PAD] == 0)
            rows = layer(ids)
            assert rows.shape == (2, 3, J)
            torch.testing.assert_close(rows, table[ids].to(rows.dtype))
            hidden = torch.randn(4, J, dtype=rows.dtype)
            torch.testing.assert_close(layer.logits(hidden).to(table.dtype), hidden.to(table.dtype) @ table.T)
            inference = layer.export()
            assert isinstance(inference, nn.Module)
            torch.testing.assert_close(inference(ids), rows)
            torch.testing.assert_close(inference.logits(hidden), layer.logits(hidden))
        storage = layer.storage()
        assert storage is None if method == "dense" else isinstance(storage, LayerStorage)
        if storage is not None:
            assert (storage.num_embeddings, storage.embedding_dim) == (V, J)
        with pytest.raises(ValueError, match="embedding_dim|last dimension"):
            layer.logits(torch.randn(2, J + 1))
        with pytest.raises(IndexError, match="out of range"):
            layer(torch.tensor([V]))
        with pytest.raises(ValueError, match="integer"):
            layer(torch.tensor([1.0]))
    # from_dense: the weight's dtype, and a softmax gradient reaching the parameters
    assert all(p.dtype == torch.float64 for p in from_dense.parameters())
    from_dense.train()
    from_dense.logits(torch.randn(3, J, dtype=torch.float64)).logsumexp(-1).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in from_dense.parameters())


@pytest.mark.parametrize("method", _core_methods())
@pytest.mark.parametrize("std", [0.02, 0.3])
def test_the_init_rule_starts_every_method_at_the_hosts_std(method, std):
    """``build_embedding(..., init_std=s)``: the table of every method has std ``s`` (TT/TR
    at the Glorot std, DPQ and dense at 1 without it); the padding row stays zero."""
    torch.manual_seed(0)
    spec = compemb.EmbeddingSpec(method, OPTIONS.get(method, {}))
    layer = compemb.build_embedding(spec, 400, J, padding_idx=PAD, init_std=std)
    with torch.no_grad():
        table = layer.materialize()
    assert float(table.std()) == pytest.approx(std, rel=0.15)
    assert torch.all(table[PAD] == 0)
    with pytest.raises(ValueError, match="init_std must be > 0"):
        compemb.build_embedding(spec, 400, J, init_std=0.0)
    torch.manual_seed(1)
    layer.reset_parameters(std=std / 2)
    with torch.no_grad():
        assert float(layer.materialize().std()) == pytest.approx(std / 2, rel=0.15)
