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


# ---- tied=None (the default): a table of the head's own is registered; a shared one saved once

class _Default(nn.Module):
    """The default ``tied``: the head's table is the input embedding (``shared``) or its
    own; ``head_first`` registers the head before the embedding."""

    def __init__(self, shared: bool, head_first: bool = False):
        super().__init__()
        embed = compemb.TTEmbedding(40, 8, rank=2)
        table = embed if shared else compemb.TTEmbedding(40, 8, rank=2)
        if head_first:
            self.head = compemb.OutputLayer(table, bias=True)
            self.embed = embed
        else:
            self.embed = embed
            self.head = compemb.OutputLayer(table, bias=True)


def test_default_head_with_its_own_table_registers_trains_and_saves_it():
    model = _Default(shared=False)
    own = model.head.table
    assert own is not model.embed
    names = {n for n, _ in model.named_parameters()}
    assert {f"head.embedding.cores.{i}" for i in range(3)} <= names
    assert {f"head.embedding.cores.{i}" for i in range(3)} <= set(model.state_dict())
    # an optimizer over model.parameters() trains it
    before = [c.detach().clone() for c in own.cores]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.head(torch.randn(3, 8)).logsumexp(-1).sum().backward()
    opt.step()
    assert all(not torch.equal(b, c) for b, c in zip(before, own.cores))
    # and a state_dict round trip restores it
    fresh = _Default(shared=False)
    fresh.load_state_dict(model.state_dict())
    h = torch.randn(5, 8)
    torch.testing.assert_close(fresh.head(h), model.head(h))
    # a checkpoint without it is refused, naming the key
    state = model.state_dict()
    del state["head.embedding.cores.1"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*head\.embedding\.cores\.1"):
        _Default(shared=False).load_state_dict(state)


@pytest.mark.parametrize("head_first", [False, True])
def test_default_head_on_the_input_embedding_is_tied_and_loads_a_checkpoint_holding_it_once(
        head_first):
    model = _Default(shared=True, head_first=head_first)
    assert model.head.table is model.embed
    assert len(list(model.parameters())) == 4  # 3 cores + bias: listed once
    h = torch.randn(2, 8)
    model.head(h).sum().backward()
    assert all(c.grad is not None for c in model.embed.cores)
    state = model.state_dict()
    if not head_first:  # saved under the input embedding, before the head: held once
        assert set(state) == {f"embed.cores.{i}" for i in range(3)} | {"head.bias"}
    once = {k: v for k, v in state.items() if not k.startswith("head.embedding.")}
    for layout in (state, once):  # both load strictly, whatever the module order
        fresh = _Default(shared=True, head_first=head_first)
        fresh.load_state_dict(layout)
        torch.testing.assert_close(fresh.head(h), model.head(h))
        assert fresh.head.table is fresh.embed
    # the tie does not hide a table missing everywhere
    broken = {k: v for k, v in once.items() if k != "embed.cores.0"}
    with pytest.raises(RuntimeError, match="embed.cores.0"):
        _Default(shared=True, head_first=head_first).load_state_dict(broken)


def test_default_head_survives_deepcopy_and_pickling():
    import copy
    import io

    model = _Default(shared=True)
    state = model.state_dict()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert clone.head.table is clone.embed
        clone.load_state_dict(state)  # the tie is still detected in the copy


def test_tied_must_be_a_bool_or_none():
    with pytest.raises(ValueError, match="tied must be None"):
        compemb.OutputLayer(nn.Embedding(5, 3), tied="yes")


def test_a_tied_head_whose_table_is_not_in_the_model_is_reported():
    """tied=True only references the table: if the model does not register it elsewhere,
    its parameters would be lost; compression_report (and check_tied_heads) say so."""
    from compemb.output import check_tied_heads

    model = nn.Module()
    model.head = compemb.OutputLayer(compemb.TTEmbedding(40, 8, rank=2), tied=True)
    assert len(list(model.parameters())) == 0  # what the check is about
    with pytest.raises(ValueError, match=r"OutputLayer\(tied=True\) at head .*neither trained"):
        check_tied_heads(model)
    with pytest.raises(ValueError, match="tied=None"):
        compemb.compression_report(model)
    model.embed = model.head.table  # registered: fine
    check_tied_heads(model)
    assert compemb.compression_report(model).rows[0].name == "embed"
