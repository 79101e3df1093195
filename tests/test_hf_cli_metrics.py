"""compemb_hf: the ``compemb`` command line and the shipped ``evaluate`` metrics."""
import json
import math
import os

import pytest
import torch
import transformers as tf

import compemb_hf
from compemb_hf import metrics
from compemb_hf.cli import main
from compemb_hf.testing import dummy_inputs, tiny_model


@pytest.fixture()
def dense_dir(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("gpt2").eval()
    model.save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "tokenizer_config.json").write_text("{}")
    return tmp_path / "dense", model


def test_compress_then_report(dense_dir, tmp_path, capsys):
    src, dense = dense_dir
    out = tmp_path / "tt"
    assert main(["compress", str(src), "--method", "tt", "--rank", "4", "--output", "untied",
                 "--out", str(out), "--quiet"]) == 0
    assert (out / "tokenizer_config.json").exists()
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    assert compemb_hf.is_compressed(model) and not model.get_output_embeddings().tied
    reference = compemb_hf.compress(dense, compemb_hf.CompressedEmbeddingConfig(
        "tt", rank=4, output="untied"))
    x = dummy_inputs("gpt2")
    with torch.no_grad():
        assert torch.allclose(model(**x).logits, reference(**x).logits, atol=1e-6)
    capsys.readouterr()
    assert main(["report", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in data["layers"]] == ["transformer.wte", "lm_head.embedding"]
    assert data["totals"]["weights_bytes_on_disk"] == os.path.getsize(out / "model.safetensors")
    assert main(["report", str(out)]) == 0
    assert "transformer.wte" in capsys.readouterr().out


def test_compress_dpq_export(dense_dir, tmp_path):
    src, _ = dense_dir
    out = tmp_path / "dpq"
    assert main(["compress", str(src), "--method", "dpq", "--num-codes", "4", "--num-groups",
                 "4", "--export", "--out", str(out), "--quiet"]) == 0
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    assert type(model.get_input_embeddings()).__name__ == "CodebookEmbedding"


@pytest.mark.parametrize("method", ["tt", "dpq"])
def test_plan(method, capsys):
    assert main(["plan", "--vocab", "30522", "--dim", "384", "--method", method, "--ratio",
                 "50", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ratio"] >= 50 and data["spec"]["method"] == method
    assert data["dense_bytes"] == 30522 * 384 * 4


def test_bad_input_exits_with_a_message(dense_dir, tmp_path, capsys):
    src, _ = dense_dir
    assert main(["compress", str(src), "--method", "tt", "--rank", "0",
                 "--out", str(tmp_path / "x")]) == 2
    assert "rank" in capsys.readouterr().err
    assert main(["compress", str(tmp_path), "--method", "tt", "--rank", "2",
                 "--out", str(tmp_path / "x")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["plan", "--vocab", "100", "--dim", "16", "--method", "tt", "--ratio",
                 "0.5"]) == 2


def test_metrics_load_offline():
    acc = metrics.load("accuracy")
    assert acc.compute(predictions=[1, 2, 3, 4], references=[1, 2, 0, 4]) == {"accuracy": 0.75}
    ppl = metrics.load("perplexity")
    ppl.add_batch(nll=[1.0, 3.0], weights=[1, 1])
    ppl.add_batch(nll=[2.0], weights=[2])
    assert math.isclose(ppl.compute()["perplexity"], math.exp(2.0))
    bleu = metrics.load("bleu")
    perfect = bleu.compute(predictions=["the cat sat on the mat"],
                           references=[["the cat sat on the mat"]])
    assert math.isclose(perfect["score"], 100.0)
    import sacrebleu

    hyp, ref = ["the cat sat on a mat today"], ["the cat sat on the mat"]
    assert math.isclose(bleu.compute(predictions=hyp, references=[ref])["score"],
                        sacrebleu.corpus_bleu(hyp, [ref]).score)
    with pytest.raises(ValueError, match="ships"):
        metrics.path("rouge")
    with pytest.raises(ValueError, match="number of predictions"):
        acc.compute(predictions=[1], references=[1, 2])
