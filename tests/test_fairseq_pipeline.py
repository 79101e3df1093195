"""The fairseq plugin end to end, on toy data made here and binarised with
fairseq-preprocess: train, resume from checkpoint_last.pt, generate / eval-lm /
validate, for each model with TT and DPQ and each softmax mode (one pipeline per
combination listed in PIPELINES; every other combination is built in
test_fairseq_plugin.py). The fairseq entry points run in this process (their ``main``
functions, as the console scripts call them), with torch's default safe loading.
"""
import contextlib
import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fairseq")  # installed by scripts/install_fairseq.sh (./dev.sh, CI)

import torch  # noqa: E402

import compemb  # noqa: E402
import fairseq_plugin  # noqa: E402,F401
from fairseq import checkpoint_utils, options  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from fairseq_cli import eval_lm, generate, interactive, preprocess, train, validate  # noqa: E402
from compemb.dpq import CodebookEmbedding  # noqa: E402
from fairseq_plugin.export import export_checkpoint, state_tensor_bytes  # noqa: E402
from fairseq_plugin.export import main as export_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")

PLUGIN = str(ROOT / "fairseq_plugin")
WORDS = [f"w{i}" for i in range(20)]
COMMON = ["--user-dir", PLUGIN, "--cpu", "--num-workers", "0", "--seed", "1",
          "--no-progress-bar", "--log-format", "simple", "--log-interval", "1000",
          "--required-batch-size-multiple", "1"]  # fairseq-fixed drops a last partial batch
TRAIN = ["--optimizer", "adam", "--lr", "0.005", "--dropout", "0", "--max-tokens", "600",
         "--no-epoch-checkpoints"]
METHOD_FLAGS = {"tt": ["--emb-method", "tt", "--emb-rank", "8"],
                "dpq": ["--emb-method", "dpq", "--emb-codes", "16", "--emb-groups", "16"]}


def _sentences(rng, n):
    return [[rng.choice(WORDS) for _ in range(rng.randint(3, 6))] for _ in range(n)]


def _preprocess(argv):
    preprocess.main(options.get_preprocessing_parser().parse_args(argv))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Reverse-the-sentence translation data and LM data, binarised."""
    root = tmp_path_factory.mktemp("fsq")
    rng = random.Random(0)
    splits = {"train": 300, "valid": 30, "test": 12}
    for split, n in splits.items():
        sents = _sentences(rng, n)
        (root / f"{split}.src").write_text("".join(" ".join(s) + "\n" for s in sents))
        (root / f"{split}.tgt").write_text("".join(" ".join(s[::-1]) + "\n" for s in sents))
        # LM: counting sequences from a random start, a pattern a tiny model learns
        lm = []
        for _ in range(n):
            a, k = rng.randrange(len(WORDS)), rng.randint(4, 8)
            lm.append(" ".join(WORDS[(a + i) % len(WORDS)] for i in range(k)))
        (root / f"lm.{split}").write_text("\n".join(lm) + "\n")
    _preprocess(["--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary",
                 "--trainpref", str(root / "train"), "--validpref", str(root / "valid"),
                 "--testpref", str(root / "test"), "--destdir", str(root / "mt"),
                 "--workers", "1"])
    _preprocess(["--only-source", "--trainpref", str(root / "lm.train"),
                 "--validpref", str(root / "lm.valid"), "--testpref", str(root / "lm.test"),
                 "--destdir", str(root / "lm"), "--workers", "1"])
    return root


@contextlib.contextmanager
def _progress_messages():
    """The messages of fairseq's progress bar (where validate prints its loss).
    fairseq_cli.validate replaces the root logger's handlers (utils.reset_logging): they
    are put back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    progress = logging.getLogger("fairseq.logging.progress_bar")
    handler = Collect(logging.INFO)
    progress.addHandler(handler)
    try:
        yield messages
    finally:
        progress.removeHandler(handler)
        for h in root.handlers[:]:
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)


def fairseq_train(argv):
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    train.main(convert_namespace_to_omegaconf(args))


def _leaves(obj):
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _leaves(item)
    else:
        yield obj


