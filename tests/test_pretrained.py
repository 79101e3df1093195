"""Post-training compression of a pretrained model (compemb_hf.compress_pretrained,
calibrate, `compemb compress --ratio`) on tiny models the tests build."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

import compemb  # noqa: E402
import compemb_hf  # noqa: E402
from compemb.fit import (DPQ_RESIDUAL_SHARE, DPQ_SAMPLED_RESIDUAL_SHARE, TT_RESIDUAL_SHARE,  # noqa: E402
                         TT_SAMPLED_RESIDUAL_SHARE,
                         FittedEmbedding, KroneckerLowRank, rank_prior, token_weights)
from compemb.fit.residual import residual_row_bytes  # noqa: E402
from compemb_hf.calibration import read_sources, sample_tokens, sources_from_texts  # noqa: E402
from compemb_hf.cli import main as cli  # noqa: E402

TEXT = ("The market rose on Monday as investors bought shares of banks and airlines. "
        "Prices of oil fell while the dollar gained against the yen. ") * 12
CODE = ("def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n"
        "        self.x = x\n        self.y = y\n") * 10


def char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    # room in the vocabulary for ids no text uses, as a real tokenizer has
    for i in range(160):
        vocab[f"<extra{i}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_lm(vocab: int, tied: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture()
def lm(tokenizer):
    return tiny_lm(len(tokenizer))


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny_lm")
    tiny_lm(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _safetensors_data_bytes(path) -> int:
    """Bytes of a safetensors file's tensors: the file less its 8-byte length and header."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return os.path.getsize(path) - 8 - header


def _logits(model, tokenizer, text=TEXT[:90]):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------- compress_pretrained
@pytest.mark.parametrize("method,transform_rank", [("dpq", None), ("tt", None), ("dpq", 2),
                                                   ("tt", 2)])
def test_compress_pretrained_fits_saves_small_and_reloads(method, transform_rank, lm, tokenizer,
                                                         tmp_path):
    """(A rank-2 transform at d=16 is a Kronecker product of two 4 x 4 rotations plus two
    16 x 2 factors, 96 numbers instead of 256; the default rank at this size is the whole
    matrix.)"""
    from transformers import AutoModelForCausalLM

    dense_dir = tmp_path / "dense"
    lm.save_pretrained(dense_dir)
    kw = {} if transform_rank is None else {"transform_rank": transform_rank}
    result = compemb_hf.compress_pretrained(lm, method, 3, tokenizer=tokenizer, texts=TEXT,
                                            sample=128, seq_len=32, progress=False, **kw)
    table = lm.get_input_embeddings()
    assert isinstance(table, FittedEmbedding) and lm.lm_head.table is table  # still tied
    assert result.plan.transform_rank == transform_rank
    assert isinstance(table.transform, KroneckerLowRank) == (transform_rank is not None)
    report = compemb.compression_report(lm)
    assert report.embedding_ratio >= 3 and result.plan.ratio >= 3
    assert set(result.sources) == {"texts", "sampled"}
    lm.save_pretrained(tmp_path / "out")
    # the checkpoint's tensors shrink by the bytes the table saved (the JSON header, which
    # names every tensor, aside)
    saved = report.embedding_dense_bytes - report.embedding_stored_bytes
    dense_data = _safetensors_data_bytes(dense_dir / "model.safetensors")
    assert dense_data - _safetensors_data_bytes(tmp_path / "out" / "model.safetensors") == saved
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(_logits(back, tokenizer), _logits(lm, tokenizer))
    if method == "dpq":  # stored as codes, not as the training form's query table
        assert isinstance(back.get_input_embeddings().base, compemb.CodebookEmbedding)
        # with residual rows (DPQ's default), rebuilt from the config's layout
        assert table.residual is not None
        assert back.get_input_embeddings().residual.counts == table.residual.counts


