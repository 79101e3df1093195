"""Generation and export of compressed transformers models: greedy ``generate`` through
the fast inference paths (KV cache, one token's logits per step, no V x J table) equals
the dense reference; ``torch.export`` and ``torch.compile`` of the compressed layers."""
import copy

import pytest
import torch

import compemb_hf
from compemb.dpq import CodebookEmbedding, DPQEmbedding
from compemb.dpq import codebook as codebook_module
from compemb.tt import TTEmbedding
from compemb_hf import CompressedEmbeddingConfig as Cfg

VOCAB = 301  # odd, and more symbols than a DPQ codebook has rows

CONFIGS = {
    "dpq-codebook": dict(method="dpq", num_codes=16, num_groups=4, form="codebook",
                         init="random"),
    "tt": dict(method="tt", rank=4, init="random"),
    "tr": dict(method="tr", rank=3, init="random"),
}


def _llama():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=40, bos_token_id=0, eos_token_id=2,
                         tie_word_embeddings=True)
    return tf.LlamaForCausalLM(cfg).eval()


def _model(name: str):
    model = _llama()
    cfg = dict(CONFIGS[name])
    return compemb_hf.compress(model, Cfg(cfg.pop("method"), **cfg)).eval()


def _generate(model, ids, new=9):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=new, min_new_tokens=new, pad_token_id=0)


def _no_table(*args, **kwargs):
    raise AssertionError("a V x J table was built during generate")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generate_equals_the_dense_reference(name, monkeypatch):
    model = _model(name)
    reference = compemb_hf.decompress(copy.deepcopy(model))  # the same table, dense
    ids = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(1))
    expected = _generate(reference, ids)
    # the fast paths: no table built, one new token's logits per step (KV cache)
    seen = []
    if name == "dpq-codebook":
        monkeypatch.setattr(CodebookEmbedding, "materialize", _no_table)
        inner = codebook_module.logits_from_blocked

        def spy(hidden, *args, **kwargs):
            seen.append(hidden.shape[0])
            return inner(hidden, *args, **kwargs)

        monkeypatch.setattr(codebook_module, "logits_from_blocked", spy)
    else:
        layer = next(iter(compemb_hf.compressed_layers(model).values()))
        monkeypatch.setattr(type(layer), "materialize", _no_table)
        monkeypatch.setattr(type(layer), "_logits_through_table", _no_table)
        inner = type(layer)._logits_through_cores

        def spy(self, flat, cached=False):
            seen.append((flat.shape[0], cached))
            return inner(self, flat, cached)

        monkeypatch.setattr(type(layer), "_logits_through_cores", spy)
    out = _generate(model, ids)
    assert torch.equal(out, expected)
    if name == "dpq-codebook":
        assert seen == [3] * 9
    else:
        assert seen == [(3, True)] * 9


def test_generate_with_the_pure_pytorch_dpq_path_equals_native(monkeypatch):
    model = _model("dpq-codebook")
    ids = torch.randint(3, VOCAB, (2, 4), generator=torch.Generator().manual_seed(2))
    fast = _generate(model, ids)
    inner = codebook_module.logits_from_blocked
    monkeypatch.setattr(codebook_module, "logits_from_blocked",
                        lambda *a, **k: inner(*a, **{**k, "impl": "torch"}))
    assert torch.equal(_generate(model, ids), fast)