def _val_loss(path):
    return torch.load(path)["extra_state"]["val_loss"]


def _train_loss(path):
    """The mean training loss of the checkpoint's last epoch: fairseq's ``train`` meters
    (reset every epoch) average it over every update and target token of the epoch."""
    meters = {name: state for _, name, _, state in torch.load(path)["extra_state"]["metrics"]["train"]}
    return float(meters["loss"]["sum"] / meters["loss"]["count"])


def _updates(path):
    return torch.load(path)["optimizer_history"][-1]["num_updates"]


MODEL_ARGS = {
    "translation": ["--task", "translation", "--arch", "compemb_transformer_tiny"],
    "lm": ["--task", "language_modeling", "--arch", "compemb_transformer_lm_tiny",
           "--tokens-per-sample", "32"],
    "roberta": ["--task", "masked_lm", "--criterion", "masked_lm", "--arch",
                "compemb_roberta_tiny", "--tokens-per-sample", "32"],
}
SOFTMAX_ARGS = {"tied": {"translation": ["--share-all-embeddings"], "lm": ["--softmax", "tied"],
                         "roberta": []},
                "untied": {"translation": [], "lm": [], "roberta": ["--untie-weights-roberta"]},
                "dense": {"translation": ["--softmax", "dense"], "lm": ["--softmax", "dense"],
                          "roberta": ["--softmax", "dense"]}}
# every model with TT and with DPQ, and every softmax mode for each model
PIPELINES = [("translation", "tt", "tied"), ("translation", "dpq", "untied"),
             ("lm", "tt", "untied"), ("lm", "dpq", "dense"),
             ("roberta", "tt", "dense"), ("roberta", "dpq", "tied"),
             ("translation", "tt", "dense")]


def _data(corpora, model):
    return str(corpora / ("mt" if model == "translation" else "lm"))


@pytest.mark.parametrize("model,method,softmax", PIPELINES,
                         ids=["-".join(p) for p in PIPELINES])
def test_train_resume_evaluate(corpora, tmp_path, caplog, capsys, model, method, softmax):
    caplog.set_level(logging.INFO)
    save = tmp_path / "ck"
    argv = [_data(corpora, model), *COMMON, *TRAIN, *MODEL_ARGS[model], *METHOD_FLAGS[method],
            *SOFTMAX_ARGS[softmax][model], "--save-dir", str(save)]
    if (model, method, softmax) == ("translation", "tt", "dense"):
        # BLEU during validation: its meters put numpy arrays into the checkpoint
        argv += ["--eval-bleu", "--eval-bleu-args", '{"beam": 1, "max_len_b": 10}']
    fairseq_train(argv + ["--max-epoch", "1"])
    last = save / "checkpoint_last.pt"
    first_updates, first_train = _updates(last), _train_loss(last)
    assert first_updates > 0
    reports = [r for r in caplog.records if r.getMessage().startswith("compemb compression report")]
    assert len(reports) == 1  # printed once, at start
    state = torch.load(last)  # torch's default: weights_only=True
    if "--eval-bleu" in argv:
        assert any(isinstance(v, np.ndarray) for v in _leaves(state["extra_state"]["metrics"]))
    assert state["model"]["_extra_state"]["compemb"]["--softmax"] == softmax

    # resume from checkpoint_last.pt for one more epoch
    caplog.clear()
    fairseq_train(argv + ["--max-epoch", "2"])
    assert any("Loaded checkpoint" in r.getMessage() for r in caplog.records)
    assert _updates(last) == 2 * first_updates
    # the resumed epoch goes on from the trained weights: its mean training loss (all its
    # updates and tokens; steadier than the 30-sentence validation set, whose masks change
    # every epoch for masked LM) is below the first epoch's
    assert _train_loss(last) < first_train, (first_train, _train_loss(last))

    # evaluate the checkpoint with the matching fairseq entry point
    common_eval = [_data(corpora, model), "--user-dir", PLUGIN, "--cpu", "--path", str(last),
                   "--log-format", "simple"]
    if model == "translation":
        parser = options.get_generation_parser()
        args = options.parse_args_and_arch(parser, common_eval + [
            "--beam", "2", "--batch-size", "16", "--max-len-b", "10",
            "--results-path", str(tmp_path / "gen"),
            "--required-batch-size-multiple", "1"])
        generate.main(convert_namespace_to_omegaconf(args))
        out = (tmp_path / "gen" / "generate-test.txt").read_text()
        assert len(re.findall(r"^H-\d+\t", out, flags=re.M)) == 12  # every test sentence
        # fairseq-interactive, reading two sentences
        (tmp_path / "in.txt").write_text("w1 w2 w3\nw4 w5 w6 w7\n")
        args = options.parse_args_and_arch(options.get_interactive_generation_parser(),
                                           common_eval + [
            "--beam", "2", "--max-len-b", "10", "--source-lang", "src", "--target-lang",
            "tgt", "--input", str(tmp_path / "in.txt")])
        capsys.readouterr()
        interactive.main(convert_namespace_to_omegaconf(args))
        hyps = re.findall(r"^H-(\d)\t\S+\t(.*)$", capsys.readouterr().out, flags=re.M)
        assert [h[0] for h in hyps] == ["0", "1"]
        assert all(set(h[1].split()) <= set(WORDS) for h in hyps)
    elif model == "lm":
        parser = options.get_eval_lm_parser()
        args = options.parse_args_and_arch(parser, common_eval + [
            "--tokens-per-sample", "32", "--max-tokens", "1000",
            "--required-batch-size-multiple", "1"])
        results = eval_lm.main(convert_namespace_to_omegaconf(args))
        assert 1 < results["perplexity"] < len(WORDS) + 4
    else:
        parser = options.get_validation_parser()
        args = options.parse_args_and_arch(parser, common_eval + [
            "--task", "masked_lm", "--criterion", "masked_lm", "--tokens-per-sample", "32",
            "--max-tokens", "1000", "--valid-subset", "valid",
            "--required-batch-size-multiple", "1"])
        with _progress_messages() as messages:
            validate.main(convert_namespace_to_omegaconf(args))
        losses = [float(m) for msg in messages for m in re.findall(r"\| loss ([0-9.]+) \|", msg)]
        assert len(losses) == 1 and abs(losses[0] - _val_loss(last)) < 1e-3


