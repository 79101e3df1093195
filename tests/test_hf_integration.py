"""compemb_hf: config, surgery, save/load round trips for every supported family."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers as tf
from safetensors import safe_open

import compemb
import compemb_hf
from compemb_hf import CompressedEmbeddingConfig as Cfg
from compemb_hf.testing import FAMILIES, dummy_inputs, tiny_model

METHODS = {
    "tt": dict(method="tt", rank=4),
    "dpq-sx": dict(method="dpq", num_codes=4, num_groups=4, variant="sx"),
    "dpq-vq": dict(method="dpq", num_codes=4, num_groups=4, variant="vq"),
}
if "tr" in compemb.available_methods():
    METHODS["tr"] = dict(method="tr", rank=2)


def _keys(path):
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _logits(model, family):
    with torch.no_grad():
        return model(**dummy_inputs(family)).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_round_trip(family, method, tmp_path):
    torch.manual_seed(0)
    model = tiny_model(family).eval()
    table = model.get_input_embeddings().weight
    compemb_hf.compress(model, Cfg(**METHODS[method]))
    layer = model.get_input_embeddings()
    layer = getattr(layer, "embedding", layer)  # BART's scaled wrapper
    assert type(layer).__module__.startswith("compemb.")
    head = model.get_output_embeddings()
    if head is not None:  # tied: the head reads the input embedding's own table
        assert head.table is layer
    model.tie_weights()  # must not raise, nor undo the compression
    assert model.get_input_embeddings() is not None and head is model.get_output_embeddings()
    before = _logits(model, family)
    model.save_pretrained(tmp_path)
    keys = _keys(tmp_path)
    # only the compressed table is stored: no dense V x J tensor, no duplicate of it
    assert not any(shape == tuple(table.shape) for k, shape in keys.items()
                   if "position" not in k and not k.endswith("query")), keys
    prefixes = {k.rsplit(".", 1)[0] for k in keys if k.endswith(("cores.0", "values"))}
    assert len(prefixes) == 1, prefixes  # one copy of the shared / tied table
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert torch.equal(_logits(loaded, family), before)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["method"] == METHODS[method]["method"] and "quant_method" not in config


@pytest.mark.parametrize("family", ["gpt2", "t5", "bart"])
def test_dpq_codebook_form_stores_codes_in_fewest_bits(family, tmp_path):
    torch.manual_seed(0)
    model = tiny_model(family).eval()
    compemb_hf.compress(model, Cfg("dpq", num_codes=4, num_groups=4))
    before = _logits(model, family)
    compemb_hf.export_codebooks(model)
    assert torch.allclose(_logits(model, family), before, atol=1e-6)
    model.save_pretrained(tmp_path)
    codes = {k: s for k, s in _keys(tmp_path).items() if k.endswith("packed_codes")}
    # 60 symbols x 4 groups x 2 bits = 480 bits = 60 bytes, stored once
    assert list(codes.values()) == [(60,)], codes
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(codes))).dtype == torch.uint8
        assert not any(k.endswith("query") for k in f.keys())
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.allclose(_logits(loaded, family), before, atol=1e-6)


def _save_dense(family, path):
    torch.manual_seed(0)
    model = tiny_model(family).eval()
    model.save_pretrained(path)
    return model


def test_from_pretrained_routes_give_the_same_model(tmp_path):
    dense = _save_dense("gpt2", tmp_path)
    cfg = Cfg("tt", rank=4)
    reference = compemb_hf.compress(tiny_model("gpt2").eval(), cfg)
    reference.load_state_dict(compemb_hf.compress(dense, cfg).state_dict())
    expected = _logits(reference, "gpt2")
    routes = [
        lambda: tf.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=cfg),
        lambda: tf.AutoModelForCausalLM.from_pretrained(tmp_path, compressed_embedding=cfg),
        lambda: tf.GPT2LMHeadModel.from_pretrained(tmp_path, compressed_embedding=cfg),
        lambda: tf.AutoModel.from_pretrained(tmp_path, compressed_embedding=cfg.to_dict()),
    ]
    for i, route in enumerate(routes):
        model = route()
        assert compemb_hf.is_compressed(model)
        if i < 3:
            assert torch.allclose(_logits(model, "gpt2"), expected, atol=1e-6)


def test_pretrained_init_reproduces_the_dense_model_at_full_rank(tmp_path):
    dense = _save_dense("bert-mlm", tmp_path)
    # TT of a 60 x 16 table with shape (3,4,5)x(2,2,4): ranks (6, 20) are full
    model = tf.AutoModelForMaskedLM.from_pretrained(
        tmp_path, compressed_embedding=Cfg("tt", rank=32, shape=[[3, 4, 5], [2, 2, 4]]))
    assert torch.allclose(_logits(model, "bert-mlm"), _logits(dense, "bert-mlm"), atol=1e-4)
    low = tf.AutoModelForMaskedLM.from_pretrained(
        tmp_path, compressed_embedding=Cfg("tt", rank=2, shape=[[3, 4, 5], [2, 2, 4]]))
    assert not torch.allclose(_logits(low, "bert-mlm"), _logits(dense, "bert-mlm"), atol=1e-2)
    rand = tf.AutoModelForMaskedLM.from_pretrained(
        tmp_path, compressed_embedding=Cfg("tt", rank=16, shape=[[3, 4, 5], [2, 2, 4]],
                                           init="random"))
    assert not torch.allclose(_logits(rand, "bert-mlm"), _logits(dense, "bert-mlm"), atol=1e-2)


@pytest.mark.parametrize("method", ["tt", "tr", "dense"])
def test_random_tables_of_every_method_start_at_the_std_of_the_table_they_replace(method):
    """The core's init rule: TT/TR (Glorot before) and dense (N(0, 1) before) too."""
    torch.manual_seed(0)
    model = tiny_model("bert-mlm")
    std = model.get_input_embeddings().weight.std().item()
    options = {"tt": dict(rank=4), "tr": dict(rank=2), "dense": {}}[method]
    compemb_hf.compress(model, Cfg(method, init="random", **options))
    table = model.get_input_embeddings()
    with torch.no_grad():
        assert table.materialize().std().item() == pytest.approx(std, rel=0.05)


