"""The registry, the declarative spec and the factory."""
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import compemb
from compemb.registry import get_method, register_method


def test_dense_spec_builds_an_embedding_equivalent_to_nn_embedding():
    spec = compemb.EmbeddingSpec("dense")
    layer = compemb.build_embedding(spec, 11, 6, padding_idx=2)
    assert isinstance(layer, nn.Embedding)
    assert layer.weight.shape == (11, 6) and layer.padding_idx == 2
    ids = torch.tensor([[0, 2, 10]])
    assert torch.equal(layer(ids), layer.weight[ids])
    h = torch.randn(3, 6)
    torch.testing.assert_close(layer.logits(h), h @ layer.weight.T)


def test_compress_embedding_from_dense_copies_the_table():
    w = torch.randn(7, 4)
    layer = compemb.compress_embedding(compemb.EmbeddingSpec("dense"), w)
    assert torch.equal(layer.materialize(), w)
    # the copy is independent of the source tensor
    w.add_(1.0)
    assert not torch.equal(layer.materialize(), w)


def test_spec_json_round_trip_and_flat_dict():
    spec = compemb.EmbeddingSpec.from_dict({"method": "dense"})
    assert spec.to_dict() == {"method": "dense"}
    again = compemb.EmbeddingSpec.from_json(spec.to_json())
    assert again == spec
    assert json.loads(spec.to_json()) == {"method": "dense"}