def _model_and_report(path, data):
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task(
        [str(path)], arg_overrides={"data": data})
    model = models[0]
    # the model has buffers that are not part of the state (fairseq's sinusoidal position
    # table, rebuilt on load): the report must not count them
    assert any(name not in model.state_dict() for name, _ in model.named_buffers())
    return model, compemb.compression_report(model)


def test_checkpoint_holds_only_compressed_parameters_tt(corpora, tmp_path):
    """TT: the checkpoint's model tensors are the cores plus the rest of the model, byte
    for byte what the compression report says is stored; no V x J table anywhere."""
    save = tmp_path / "ck"
    data = _data(corpora, "translation")
    fairseq_train([data, *COMMON, *TRAIN, *MODEL_ARGS["translation"], *METHOD_FLAGS["tt"],
                   "--share-all-embeddings", "--max-epoch", "1", "--save-dir", str(save),
                   "--no-save-optimizer-state"])
    last = save / "checkpoint_last.pt"
    state = torch.load(last)
    model, report = _model_and_report(last, data)
    V, J = len(model.encoder.dictionary), 64
    assert report.rows[0].storage.stored_parameters < V * J / 1.5
    assert state_tensor_bytes(state["model"]) == report.model_stored_bytes
    assert not any(torch.is_tensor(v) and v.numel() >= V * J for k, v in state["model"].items()
                   if "embed" in k or "output_projection" in k)
    # the file: those tensors plus the pickled config, counters and the like
    assert 0 < last.stat().st_size - state_tensor_bytes(state["model"]) < 64 * 1024