def test_generate_of_a_fitted_model_equals_its_pytorch_paths(monkeypatch, tmp_path):
    """What ``compress_pretrained`` saves (DPQ codes with few codes per group, residual
    rows, a transform, a logit bias, a row scale), loaded back: greedy ``generate`` through
    the native kernels (the permute path for one token, the int8 product of the residual
    rows) gives the tokens of the pure-PyTorch paths, and its logits agree to rounding."""
    import transformers as tf

    from compemb.fit import residual as residual_module
    from compemb.fit import FittedEmbedding
    from compemb_hf.calibration import CalibrationSource

    model = _llama()
    windows = torch.randint(3, VOCAB, (8, 24), generator=torch.Generator().manual_seed(3))
    compemb_hf.compress_pretrained(model, "dpq", 3, sample=0, head_steps=0, progress=False,
                                   sources=[CalibrationSource("sampled", windows, sampled=True)])
    model.save_pretrained(tmp_path)
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    table = model.get_input_embeddings()
    assert isinstance(table, FittedEmbedding) and isinstance(table.base, CodebookEmbedding)
    assert table.residual is not None and table.residual.ids.numel() > 0
    assert table.row_scale_codes is not None and table.base.num_codes <= 64
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    hidden = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fast, fast_logits = _generate(model, ids), model.lm_head(hidden)
    inner = codebook_module.logits_from_blocked
    monkeypatch.setattr(codebook_module, "logits_from_blocked",
                        lambda *a, **k: inner(*a, **{**k, "impl": "torch"}))
    monkeypatch.setattr(residual_module, "int8_row_dots",
                        lambda h, rows: h @ rows.to(h.dtype).T)
    with torch.no_grad():
        assert torch.equal(_generate(model, ids), fast)
        torch.testing.assert_close(model.lm_head(hidden), fast_logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ export

@pytest.mark.parametrize("name", list(CONFIGS))
def test_torch_export_of_a_compressed_model_matches_eager(name):
    model = _model(name)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        program = torch.export.export(model, (), {"input_ids": ids, "use_cache": False})
        out = program.module()(input_ids=ids, use_cache=False)
    logits = out["logits"] if isinstance(out, dict) else out.logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    other = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        again = program.module()(input_ids=other, use_cache=False)
        ref = model(input_ids=other, use_cache=False).logits
    torch.testing.assert_close((again["logits"] if isinstance(again, dict) else again.logits),
                               ref, rtol=1e-5, atol=1e-5)


def _layers():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    codebook = CodebookEmbedding(torch.randint(256, (203, 6), generator=g),
                                 torch.randn(6, 256, 2, generator=g), padding_idx=3)
    tt = TTEmbedding(203, 12, 4, padding_idx=3)
    return {"codebook": codebook, "tt": tt}


@pytest.mark.parametrize("kind", ["codebook", "tt"])
def test_compile_fullgraph_of_lookup_and_logits(kind):
    layer = _layers()[kind].eval()
    ids = torch.tensor([[0, 202, 3], [7, 7, 1]])
    hidden = torch.randn(2, 12)

    class Both(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids, hidden):
            return self.inner(ids), self.inner.logits(hidden)

    module = Both(layer)
    with torch.no_grad():
        rows, logits = module(ids, hidden)
        explained = torch._dynamo.explain(module)(ids, hidden)
        assert explained.graph_break_count == 0, explained.break_reasons
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
        crows, clogits = compiled(ids, hidden)
    torch.testing.assert_close(crows, rows)
    torch.testing.assert_close(clogits, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["codebook", "tt"])
def test_export_of_a_layer_round_trips_through_save_and_load(kind, tmp_path):
    layer = _layers()[kind].eval()
    ids = torch.tensor([[0, 202, 3], [7, 7, 1]])
    with torch.no_grad():
        program = torch.export.export(layer, (ids,))
        torch.export.save(program, str(tmp_path / "layer.pt2"))
        loaded = torch.export.load(str(tmp_path / "layer.pt2"))
        torch.testing.assert_close(loaded.module()(ids), layer(ids))


def test_export_of_the_training_form_says_what_to_do():
    layer = DPQEmbedding(50, 8, 4, 2).eval()
    with pytest.raises(ValueError, match=r"export\(\).*form=.codebook"):
        torch.export.export(layer, (torch.tensor([1, 2]),))
    model = _llama()
    compemb_hf.compress(model, Cfg("dpq", num_codes=16, num_groups=4, init="random"))
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="export_codebooks"):
        torch.export.export(model, (), {"input_ids": ids, "use_cache": False})
    compemb_hf.export_codebooks(model)
    with torch.no_grad():
        program = torch.export.export(model, (), {"input_ids": ids, "use_cache": False})
        torch.testing.assert_close(program.module()(input_ids=ids, use_cache=False)["logits"],
                                   model(input_ids=ids, use_cache=False).logits)


def test_out_of_range_codes_in_a_saved_checkpoint_are_refused(tmp_path):
    """Codes 200..255 fit the 8-bit packing but not num_codes=200: a checkpoint holding
    them fails with an error naming the range, at load or at first use, never reads past
    the values."""
    import transformers as tf
    from safetensors.torch import load_file, save_file

    model = compemb_hf.compress(_llama(), Cfg("dpq", num_codes=200, num_groups=4,
                                              form="codebook", init="random"))
    model.save_pretrained(tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    state = load_file(str(files[0]))
    key = next(k for k in state if k.endswith("packed_codes"))
    state[key] = torch.full_like(state[key], 250)
    save_file(state, str(files[0]), metadata={"format": "pt"})
    with pytest.raises((ValueError, RuntimeError), match="250.*num_codes=200|num_codes=200.*250"):
        loaded = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path))
        with torch.no_grad():
            loaded(input_ids=torch.tensor([[1, 2]]))
