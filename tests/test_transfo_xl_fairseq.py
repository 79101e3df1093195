"""The fairseq route of the Transformer-XL (``--arch compemb_transformer_xl*`` of the
plugin, task ``truncated_bptt_lm``): built from the flags, memories carried from one
batch to the next, trained with fairseq-train and evaluated with fairseq-eval-lm on toy
data made here (entry points run in this process, as the console scripts call them)."""
import random
from pathlib import Path

import pytest

pytest.importorskip("fairseq")  # installed by scripts/install_fairseq.sh (./dev.sh, CI)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import compemb  # noqa: E402
import compemb.dpq  # noqa: E402,F401
import fairseq_plugin  # noqa: E402,F401  (registers the models)
from compemb_hf.transfo_xl import TransfoXLLMHeadModel  # noqa: E402
from fairseq import options, tasks  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from fairseq_cli import eval_lm, preprocess, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = str(ROOT / "fairseq_plugin")
WORDS = [f"w{i}" for i in range(20)]
DPQ = ["--emb-method", "dpq", "--emb-codes", "8", "--emb-groups", "4"]

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Counting sequences from a random start (a pattern a tiny model learns), binarised."""
    root = tmp_path_factory.mktemp("fsq_txl")
    rng = random.Random(0)
    for split, n in {"train": 300, "valid": 30, "test": 20}.items():
        lines = []
        for _ in range(n):
            a, k = rng.randrange(len(WORDS)), rng.randint(4, 8)
            lines.append(" ".join(WORDS[(a + i) % len(WORDS)] for i in range(k)))
        (root / f"lm.{split}").write_text("\n".join(lines) + "\n")
    preprocess.main(options.get_preprocessing_parser().parse_args([
        "--only-source", "--trainpref", str(root / "lm.train"), "--validpref", str(root / "lm.valid"),
        "--testpref", str(root / "lm.test"), "--destdir", str(root / "bin"), "--workers", "1"]))
    return root / "bin"


def build(data, *flags):
    argv = [str(data), "--user-dir", PLUGIN, "--task", "truncated_bptt_lm", "--cpu",
            "--tokens-per-sample", "8", "--batch-size", "4", *flags]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    return task.build_model(cfg.model), task


def test_builds_the_compemb_hf_model_with_compressed_tables(data):
    model, task = build(data, "--arch", "compemb_transformer_xl_tiny", "--cutoffs", "10,100", *DPQ)
    hf = model.decoder.model
    assert isinstance(hf, TransfoXLLMHeadModel)
    assert hf.config.vocab_size == len(task.target_dictionary)
    assert hf.config.cutoffs == [10]  # cutoffs beyond the dictionary are dropped
    assert hf.config.compressed_embedding["output"] == "tied"
    head = hf.transformer.word_emb.emb_layers[0]
    assert type(head).__name__ == "DPQEmbedding" and hf.crit.out_layers[0].table is head
    assert model.compemb_record["--emb-method"] == "dpq" and model.compemb_record["--softmax"] == "tied"
    plain, _ = build(data, "--arch", "compemb_transformer_xl_tiny", "--cutoffs", "")
    assert type(plain.decoder.model.transformer.word_emb.emb_layers[0]) is nn.Embedding
    assert plain.decoder.model.crit.n_clusters == 0
    base, _ = build(data, "--arch", "compemb_transformer_xl_wt103_base", "--cutoffs", "")
    assert (base.decoder.model.config.n_layer, base.decoder.model.config.d_model) == (16, 410)
    with pytest.raises(ValueError, match="--cutoffs"):
        build(data, "--arch", "compemb_transformer_xl_tiny", "--cutoffs", "ten")
    with pytest.raises(ValueError, match="--softmax"):
        build(data, "--arch", "compemb_transformer_xl_tiny", *DPQ, "--softmax", "shared")


def test_memories_carry_over_from_batch_to_batch(data):
    model, _ = build(data, "--arch", "compemb_transformer_xl_tiny", "--cutoffs", "", "--mem-len", "8")
    model.eval()
    dec, hf = model.decoder, model.decoder.model
    x = torch.randint(4, 24, (2, 12))
    with torch.no_grad():
        first, _ = dec(x[:, :6])
        second, extra = dec(x[:, 6:])
        whole = hf(x).logits
        y = torch.randint(4, 24, (3, 6))
        restarted, _ = dec(y)  # another batch size: a new stream, no memories
    torch.testing.assert_close(first, whole[:, :6])
    torch.testing.assert_close(second, whole[:, 6:])
    torch.testing.assert_close(restarted, hf(y).logits)
    assert extra["mems"][0].shape == (8, 2, 32)
    logp = dec.get_normalized_probs((second,), log_probs=True)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2, 6), atol=1e-5, rtol=1e-5)


def test_fairseq_train_and_eval_lm(data, tmp_path):
    save = tmp_path / "ck"
    argv = [str(data), "--user-dir", PLUGIN, "--cpu", "--num-workers", "0", "--seed", "1",
            "--no-progress-bar", "--log-format", "simple", "--log-interval", "1000",
            "--task", "truncated_bptt_lm", "--tokens-per-sample", "8", "--batch-size", "4",
            "--arch", "compemb_transformer_xl_tiny", "--cutoffs", "", *DPQ,
            "--optimizer", "adam", "--lr", "0.01", "--save-dir", str(save), "--no-epoch-checkpoints"]
    args = options.parse_args_and_arch(options.get_training_parser(), argv + ["--max-epoch", "1"])
    train.main(convert_namespace_to_omegaconf(args))
    last = save / "checkpoint_last.pt"
    first = torch.load(last)["extra_state"]["val_loss"]
    args = options.parse_args_and_arch(options.get_training_parser(), argv + ["--max-epoch", "2"])
    train.main(convert_namespace_to_omegaconf(args))  # resumes from checkpoint_last.pt
    state = torch.load(last)
    assert state["model"]["_extra_state"]["compemb"]["--emb-method"] == "dpq"
    loss = state["extra_state"]["val_loss"]  # base 2
    assert loss < first and loss < 2.5, (first, loss)  # uniform: log2(24) = 4.6

    args = options.parse_args_and_arch(options.get_eval_lm_parser(), [
        str(data), "--user-dir", PLUGIN, "--cpu", "--path", str(last), "--task", "truncated_bptt_lm",
        "--batch-size", "1", "--required-batch-size-multiple", "1", "--tokens-per-sample", "8",
        "--model-overrides", "{'mem_len': 24}", "--log-format", "simple"])
    results = eval_lm.main(convert_namespace_to_omegaconf(args))
    assert 1 < results["perplexity"] < 2 ** 2.5