def test_dpq_export_holds_only_codes_and_values(corpora, tmp_path):
    """DPQ: training checkpoints also hold the query table (to resume); the exported
    checkpoint holds the packed codes and values only, matches the report byte for byte,
    and evaluates exactly as the training checkpoint does."""
    save = tmp_path / "ck"
    data = _data(corpora, "lm")
    fairseq_train([data, *COMMON, *TRAIN, *MODEL_ARGS["lm"], *METHOD_FLAGS["dpq"],
                   "--softmax", "tied", "--max-epoch", "1", "--save-dir", str(save)])
    last, out = save / "checkpoint_last.pt", tmp_path / "export.pt"
    assert export_main([str(last), str(out)]) == 0
    state = torch.load(out)
    assert not any(k.endswith((".query", ".key_weight")) for k in state["model"])
    assert state["model"]["_extra_state"]["compemb"]["--emb-codebook"] is True
    assert "last_optimizer_state" not in state
    model, report = _model_and_report(out, data)
    assert isinstance(model.decoder.embed_tokens, CodebookEmbedding)
    assert model.decoder.output_projection.table is model.decoder.embed_tokens
    assert state_tensor_bytes(state["model"]) == report.model_stored_bytes

    def perplexity(path):
        parser = options.get_eval_lm_parser()
        args = options.parse_args_and_arch(parser, [
            data, "--user-dir", PLUGIN, "--cpu", "--path", str(path), "--tokens-per-sample",
            "32", "--max-tokens", "1000", "--required-batch-size-multiple", "1"])
        return float(eval_lm.main(convert_namespace_to_omegaconf(args))["perplexity"])
    assert perplexity(out) == pytest.approx(perplexity(last), rel=1e-6)

    before = last.read_bytes()
    with pytest.raises(ValueError, match=r"OUT must differ from IN"):
        export_checkpoint(str(last), str(last))
    assert last.read_bytes() == before
    with pytest.raises(ValueError, match=r"already exported \(--emb-codebook\)"):
        export_checkpoint(str(out), str(tmp_path / "again.pt"))


def test_resume_with_other_compression_flags_is_refused(corpora, tmp_path, caplog):
    save = tmp_path / "ck"
    data = _data(corpora, "translation")
    base = [data, *COMMON, *TRAIN, *MODEL_ARGS["translation"], "--save-dir", str(save)]
    fairseq_train(base + [*METHOD_FLAGS["tt"], "--max-epoch", "1"])
    last = save / "checkpoint_last.pt"
    before = last.read_bytes()
    with pytest.raises(Exception) as info:
        fairseq_train(base + ["--emb-method", "tt", "--emb-rank", "4", "--max-epoch", "2"])
    cause = info.value.__context__ or info.value
    assert isinstance(cause, ValueError)
    assert re.search(r"trained with other compression flags \(--emb-rank differ\): it has "
                     r"--emb-method tt --emb-rank 8 .*this run has --emb-method tt --emb-rank 4",
                     str(cause))
    with pytest.raises(Exception) as info:
        fairseq_train(base + [*METHOD_FLAGS["tt"], "--softmax", "dense", "--max-epoch", "2"])
    assert "--softmax differ" in str(info.value.__context__ or info.value)
    assert last.read_bytes() == before  # nothing written
    with pytest.raises(ValueError, match=r"only --emb-method dpq checkpoints"):
        export_checkpoint(str(last), str(tmp_path / "x.pt"))


def test_loss_decreases_on_reverse_task(corpora, tmp_path):
    """Translation (reverse the sentence) with TT embeddings and the tied TT softmax."""
    save = tmp_path / "ck"
    argv = [_data(corpora, "translation"), *COMMON, *TRAIN, *MODEL_ARGS["translation"],
            *METHOD_FLAGS["tt"], "--share-all-embeddings", "--max-tokens", "150",
            "--save-dir", str(save)]
    fairseq_train(argv + ["--max-epoch", "1"])
    first = _val_loss(save / "checkpoint_last.pt")
    fairseq_train(argv + ["--max-epoch", "10"])
    last = _val_loss(save / "checkpoint_last.pt")
    # uniform over the 20 words is log2(20) = 4.3 bits. Measured: 4.21 -> 2.77 bits with the
    # TT table started at fairseq's dim**-0.5 (the core's init rule), 4.24 -> 2.55 at the
    # Glorot std it had before (a 16% larger start on this 30-symbol table)
    assert first > 3.0 and last < first - 1.2, (first, last)