def test_specs_compare_by_their_settings_with_defaults_filled_in():
    a = compemb.EmbeddingSpec("tt", {"rank": 16})
    b = compemb.EmbeddingSpec.from_dict({"method": "tt", "rank": 16, "num_factors": 3})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != compemb.EmbeddingSpec("tt", {"rank": 8})
    assert a != compemb.EmbeddingSpec("tr", {"rank": 16})


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown method 'ttt'.*available methods: \[.*'dense'"):
        compemb.EmbeddingSpec("ttt")


def test_unknown_option_names_the_option_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rank'\] for method 'dense'"):
        compemb.EmbeddingSpec("dense", {"rank": 4})


def test_spec_without_method_key():
    with pytest.raises(ValueError, match="needs a 'method' key"):
        compemb.EmbeddingSpec.from_dict({"rank": 4})


def test_compress_embedding_rejects_a_non_table():
    with pytest.raises(ValueError, match=r"weight must be a \[num_embeddings, embedding_dim\] tensor"):
        compemb.compress_embedding(compemb.EmbeddingSpec("dense"), torch.randn(3))


@dataclass(frozen=True)
class _ScaledConfig:
    """A test method: a dense table times a fixed factor."""

    factor: float = 2.0

    def __post_init__(self):
        if self.factor <= 0:
            raise ValueError(f"factor must be > 0, got {self.factor}")


class _ScaledEmbedding(nn.Embedding):
    def __init__(self, num_embeddings, embedding_dim, factor=2.0, padding_idx=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.factor = factor

    def forward(self, ids):
        return super().forward(ids) * self.factor


def test_a_registered_method_is_reachable_through_spec_and_factory(monkeypatch):
    from compemb import registry

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # undone after the test
    register_method("test-scaled-spec", config_cls=_ScaledConfig, layer_cls=_ScaledEmbedding)
    assert "test-scaled-spec" in compemb.available_methods()
    spec = compemb.EmbeddingSpec.from_dict({"method": "test-scaled-spec", "factor": 3.0})
    assert spec.to_dict() == {"method": "test-scaled-spec", "factor": 3.0}
    layer = compemb.build_embedding(spec, 5, 2)
    assert isinstance(layer, _ScaledEmbedding) and layer.factor == 3.0
    with pytest.raises(ValueError, match="factor must be > 0"):
        compemb.EmbeddingSpec("test-scaled-spec", {"factor": -1.0})
    # registering the same name again with other classes is refused
    with pytest.raises(ValueError, match="already registered"):
        register_method("test-scaled-spec", config_cls=_ScaledConfig, layer_cls=nn.Embedding)
    assert get_method("test-scaled-spec").layer_cls is _ScaledEmbedding


def test_register_method_needs_a_dataclass_config():  # (refused before anything is registered)
    with pytest.raises(TypeError, match="must be a dataclass"):
        register_method("test-bad", config_cls=dict, layer_cls=nn.Embedding)


@pytest.mark.parametrize("method", ["tt", "tr", "dpq"])
@pytest.mark.parametrize("target", [10, 50, 200])
def test_plan_reaches_the_target_ratio_and_builds(method, target):
    spec = compemb.plan(25000, 256, method, target)
    layer = compemb.build_embedding(spec, 25000, 256)
    ratio = compemb.compression_report(layer).embedding_ratio
    assert ratio >= target
    # the JSON form rebuilds the same settings
    again = compemb.EmbeddingSpec.from_json(spec.to_json())
    assert again.to_dict() == spec.to_dict()
    assert compemb.build_embedding(again, 25000, 256).config == layer.config


def test_plan_bad_input():
    with pytest.raises(ValueError, match="target_ratio must be a number >= 1"):
        compemb.plan(100, 16, "tt", 0.5)
    with pytest.raises(ValueError, match="method 'dense' has no planner"):
        compemb.plan(100, 16, "dense", 4)


def test_report_ratio_formulas_match_methods_md():
    # TT: V*J / sum_k R[k-1]*Ik*Jk*R[k]
    tt = compemb.TTEmbedding(25000, 256, rank=16, shape=((25, 30, 40), (4, 8, 8)))
    params = 1 * 25 * 4 * 16 + 16 * 30 * 8 * 16 + 16 * 40 * 8 * 1
    assert sum(p.numel() for p in tt.parameters()) == params
    assert compemb.compression_report(tt).embedding_ratio == pytest.approx(25000 * 256 / params)
    # DPQ: 32*V*d / (V*D*log2(K) + 32*K*d), codes rounded up to whole bytes
    V, d, K, D = 25000, 256, 16, 32
    dpq = compemb.DPQEmbedding(V, d, num_codes=K, num_groups=D)
    expected = 32 * V * d / (V * D * 4 + 32 * K * d)
    assert compemb.compression_report(dpq).embedding_ratio == pytest.approx(expected, rel=1e-6)
    shared = compemb.DPQEmbedding(V, d, num_codes=K, num_groups=D, shared_subspace=True)
    expected_shared = 32 * V * d / (V * D * 4 + 32 * K * d / D)
    assert compemb.compression_report(shared).embedding_ratio == pytest.approx(expected_shared, rel=1e-6)


def test_model_report_counts_a_tied_compressed_head_once():
    model = nn.Module()
    model.embed = compemb.TTEmbedding(1000, 64, rank=8)
    model.head = compemb.OutputLayer(model.embed)
    model.untied = compemb.OutputLayer(compemb.TTEmbedding(1000, 64, rank=8), tied=False)
    rep = compemb.compression_report(model)
    assert [r.name for r in rep.rows] == ["embed", "untied.embedding"]
    assert set(model.state_dict()) == {f"embed.cores.{i}" for i in range(3)} | {
        f"untied.embedding.cores.{i}" for i in range(3)}


@pytest.mark.parametrize("method", ["dense", "tt", "tr", "dpq"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_from_dense_keeps_the_dtype_and_device_of_the_weight(method, dtype):
    options = {"tt": {"rank": 4}, "tr": {"rank": 2}, "dpq": {"num_codes": 4, "num_groups": 4},
               "dense": {}}[method]
    weight = torch.randn(60, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    layer = compemb.compress_embedding(compemb.EmbeddingSpec(method, options), weight)
    params = dict(layer.named_parameters())
    assert params and all(p.dtype == dtype and p.device == weight.device for p in params.values())
    assert layer(torch.tensor([[1, 2, 3]])).dtype == dtype
    if method == "dense":
        assert torch.equal(layer.weight, weight)