@pytest.mark.parametrize("variant", ["sx", "vq"])
def test_random_dpq_tables_start_at_the_scale_of_the_table_they_replace(variant):
    torch.manual_seed(0)
    model = tiny_model("bert-mlm")
    std = model.get_input_embeddings().weight.std().item()  # BERT: initializer_range 0.02
    compemb_hf.compress(model, Cfg("dpq", num_codes=4, num_groups=4, variant=variant, init="random"))
    table = model.get_input_embeddings()
    rows = table(torch.arange(table.num_embeddings)).detach()
    assert 0.5 * std < rows.std().item() < 2 * std, (rows.std().item(), std)
    for p in (table.query, table.values):
        assert 0.8 * std < p.std().item() < 1.25 * std


def test_untied_and_dense_heads(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("gpt2").eval()
    compemb_hf.compress(model, Cfg("tt", rank=4, output="untied"))
    head = model.get_output_embeddings()
    assert not head.tied and head.table is not model.get_input_embeddings()
    before = _logits(model, "gpt2")
    model.tie_weights()
    assert head.table is not model.get_input_embeddings()
    model.save_pretrained(tmp_path / "untied")
    assert sum(k.endswith("cores.0") for k in _keys(tmp_path / "untied")) == 2
    loaded, info = type(model).from_pretrained(tmp_path / "untied", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(_logits(loaded, "gpt2"), before)

    model = tiny_model("gpt2").eval()
    compemb_hf.compress(model, Cfg("tt", rank=4, output="dense"))
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)
    before = _logits(model, "gpt2")
    model.save_pretrained(tmp_path / "dense")
    assert _keys(tmp_path / "dense")["lm_head.weight"] == (60, 16)
    loaded, info = type(model).from_pretrained(tmp_path / "dense", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(_logits(loaded, "gpt2"), before)


def test_untied_model_defaults_to_an_untied_head():
    model = tiny_model("llama", tie_word_embeddings=False)
    compemb_hf.compress(model, Cfg("tt", rank=4))
    assert not model.get_output_embeddings().tied
    with pytest.raises(ValueError, match="output='untied'"):
        compemb_hf.compress(tiny_model("llama", tie_word_embeddings=False),
                            Cfg("tt", rank=4, output="tied"))


def test_report_counts_the_compressed_tables():
    model = tiny_model("t5")
    dense_bytes = sum(p.numel() * 4 for p in model.parameters())
    compemb_hf.compress(model, Cfg("tt", rank=4))
    report = compemb.compression_report(model)
    assert len(report.rows) == 1 and report.rows[0].storage.num_embeddings == 60
    assert report.model_dense_bytes == dense_bytes
    assert report.model_stored_bytes < dense_bytes


def test_loading_without_import_fails_loudly(tmp_path):
    model = tiny_model("gpt2")
    compemb_hf.compress(model, Cfg("tt", rank=4))
    model.save_pretrained(tmp_path)
    code = ("import transformers as tf; "
            f"tf.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode != 0
    assert "quant_method" in proc.stderr
    note = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["load_with"]
    assert "import compemb_hf" in note


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(method="nope"), "available methods"),
    (dict(method="tt", rank=0), "rank"),
    (dict(method="tt", rank=4, num_codes=4), "num_codes"),
    (dict(method="dpq", num_codes=1), "num_codes"),
    (dict(method="tt", rank=4, output="shared"), "output must be one of"),
    (dict(method="tt", rank=4, init="svd"), "init must be one of"),
    (dict(method="tt", rank=4, modules="embed"), "modules must be"),
    (dict(method="tt", rank=4, form="codebook"), "form='codebook'"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Cfg(**kwargs)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [type(m) for m in model.modules()])


def _unchanged(model, snap):
    state, types = snap
    now = model.state_dict()
    return (set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)
            and [type(m) for m in model.modules()] == types)


@pytest.mark.parametrize("cfg, match", [
    (Cfg("tt", rank=4, modules=["transformer.nope"]), "'transformer.nope' is not a module"),
    (Cfg("tt", rank=4, modules=["transformer.h.0.attn"]), "not an nn.Embedding"),
    (Cfg("dpq", num_codes=4, num_groups=5), "num_groups"),
    (Cfg("tt", rank=4, shape=[[3, 4, 5], [2, 2, 3]]), "16|shape"),
])
def test_failed_compress_leaves_the_model_unchanged(cfg, match):
    model = tiny_model("gpt2")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        compemb_hf.compress(model, cfg)
    assert _unchanged(model, snap)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_compress_named_modules_and_twice():
    model = tiny_model("gpt2")
    compemb_hf.compress(model, Cfg("tt", rank=4, modules=["transformer.wpe"], output="dense"))
    assert type(model.transformer.wpe).__module__.startswith("compemb.")
    assert isinstance(model.transformer.wte, torch.nn.Embedding)
    with pytest.raises(ValueError, match="already compressed"):
        compemb_hf.compress(model, Cfg("tt", rank=4))


def test_model_without_input_embedding():
    class NoEmbedding(tf.PreTrainedModel):
        config_class = tf.PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.linear = torch.nn.Linear(4, 4)
            self.post_init()

    model = NoEmbedding(tf.PretrainedConfig())
    with pytest.raises(ValueError, match="has no input embedding"):
        compemb_hf.compress(model, Cfg("tt", rank=4))


def test_resize_token_embeddings_is_refused_with_advice():
    model = tiny_model("gpt2")
    compemb_hf.compress(model, Cfg("tt", rank=4))
    with pytest.raises(ValueError, match="Resize the dense model first"):
        model.resize_token_embeddings(70)


def test_checkpoint_shapes_disagreeing_with_config(tmp_path):
    model = tiny_model("gpt2")
    compemb_hf.compress(model, Cfg("tt", rank=4))
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"]["rank"] = 3
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"transformer\.wte\.cores\.\d: checkpoint"):
        tf.AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tmp_path, damage):
    model = tiny_model("gpt2")
    compemb_hf.compress(model, Cfg("tt", rank=4))
    model.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        tf.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_from_pretrained_rejects_settings_before_reading_weights(tmp_path):
    _save_dense("gpt2", tmp_path)
    with pytest.raises(ValueError, match="num_groups"):
        tf.AutoModelForCausalLM.from_pretrained(
            tmp_path, compressed_embedding=Cfg("dpq", num_codes=4, num_groups=5))
    with pytest.raises(ValueError, match="'transformer.nope' is not a module"):
        tf.AutoModelForCausalLM.from_pretrained(
            tmp_path, compressed_embedding=Cfg("tt", rank=4, modules=["transformer.nope"]))
    with pytest.raises(ValueError, match="either compressed_embedding"):
        tf.AutoModelForCausalLM.from_pretrained(
            tmp_path, compressed_embedding=Cfg("tt", rank=4), quantization_config=Cfg("tt", rank=4))


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_generate_after_reload(family, tmp_path):
    torch.manual_seed(0)
    model = tiny_model(family).eval()
    compemb_hf.compress(model, Cfg("tt", rank=4))
    ids = dummy_inputs(family)["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert torch.equal(loaded.generate(input_ids=ids, max_new_tokens=4, do_sample=False), out)


def test_dtype_casts_work_on_a_compressed_model():
    model = tiny_model("gpt2").eval()
    compemb_hf.compress(model, Cfg("tt", rank=4))
    x = dummy_inputs("gpt2")
    with torch.no_grad():
        ref = model(**x).logits
        model.half().float()
        assert model.get_input_embeddings().cores[0].dtype == torch.float32
        model.to(torch.bfloat16)
        assert model.get_input_embeddings().cores[0].dtype == torch.bfloat16
        assert torch.allclose(model(**x).logits.float(), ref, atol=0.1)


def test_non_persistent_buffers_are_rebuilt_on_load(tmp_path):
    """Modules built on the meta device inside from_pretrained get their non-persistent
    buffers back as uninitialised memory; compemb_hf rebuilds them from the settings."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class ScaleConfig:
        scale: float = 3.0

    class ScaledTable(torch.nn.Module):  # a registered method with a non-persistent buffer
        def __init__(self, num_embeddings, embedding_dim, scale=3.0, padding_idx=None):
            super().__init__()
            self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
            self.padding_idx, self.config = padding_idx, ScaleConfig(scale)
            self.weight_small = torch.nn.Parameter(torch.randn(num_embeddings, embedding_dim))
            self.register_buffer("factor", torch.full((embedding_dim,), float(scale)),
                                 persistent=False)

        def forward(self, ids):
            return self.weight_small[ids] * self.factor

        def materialize(self):
            return self.weight_small * self.factor

        def logits(self, hidden):
            return hidden @ self.materialize().t()

        def storage(self):
            n = self.weight_small.numel()
            return compemb.LayerStorage("scaled", "", self.num_embeddings, self.embedding_dim,
                                        n, 4 * n, 4 * n)

        @classmethod
        def from_dense(cls, weight, scale=3.0, padding_idx=None):
            layer = cls(weight.shape[0], weight.shape[1], scale, padding_idx)
            layer.weight_small.data.copy_(weight / scale)
            return layer

    compemb.register_method("test-scaled", config_cls=ScaleConfig, layer_cls=ScaledTable)
    model = tiny_model("t5").eval()
    compemb_hf.compress(model, Cfg("test-scaled", scale=3.0))
    before = _logits(model, "t5")
    model.save_pretrained(tmp_path)
    assert not any(k.endswith("factor") for k in _keys(tmp_path))
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(loaded.shared.factor, torch.full((16,), 3.0))
    assert torch.equal(_logits(loaded, "t5"), before)


@pytest.mark.parametrize("family, output", [("gpt2", "tied"), ("bart", "tied"),
                                            ("t5", "untied"), ("bert-mlm", "tied")])
def test_dequantize_resize_and_compress_again(family, output, tmp_path):
    torch.manual_seed(0)
    model = tiny_model(family).eval()
    compemb_hf.compress(model, Cfg("tt", rank=4, output=output))
    before = _logits(model, family)
    model.dequantize()
    assert not compemb_hf.is_compressed(model) and not model.is_quantized
    inp = model.get_input_embeddings()
    assert isinstance(inp, torch.nn.Embedding)
    if output == "tied":
        assert model.get_output_embeddings().weight is inp.weight
    assert torch.allclose(_logits(model, family), before, atol=1e-5)
    model.tie_weights()
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    model.resize_token_embeddings(64)
    assert model.get_input_embeddings().weight.shape[0] == 64
    compemb_hf.compress(model, Cfg("tt", rank=4))
    assert model.get_input_embeddings().num_embeddings == 64


def test_init_weights_absorbs_only_the_missing_weight_of_a_compressed_table(monkeypatch):
    model = tiny_model("t5")
    compemb_hf.compress(model, Cfg("tt", rank=4))
    table = model.get_input_embeddings()
    before = [c.detach().clone() for c in table.cores]
    model._init_weights(model)  # T5 initialises module.shared.weight by name: absorbed
    assert all(torch.equal(b, c) for b, c in zip(before, table.cores))

    def broken(self, module):  # an unrelated error that merely mentions "weight"
        raise AttributeError("'Linear' object has no attribute 'weight_scale'")

    monkeypatch.setattr(type(model), "_init_weights", broken)
    with pytest.raises(AttributeError, match="weight_scale"):
        model._init_weights(model)

    def missing_elsewhere(self, module):  # a real missing attribute of another module
        return torch.nn.Linear(2, 2).weight_g

    monkeypatch.setattr(type(model), "_init_weights", missing_elsewhere)
    with pytest.raises(AttributeError, match="weight_g"):
        model._init_weights(model)


def _save_as_bin(model, path):
    """A compressed checkpoint in the older ``pytorch_model.bin`` form."""
    from safetensors.torch import load_file

    model.save_pretrained(path)
    state = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    return path / "pytorch_model.bin"


def test_bin_checkpoint_shapes_are_checked_against_the_config(tmp_path):
    model = tiny_model("gpt2").eval()
    compemb_hf.compress(model, Cfg("tt", rank=4))
    _save_as_bin(model, tmp_path)
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = dummy_inputs("gpt2")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, model(**x).logits)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"]["rank"] = 3
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"transformer\.wte\.cores\.\d: checkpoint \(\d+, \d+, \d+, 4\)"):
        tf.AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "unsafe"])
def test_corrupt_bin_checkpoint(tmp_path, damage):
    model = tiny_model("gpt2")
    compemb_hf.compress(model, Cfg("tt", rank=4))
    file = _save_as_bin(model, tmp_path)
    data = file.read_bytes()
    if damage == "unsafe":  # a pickled object that weights_only loading refuses
        torch.save({"x": torch.nn.Linear(2, 2)}, file)
    else:
        file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(ValueError, match="pytorch_model.bin is not a readable PyTorch .bin "
                                         "checkpoint"):
        tf.AutoModelForCausalLM.from_pretrained(tmp_path)
