"""OutputLayer: tied and untied softmax over any embedding."""
import pytest
import torch
from torch import nn

import compemb


class _Model(nn.Module):
    def __init__(self, tied: bool):
        super().__init__()
        self.embed = nn.Embedding(9, 4)
        table = self.embed if tied else nn.Embedding(9, 4)
        self.head = compemb.OutputLayer(table, bias=True, tied=tied)


def test_tied_head_shares_the_table_and_holds_it_once_in_state_dict():
    model = _Model(tied=True)
    keys = set(model.state_dict())
    assert keys == {"embed.weight", "head.bias"}
    assert len(list(model.parameters())) == 2
    h = torch.randn(2, 3, 4)
    torch.testing.assert_close(model.head(h), h @ model.embed.weight.T + model.head.bias)
    # a gradient through the head reaches the input embedding's table
    model.head(h).sum().backward()
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0


def test_untied_head_registers_its_own_table():
    model = _Model(tied=False)
    assert set(model.state_dict()) == {"embed.weight", "head.embedding.weight", "head.bias"}
    assert model.head.table is not model.embed
    h = torch.randn(5, 4)
    torch.testing.assert_close(model.head(h), h @ model.head.embedding.weight.T + model.head.bias)


def test_tied_head_follows_the_model_to_another_dtype_and_survives_deepcopy():
    import copy

    model = _Model(tied=True)
    clone = copy.deepcopy(model)
    assert clone.head.table is clone.embed
    model.double()
    assert model.head.table.weight.dtype == torch.float64


def test_state_dict_round_trip_keeps_the_tie():
    a, b = _Model(tied=True), _Model(tied=True)
    b.load_state_dict(a.state_dict())
    h = torch.randn(4)
    torch.testing.assert_close(a.head(h), b.head(h))
    assert b.head.table is b.embed


def test_bad_input():
    with pytest.raises(TypeError, match="must be an nn.Module"):
        compemb.OutputLayer(torch.zeros(3, 3))
    head = compemb.OutputLayer(nn.Embedding(5, 3))
    with pytest.raises(ValueError, match="embedding_dim=3"):
        head(torch.randn(2, 4))