@pytest.mark.parametrize("method", ["dpq", "tt"])
def test_a_trained_padding_row_is_compressed_like_any_row_and_reloads(method, tokenizer, tmp_path):
    """Models that set the pad token to EOS (SmolLM2: pad = <|im_end|>) keep a trained row
    there, which the tied head needs: forced to zero, the compressed model could never
    predict EOS (its logit stuck at 0: p ~ 1e-15 where the dense model gives 1e-5)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    def llama_config():  # a new one per model: compressing a model marks its config
        return LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                           pad_token_id=2)

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config()).eval()
    assert model.get_input_embeddings().padding_idx == 2
    with torch.no_grad():  # a trained model's EOS row
        model.get_input_embeddings().weight[2] = torch.randn(16) * 0.02
    dense_rows = model.get_input_embeddings().weight.detach().clone()
    compemb_hf.compress_pretrained(model, method, 3, tokenizer=tokenizer, texts=TEXT, sample=0,
                                   seq_len=32, head_steps=0, progress=False)
    config = model.config.quantization_config
    assert config.padding_row == "stored"
    with torch.no_grad():
        rows = model.get_input_embeddings()(torch.arange(len(tokenizer)))
        eos_logit = model.lm_head(torch.randn(4, 16))[:, 2]
    err = (rows - dense_rows).norm(dim=1) / dense_rows.norm(dim=1)
    # fitted like the others, not zeroed (a tiny random table is hard for TT: its rows'
    # errors are near 1 at this ratio, so the row's norm tells there)
    assert float(rows[2].norm()) > 0 and float(err[2]) < 1.5 * float(err.median())
    assert bool((eos_logit != 0).all())
    model.save_pretrained(tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert back.config.quantization_config.padding_row == "stored"
    with torch.no_grad():
        torch.testing.assert_close(back.get_input_embeddings()(torch.tensor([2])), rows[2:3])
    # a padding row that is zero (as a fresh nn.Embedding's) stays an always-zero row
    torch.manual_seed(0)
    fresh = LlamaForCausalLM(llama_config()).eval()
    assert bool((fresh.get_input_embeddings().weight[2] == 0).all())
    compemb_hf.compress_pretrained(fresh, method, 3, tokenizer=tokenizer, texts=TEXT, sample=0,
                                   seq_len=32, head_steps=0, progress=False)
    assert fresh.config.quantization_config.padding_row == "zero"
    with torch.no_grad():
        assert bool((fresh.get_input_embeddings()(torch.tensor([2])) == 0).all())
    with pytest.raises(ValueError, match="padding_row must be one of"):
        compemb_hf.CompressedEmbeddingConfig("dpq", padding_row="keep")
    # the same rule through from_pretrained(quantization_config=...), recorded in its checkpoint
    torch.manual_seed(0)
    trained = LlamaForCausalLM(llama_config()).eval()
    with torch.no_grad():
        trained.get_input_embeddings().weight[2] = torch.randn(16) * 0.02
    trained.save_pretrained(tmp_path / "dense")
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", quantization_config=compemb_hf.CompressedEmbeddingConfig(method))
    assert loaded.config.quantization_config.padding_row == "stored"
    with torch.no_grad():
        row = loaded.get_input_embeddings()(torch.tensor([2]))
    assert float(row.norm()) > 0
    loaded.save_pretrained(tmp_path / "loaded")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "loaded")
    assert again.config.quantization_config.padding_row == "stored"
    with torch.no_grad():
        torch.testing.assert_close(again.get_input_embeddings()(torch.tensor([2])), row)


def test_untied_head_gets_its_own_table_fitted_in_the_head_metric(tokenizer):
    lm = tiny_lm(len(tokenizer), tied=False)
    head_weight = lm.lm_head.weight.detach().clone()
    compemb_hf.compress_pretrained(lm, "dpq", 3, tokenizer=tokenizer, texts=TEXT, sample=0,
                                   seq_len=32, progress=False)
    head = lm.lm_head
    assert not head.tied and isinstance(head.table, FittedEmbedding)
    assert head.table is not lm.get_input_embeddings()
    assert sum(p.numel() for p in head.parameters()) > 0  # registered: trained and saved
    err = (head.table.materialize() - head_weight).norm() / head_weight.norm()
    assert err < 0.9


def test_an_untied_model_saves_and_reloads_the_residual_rows_of_both_tables(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = tiny_lm(len(tokenizer), tied=False)
    compemb_hf.compress_pretrained(lm, "dpq", 3, tokenizer=tokenizer, texts=TEXT, sample=0,
                                   seq_len=32, progress=False)
    lm.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    layout = saved["fit"]["residual_rows"]  # each table its own layout
    assert set(layout) == {"input", "head"}
    assert {str(b): n for b, n in lm.lm_head.table.residual.counts.items()} == layout["head"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert back.lm_head.table.residual.counts == lm.lm_head.table.residual.counts
    torch.testing.assert_close(_logits(back, tokenizer), _logits(lm, tokenizer))


@pytest.mark.parametrize("tied", [True, False])
def test_the_head_table_gets_a_row_scale_from_its_shrinkage_unless_asked(tokenizer, tied,
                                                                        tmp_path):
    from transformers import AutoModelForCausalLM

    from compemb.fit import shrinkage_scale

    lm = tiny_lm(len(tokenizer), tied=tied)
    dense_head = lm.lm_head.weight.detach().clone()
    v = dense_head.shape[0]
    result = compemb_hf.compress_pretrained(lm, "dpq", 3, tokenizer=tokenizer, texts=TEXT,
                                            sample=0, seq_len=32, head_steps=5, row_scale=True,
                                            progress=False)
    table = lm.lm_head.table
    scale = table.row_scale()
    assert result.plan.row_scale and lm.config.quantization_config.fit["row_scale"] is True
    unscaled = table.materialize().detach() / scale.unsqueeze(1)
    step = float(scale.max() - scale.min()) / 255
    assert (scale - shrinkage_scale(unscaled, dense_head)).abs().max() <= step / 2 + 1e-5
    assert float(scale.median()) > 1  # quantised rows are shorter along their dense rows
    if not tied:
        assert lm.get_input_embeddings().row_scale() is None  # the input side has none
    lm.save_pretrained(tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(back.lm_head.table.row_scale(), scale)
    torch.testing.assert_close(_logits(back, tokenizer), _logits(lm, tokenizer))
    off = tiny_lm(len(tokenizer), tied=tied)
    plain = compemb_hf.compress_pretrained(off, "dpq", 3, tokenizer=tokenizer, texts=TEXT,
                                           sample=0, seq_len=32, head_steps=5, progress=False)
    assert off.lm_head.table.row_scale() is None and not plain.plan.row_scale  # user text
    assert "row_scale" not in off.config.quantization_config.fit
    assert plain.plan.residual_bytes == result.plan.residual_bytes + v + 8  # its bytes
    sampled = tiny_lm(len(tokenizer), tied=tied)  # no user text: on by default
    auto = compemb_hf.compress_pretrained(sampled, "dpq", 3, tokenizer=tokenizer, sample=64,
                                          seq_len=32, head_steps=0, progress=False)
    assert auto.plan.row_scale and sampled.lm_head.table.row_scale() is not None
    # and a larger share for residual rows than with user text (compemb.fit.default_residual_share)
    assert plain.plan.residual_share == DPQ_RESIDUAL_SHARE
    assert auto.plan.residual_share == DPQ_SAMPLED_RESIDUAL_SHARE > DPQ_RESIDUAL_SHARE
    asked = compemb_hf.compress_pretrained(tiny_lm(len(tokenizer), tied=tied), "dpq", 3,
                                           tokenizer=tokenizer, sample=64, seq_len=32,
                                           head_steps=0, residual_share=0.02, progress=False)
    assert asked.plan.residual_share == 0.02  # what is asked for wins
    tt = compemb_hf.compress_pretrained(tiny_lm(len(tokenizer), tied=tied), "tt", 3,
                                        tokenizer=tokenizer, sample=64, seq_len=32,
                                        head_steps=0, progress=False)
    assert not tt.plan.row_scale  # TT: measured no gain
    assert tt.plan.residual_share == TT_SAMPLED_RESIDUAL_SHARE == 0.93  # no text
    tt_text = compemb_hf.compress_pretrained(tiny_lm(len(tokenizer), tied=tied), "tt", 3,
                                             tokenizer=tokenizer, texts=TEXT, sample=0,
                                             seq_len=32, head_steps=0, progress=False)
    assert tt_text.plan.residual_share == TT_RESIDUAL_SHARE  # user text
    with pytest.raises(ValueError, match="row_scale must be True, False or None"):
        compemb_hf.compress_pretrained(tiny_lm(len(tokenizer), tied=tied), "dpq", 3,
                                       tokenizer=tokenizer, sample=64, row_scale="yes",
                                       progress=False)


@pytest.mark.parametrize("method", ["tt", "tr"])
def test_tt_and_tr_store_a_row_order_by_default_and_it_reloads(method, tokenizer, tmp_path):
    """(compemb.fit.default_row_order: similar rows under shared index prefixes.)"""
    from transformers import AutoModelForCausalLM

    lm = tiny_lm(len(tokenizer))
    v = lm.get_input_embeddings().weight.shape[0]
    result = compemb_hf.compress_pretrained(lm, method, 3, tokenizer=tokenizer, texts=TEXT,
                                            sample=0, seq_len=32, head_steps=0, progress=False)
    table = lm.get_input_embeddings()
    assert result.plan.row_order and lm.config.quantization_config.fit["row_order"] is True
    order = table.row_index.long()
    assert torch.equal(order.sort().values, torch.arange(v)) and not torch.equal(order, torch.arange(v))
    lm.save_pretrained(tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(back.get_input_embeddings().row_index, table.row_index)
    torch.testing.assert_close(_logits(back, tokenizer), _logits(lm, tokenizer))
    # the residual rows are rounded in a rotated space (compemb.fit.default_rotation): the
    # transform back is Q^T A^-1, where the metric's root A^-1 alone would be symmetric
    t = table.transform
    t = (t.matrix() if hasattr(t, "matrix") else t).detach().double()
    assert result.plan.residual_bytes > 0 and not torch.allclose(t, t.T, atol=1e-3)
    off = tiny_lm(len(tokenizer))
    plain = compemb_hf.compress_pretrained(off, method, 3, tokenizer=tokenizer, texts=TEXT,
                                           sample=0, seq_len=32, head_steps=0, row_order=False,
                                           progress=False)
    assert not plain.plan.row_order and off.get_input_embeddings().row_index is None
    assert off.config.quantization_config.fit["row_order"] is False
    # both plans fill the same budget, and the permutation's int32 ids (which the report
    # counts with the table's buffers) fit inside it
    assert plain.plan.stored_bytes == result.plan.stored_bytes
    assert compemb.compression_report(lm).embedding_stored_bytes <= result.plan.stored_bytes
    dpq = compemb_hf.compress_pretrained(tiny_lm(len(tokenizer)), "dpq", 3, tokenizer=tokenizer,
                                         texts=TEXT, sample=0, seq_len=32, head_steps=0,
                                         progress=False)
    assert not dpq.plan.row_order  # no index prefixes to share
    with pytest.raises(ValueError, match="row_order must be True, False or None"):
        compemb_hf.compress_pretrained(tiny_lm(len(tokenizer)), method, 3, tokenizer=tokenizer,
                                       texts=TEXT, sample=0, row_order=1, progress=False)


@pytest.mark.parametrize("tied", [True, False])
def test_head_fit_brings_the_head_closer_to_the_dense_one_and_can_be_turned_off(tokenizer, tied):
    import copy

    from compemb.fit import head_kl

    dense = tiny_lm(len(tokenizer), tied=tied)
    ids = tokenizer(CODE[:120], return_tensors="pt").input_ids
    with torch.no_grad():  # head inputs of text the calibration did not see
        h = dense.model(input_ids=ids).last_hidden_state[0]
    teacher = dense.lm_head

    def fitted(steps):
        model = copy.deepcopy(dense)
        result = compemb_hf.compress_pretrained(model, "dpq", 3, tokenizer=tokenizer, texts=TEXT,
                                                sample=0, seq_len=32, head_steps=steps,
                                                progress=False)
        return model, result

    plain, none = fitted(0)
    tuned, result = fitted(40)
    assert none.head_fit is None and "head fit" not in none.seconds
    assert result.head_fit.steps == 40
    assert result.head_fit.heldout_after < result.head_fit.heldout_before
    assert head_kl(tuned.lm_head, teacher, h) < head_kl(plain.lm_head, teacher, h)
    assert all(p.grad is None and p.requires_grad for p in tuned.parameters())
    # only the compressed parameters moved, the transforms as fitted
    for (name, a), (_, b) in zip(plain.named_parameters(), tuned.named_parameters()):
        if "embed_tokens" not in name and "lm_head" not in name or ".transform" in name:
            assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="head_steps"):
        compemb_hf.compress_pretrained(copy.deepcopy(dense), "dpq", 3, tokenizer=tokenizer,
                                       texts=TEXT, sample=0, seq_len=32, head_steps=-1,
                                       progress=False)


def test_a_bfloat16_model_is_fitted_and_head_fitted_in_its_dtype(tokenizer):
    lm = tiny_lm(len(tokenizer)).to(torch.bfloat16)
    result = compemb_hf.compress_pretrained(lm, "dpq", 3, tokenizer=tokenizer, texts=TEXT,
                                            sample=0, seq_len=32, head_steps=10, progress=False)
    assert result.head_fit.steps == 10
    assert {p.dtype for p in lm.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.isfinite(lm(input_ids=tokenizer(TEXT[:40], return_tensors="pt").input_ids)
                              .logits).all()


def test_calibration_lowers_the_loss_and_trains_only_the_tables(lm, tokenizer):
    import copy

    teacher = copy.deepcopy(lm)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    compemb_hf.compress_pretrained(lm, "dpq", 3, tokenizer=tokenizer, texts=TEXT, sample=0,
                                   seq_len=32, progress=False)
    body = {k: v.clone() for k, v in lm.state_dict().items() if "embed_tokens" not in k}
    table = {k: v.clone() for k, v in lm.state_dict().items() if "embed_tokens" in k}
    result = compemb_hf.calibrate(lm, TEXT + CODE, teacher=teacher, tokenizer=tokenizer,
                                  steps=40, seq_len=32, lr=0.05, eval_every=5, progress=False)
    assert result.steps == 40
    assert result.heldout_after < result.heldout_before
    for k, v in lm.state_dict().items():
        if k in body:
            assert torch.equal(v, body[k]), k  # the body is untouched
    assert any(not torch.equal(lm.state_dict()[k], v) for k, v in table.items()
               if v.is_floating_point())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k  # the teacher is never changed
    assert all(p.requires_grad for p in lm.parameters())  # frozen only during the call
    assert not any(".transform" in k for k in result.trained)  # kept as fitted
    assert "model.embed_tokens.logit_bias" in result.trained


def test_calibrate_without_text_samples_from_the_teacher(lm, tokenizer):
    import copy

    teacher = copy.deepcopy(lm)
    compemb_hf.compress_pretrained(lm, "tt", 3, sample=64, seq_len=32, progress=False)
    result = compemb_hf.calibrate(lm, teacher=teacher, steps=20, sample=96, seq_len=32,
                                  lr=0.05, eval_every=5, progress=False)
    assert result.sources == {"sampled": 96}
    assert result.heldout_after < result.heldout_before


def test_sampling_is_reproducible_and_leaves_the_global_rng_alone(lm):
    state = torch.random.get_rng_state()
    a = sample_tokens(lm, 64, seq_len=16, seed=3, progress=False)
    b = sample_tokens(lm, 64, seq_len=16, seed=3, progress=False)
    c = sample_tokens(lm, 64, seq_len=16, seed=4, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.windows.shape == (4, 16) and torch.equal(a.windows, b.windows)
    assert not torch.equal(a.windows, c.windows)
    with pytest.raises(ValueError, match="smallest budget is 16 tokens"):
        sample_tokens(lm, 10, seq_len=16, progress=False)


def test_random_start_sampling_begins_each_window_with_an_allowed_random_token(lm):
    vocab = lm.get_input_embeddings().weight.shape[0]
    bos = lm.config.bos_token_id
    excluded = [0, 2, 5]
    a = sample_tokens(lm, 16 * 12, seq_len=16, seed=3, progress=False, random_start=True,
                      exclude_tokens=excluded)
    b = sample_tokens(lm, 16 * 12, seq_len=16, seed=3, progress=False, random_start=True,
                      exclude_tokens=excluded)
    plain = sample_tokens(lm, 16 * 12, seq_len=16, seed=3, progress=False)
    assert a.windows.shape == (12, 16) and torch.equal(a.windows, b.windows)
    first = a.windows[:, 0]
    assert not any(int(t) in excluded + [bos] for t in first)
    assert len(set(first.tolist())) > 6  # drawn from the vocabulary, not one start
    assert int(first.max()) < vocab
    assert not torch.equal(a.windows, plain.windows)
    with pytest.raises(ValueError, match="exclude_tokens leaves no token"):
        sample_tokens(lm, 16, seq_len=16, progress=False, random_start=True,
                      exclude_tokens=range(vocab))


def test_two_sources_are_both_used_and_weigh_the_same(tokenizer, lm):
    from compemb_hf.calibration import collect_statistics

    sources = sources_from_texts(tokenizer, {"news": TEXT, "code": CODE * 3}, seq_len=32)
    assert [s.name for s in sources] == ["news", "code"]
    counts, second, mean = collect_statistics(lm, sources, len(tokenizer), progress=False)
    assert mean.shape == (16,)
    assert second.shape == (16, 16)
    assert float(counts.sum()) == pytest.approx(2.0)  # each source's counts sum to 1
    news_only, code_only = tokenizer("$")["input_ids"][0], tokenizer("(")["input_ids"][0]
    assert counts[code_only] > 0  # the code source counts, though shorter in tokens ...
    assert counts[tokenizer("q")["input_ids"][0]] == 0
    assert news_only != code_only


# ---------------------------------------------------------------------------- bad input
def test_encoder_without_text_is_refused_naming_calibration_text():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32)).eval()
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    with pytest.raises(ValueError, match="calibration-text"):
        compemb_hf.compress_pretrained(bert, "dpq", 3, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in bert.state_dict().items())


def test_model_without_a_replaceable_embedding_and_bad_ratio_are_refused(lm):
    with pytest.raises(ValueError, match="input embedding"):
        compemb_hf.compress_pretrained(torch.nn.Linear(3, 3), "dpq", 4, progress=False)
    with pytest.raises(ValueError, match="closest ratio"):
        compemb_hf.compress_pretrained(lm, "dpq", 500, sample=16, seq_len=16, progress=False)
    assert not compemb_hf.is_compressed(lm)


def test_token_prior_ranks_unseen_tokens_by_id_and_bad_priors_are_refused(tokenizer):
    from compemb.fit import DEFAULT_PRIOR, SAMPLED_PRIOR, SAMPLED_UNIFORM_PRIOR

    unused = torch.arange(len(tokenizer) - 160, len(tokenizer))  # ids no text uses
    weights = {}
    for prior in ("rank", "uniform"):
        model = tiny_lm(len(tokenizer))
        result = compemb_hf.compress_pretrained(model, "dpq", 3, tokenizer=tokenizer,
                                                texts={"a": TEXT}, sample=0, seq_len=32,
                                                head_steps=0, token_prior=prior, progress=False)
        assert result.prior == DEFAULT_PRIOR  # the user's text: the counts lead
        weights[prior] = result.token_weights[unused]
    assert bool((weights["uniform"] == weights["uniform"][0]).all())
    assert bool((weights["rank"][:-1] > weights["rank"][1:]).all())  # lower id, more weight
    sampled = compemb_hf.compress_pretrained(tiny_lm(len(tokenizer)), "dpq", 3, sample=64,
                                             seq_len=32, head_steps=0, progress=False)
    assert sampled.prior == SAMPLED_PRIOR == 1.0  # only the model's own text: the prior leads
    # ... so the weights are the rank prior alone (capped, mean 1), whatever was sampled
    expected = token_weights(torch.zeros(len(tokenizer)), prior=1.0,
                             prior_distribution=rank_prior(len(tokenizer)))
    torch.testing.assert_close(sampled.token_weights, expected)
    flat = compemb_hf.compress_pretrained(tiny_lm(len(tokenizer)), "dpq", 3, sample=64,
                                          seq_len=32, head_steps=0, token_prior="uniform",
                                          progress=False)
    assert flat.prior == SAMPLED_UNIFORM_PRIOR < 1.0  # a uniform prior leaves the counts a share
    assert float(flat.token_weights.std()) > 0
    lm = tiny_lm(len(tokenizer))
    for bad, match in (("zipf", "token_prior must be 'rank', 'uniform'"),
                       (torch.ones(7), r"a \[259\] tensor"),
                       (-torch.ones(len(tokenizer)), "non-negative"),
                       (torch.ones(2, len(tokenizer)), "token_prior must be")):
        with pytest.raises(ValueError, match=match):
            compemb_hf.compress_pretrained(lm, "dpq", 3, sample=64, seq_len=32,
                                           token_prior=bad, progress=False)
        assert not compemb_hf.is_compressed(lm)


def test_read_sources_refuses_bad_paths(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02abc")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.md").write_text("not a .txt")
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.txt").write_text("alpha")
    (tmp_path / "ok" / "sub").mkdir()
    (tmp_path / "ok" / "sub" / "b.txt").write_text("beta")
    for name, match in [("missing.txt", "does not exist"), ("empty.txt", "is empty"),
                        ("bin.txt", "not a text file"), ("latin.txt", "not UTF-8"),
                        ("folder", "holds no .txt")]:
        with pytest.raises(ValueError, match=match) as err:
            read_sources([str(tmp_path / name)])
        assert str(tmp_path / name) in str(err.value)
    assert read_sources([str(tmp_path / "ok")]) == {str(tmp_path / "ok"): ["alpha", "beta"]}


def test_text_too_short_for_one_window_is_refused(tokenizer):
    with pytest.raises(ValueError, match="too short for one window of 32 tokens"):
        sources_from_texts(tokenizer, {"tiny": "hello"}, seq_len=32)


# ---------------------------------------------------------------------------- command line
def test_cli_compress_ratio_round_trip_and_report(lm_dir, tokenizer, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    before = {p.name: p.stat().st_mtime_ns for p in lm_dir.iterdir()}
    text = tmp_path / "news.txt"
    text.write_text(TEXT)
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "a.txt").write_text(CODE)
    out = tmp_path / "small"
    rc = cli(["compress", str(lm_dir), "--method", "dpq", "--ratio", "3", "--calibration-text",
              str(text), "--calibration-text", str(code_dir), "--calibration-minutes", "0.2",
              "--sample-tokens", "256", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "planner: dpq" in printed and "sampled" in printed and str(code_dir) in printed
    assert "head fit: " in printed and "held-out KL" in printed
    assert "token weights: rank prior, 0.3 of the weight" in printed  # the user's text leads
    assert {p.name: p.stat().st_mtime_ns for p in lm_dir.iterdir()} == before  # input untouched
    assert (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.get_input_embeddings(), FittedEmbedding)
    assert cli(["report", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["embedding_ratio"] >= 3
    assert data["totals"]["weights_bytes_on_disk"] == os.path.getsize(out / "model.safetensors")


def test_cli_without_text_samples_from_random_starts_unless_asked(lm_dir, tokenizer, tmp_path,
                                                                  monkeypatch):
    import compemb_hf.pretrained as pretrained

    seen = []

    def spy(model, num_tokens, **kw):
        seen.append(kw)
        return sample_tokens(model, num_tokens, **kw)

    monkeypatch.setattr(pretrained, "sample_tokens", spy)
    for extra, out in (([], "random"), (["--sample-start", "bos"], "bos"),
                       (["--sample-openers", "--transform-rank", "2", "--residual-share", "0"],
                        "openers")):
        assert cli(["compress", str(lm_dir), "--method", "dpq", "--ratio", "3", "--sample-tokens",
                    "256", "--quiet", "--out", str(tmp_path / out)] + extra) == 0
    assert [kw["random_start"] for kw in seen] == [True, False, True]
    assert set(tokenizer.all_special_ids) <= set(seen[0]["exclude_tokens"])
    # the openers begin half the windows when asked for
    assert seen[0]["prompts"] == [] and seen[1]["prompts"] == [] and seen[2]["prompts"]
    # --transform-rank reaches the saved structure (d=16: the default rank 32 is the whole
    # matrix, rank 2 a Kronecker product plus rank 2)
    from transformers import AutoModelForCausalLM

    fits = {out: json.loads((tmp_path / out / "config.json").read_text())["quantization_config"]["fit"]
            for out in ("random", "openers")}
    assert "transform_rank" not in fits["random"] and fits["openers"]["transform_rank"] == 2
    # DPQ's residual rows by default, none with --residual-share 0
    assert sum(fits["random"]["residual_rows"]["input"].values()) > 0
    assert "residual_rows" not in fits["openers"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "openers")
    assert isinstance(model.get_input_embeddings().transform, KroneckerLowRank)


def test_cli_token_prior_reaches_the_fit(lm_dir, tmp_path, capsys, monkeypatch):
    import compemb_hf.pretrained as pretrained

    priors = []
    real = pretrained.compress_pretrained

    def spy(*a, **kw):
        result = real(*a, **kw)
        priors.append((kw["token_prior"], result.token_weights.clone(),
                       result.plan.residual_share))
        return result

    monkeypatch.setattr(pretrained, "compress_pretrained", spy)
    for prior in ("uniform", "rank"):
        assert cli(["compress", str(lm_dir), "--method", "dpq", "--ratio", "3", "--sample-tokens",
                    "128", "--head-steps", "0", "--token-prior", prior,
                    "--out", str(tmp_path / prior)]) == 0
        # only sampled text: the rank prior is the whole weight, a uniform one shares it
        # with the samples' counts (compemb.fit.default_prior)
        share = {"rank": "1", "uniform": "0.85"}[prior]
        out = capsys.readouterr().out
        assert f"token weights: {prior} prior, {share} of the weight" in out
        assert "logit bias, row scale" in out  # the planner's line: on by default
        assert priors[-1][2] == DPQ_SAMPLED_RESIDUAL_SHARE  # no text: the sampled default
    assert cli(["compress", str(lm_dir), "--method", "dpq", "--ratio", "3", "--sample-tokens",
                "128", "--head-steps", "0", "--no-row-scale", "--out", str(tmp_path / "plain")]) == 0
    assert "row scale" not in capsys.readouterr().out  # the planner's line
    assert priors[-1][2] == DPQ_SAMPLED_RESIDUAL_SHARE
    (tmp_path / "text.txt").write_text(TEXT)
    assert cli(["compress", str(lm_dir), "--method", "dpq", "--ratio", "3", "--calibration-text",
                str(tmp_path / "text.txt"), "--head-steps", "0", "--out",
                str(tmp_path / "text")]) == 0
    assert priors[-1][2] == DPQ_RESIDUAL_SHARE  # user text: the smaller share
    assert "row_scale" not in json.loads((tmp_path / "plain" / "config.json").read_text())[
        "quantization_config"]["fit"]
    (_, uniform, _), (_, rank, _) = priors[:2]
    unused = slice(len(uniform) - 160, None)  # ids that the samples are unlikely to hold
    assert not torch.equal(uniform, rank)
    assert float(rank[unused].mean()) < float(uniform[unused].mean())  # the rarest ids


def test_cli_refuses_bad_input_before_any_work(lm_dir, tmp_path, capsys, monkeypatch):
    import compemb_hf.cli as cli_module

    loads = []
    monkeypatch.setattr(cli_module, "_load", lambda d: loads.append(d))
    (tmp_path / "short.txt").write_text("tiny")
    cases = [
        (["--calibration-text", str(tmp_path / "nope.txt")], "does not exist"),
        (["--calibration-text", str(tmp_path / "short.txt")], "too short for one window"),
        (["--ratio", "900"], "closest ratio that can be had"),
        (["--rank", "4"], "--ratio chooses the settings itself"),
        (["--head-steps", "-3"], "--head-steps must be >= 0"),
        (["--transform-rank", "low"], "--transform-rank must be an int >= 0 or 'full'"),
        (["--transform-rank", "-1"], "--transform-rank must be an int >= 0 or 'full'"),
        (["--residual-share", "1.5"], "residual_share must be in [0, 1)"),
    ]
    for extra, match in cases:
        args = ["compress", str(lm_dir), "--method", "dpq", "--out", str(tmp_path / "o")]
        if "--ratio" not in extra:
            args += ["--ratio", "3"]
        assert cli(args + extra) == 2
        assert match in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse's own check of the choices
        cli(["compress", str(lm_dir), "--method", "dpq", "--ratio", "3", "--out",
             str(tmp_path / "o"), "--token-prior", "zipf"])
    assert exc.value.code == 2
    assert "--token-prior: invalid choice: 'zipf'" in capsys.readouterr().err
    assert loads == [] and not (tmp_path / "o").exists()


def test_cli_tt_row_order_is_on_unless_turned_off(lm_dir, tmp_path, capsys):
    (tmp_path / "text.txt").write_text(TEXT)
    for flag, on in ((None, True), ("--no-row-order", False)):
        out = tmp_path / str(on)
        assert cli(["compress", str(lm_dir), "--method", "tt", "--ratio", "3",
                    "--calibration-text", str(tmp_path / "text.txt"), "--head-steps", "0",
                    "--out", str(out)] + ([flag] if flag else [])) == 0
        planned = "row order" in capsys.readouterr().out  # the planner's line
        fit = json.loads((out / "config.json").read_text())["quantization_config"]["fit"]
        assert planned == on and fit["row_order"] is on


def test_cli_interrupted_run_leaves_no_out_folder(lm_dir, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def boom(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        cli(["compress", str(lm_dir), "--method", "tt", "--ratio", "3", "--sample-tokens", "128",
             "--out", str(tmp_path / "o"), "--quiet"])
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------- small by default
def test_a_dpq_model_not_in_training_saves_codes_unless_asked(tmp_path):
    from transformers import AutoModelForCausalLM

    lm = tiny_lm(200)
    lm.save_pretrained(tmp_path / "dense")
    cfg = compemb_hf.CompressedEmbeddingConfig("dpq", num_codes=16, num_groups=8)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", compressed_embedding=cfg)
    assert not model.training
    ids = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        expect = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "small")
    assert isinstance(model.get_input_embeddings(), compemb.DPQEmbedding)  # model unchanged
    model.save_pretrained(tmp_path / "train", compemb_form="train")
    model.train()
    model.save_pretrained(tmp_path / "train2")
    sizes = {n: os.path.getsize(tmp_path / n / "model.safetensors")
             for n in ("dense", "small", "train", "train2")}
    table = 200 * 16 * 4
    assert sizes["dense"] - sizes["small"] > 0.7 * table  # the query table is gone
    assert sizes["train"] >= sizes["dense"] and sizes["train2"] == sizes["train"]
    small = AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    assert isinstance(small.get_input_embeddings(), compemb.CodebookEmbedding)
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=ids).logits, expect)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "train")
    assert isinstance(again.get_input_embeddings(), compemb.DPQEmbedding)
    with pytest.raises(ValueError, match="compemb_form"):
        model.save_pretrained(tmp_path / "x", compemb_form="codes")


def test_decompress_gives_back_a_dense_model_with_the_same_outputs(lm, tokenizer):
    compemb_hf.compress_pretrained(lm, "dpq", 3, tokenizer=tokenizer, texts=TEXT, sample=0,
                                   seq_len=32, progress=False)
    expect = _logits(lm, tokenizer)
    compemb_hf.decompress(lm)
    assert isinstance(lm.get_input_embeddings(), torch.nn.Embedding)
    assert lm.lm_head.bias is not None  # the logit bias, now the dense head's bias
    torch.testing.assert_close(_logits(lm, tokenizer), expect, rtol=1e-4, atol=1e-4)


def test_an_encoder_gets_no_transform_and_the_planned_bytes(tokenizer):
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32)).eval()
    result = compemb_hf.compress_pretrained(bert, "dpq", 3, tokenizer=tokenizer, texts=TEXT,
                                            seq_len=32, progress=False)
    table = bert.get_input_embeddings()
    assert table.transform is None and table.logit_bias is None and result.output == "none"
    stored = compemb.compression_report(bert).embedding_stored_bytes
    if result.plan.residual_bytes:  # residual rows fill their budget to within a few rows
        assert table.residual is not None
        assert result.plan.stored_bytes - 4 * residual_row_bytes(16, 8) <= stored
        assert stored <= result.plan.stored_bytes
    else:
        assert stored == result.plan.stored_bytes


def test_sampling_from_openers_starts_its_share_of_windows_with_each_prompt(lm):
    from compemb_hf.calibration import _sampling_schedule

    prompts = [[10, 11, 12], [20], [30, 31] * 20]  # the last is cut to half a window (8)
    a = sample_tokens(lm, 16 * 12, seq_len=16, seed=3, progress=False, random_start=True,
                      prompts=prompts)
    b = sample_tokens(lm, 16 * 12, seq_len=16, seed=3, progress=False, random_start=True,
                      prompts=prompts)
    assert a.windows.shape == (12, 16) and torch.equal(a.windows, b.windows)
    starts = {tuple(p[:8]): 0 for p in prompts}
    for w in a.windows.tolist():
        for p in starts:
            starts[p] += w[:len(p)] == list(p)
    assert list(starts.values()) == [2, 2, 2]  # half the windows, each prompt in turn
    # prompted and plain batches alternate, and every window is scheduled once
    schedule = _sampling_schedule(12, 6, prompts, 4)
    assert sum(n for n, _ in schedule) == 12
    assert [p is None for _, p in schedule][:2] == [True, False]
    # no prompts: the windows are what they were before prompts existed
    plain = sample_tokens(lm, 16 * 12, seq_len=16, seed=3, progress=False, random_start=True)
    again = sample_tokens(lm, 16 * 12, seq_len=16, seed=3, progress=False, random_start=True,
                          prompts=())
    assert torch.equal(plain.windows, again.windows)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        sample_tokens(lm, 16, seq_len=16, progress=False, prompts=[[5], []])
    with pytest.raises(ValueError, match="prompt_share"):
        sample_tokens(lm, 16, seq_len=16, progress=False, prompts=[[5]], prompt_share=0)


def test_opener_prompts(tokenizer):
    from compemb_hf.calibration import SAMPLE_OPENERS, opener_prompts

    ids = opener_prompts(tokenizer)
    assert len(ids) == len(SAMPLE_OPENERS) and ids[0] == tokenizer("def ", add_special_tokens=False)["input_ids"]
    assert opener_prompts(tokenizer, ["x", ""]) == [tokenizer("x", add_special_tokens=False)["input_ids"]]
    assert opener_prompts(None) == []
    with pytest.raises(ValueError, match="sequence of texts"):
        opener_prompts(tokenizer, "def ")


def test_cli_sample_openers_without_a_tokenizer_is_refused(tmp_path, capsys, monkeypatch):
    import compemb_hf.cli as cli_module

    loads = []
    monkeypatch.setattr(cli_module, "_load", lambda d: loads.append(d))
    tiny_lm(200).save_pretrained(tmp_path / "dense")  # no tokenizer files
    assert cli(["compress", str(tmp_path / "dense"), "--method", "dpq", "--ratio", "3",
                "--sample-tokens", "256", "--sample-openers", "--quiet",
                "--out", str(tmp_path / "o")]) == 2
    assert "--sample-openers needs a tokenizer" in capsys.readouterr().err
    assert loads == [] and not (tmp_path / "o").exists()  # refused before any work
