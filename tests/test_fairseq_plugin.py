"""The fairseq plugin (``--user-dir fairseq_plugin``): models built from the flags, the
bad inputs, safe checkpoint loading, and the stock architectures left alone.

Training pipelines (train / resume / generate / eval-lm) are in
``test_fairseq_pipeline.py``.
"""
import argparse
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fairseq")  # installed by scripts/install_fairseq.sh (./dev.sh, CI)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import compemb  # noqa: E402
import fairseq_plugin  # noqa: E402,F401  (registers the models)
from fairseq import options, tasks  # noqa: E402
from fairseq_plugin.flags import load_methods, parse_shape, spec_from_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")

PLUGIN = str(ROOT / "fairseq_plugin")
METHOD_FLAGS = {
    "dense": [],
    "tt": ["--emb-rank", "4"],
    "tr": ["--emb-rank", "2"],
    "dpq": ["--emb-codes", "8", "--emb-groups", "8"],
}
V_WORDS = 36  # dictionary: 4 specials + 36 words = 40 symbols


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A dictionary file for the build-only tests (no corpus needed)."""
    d = tmp_path_factory.mktemp("fsq_dict")
    words = [f"w{i}" for i in range(V_WORDS)]
    for name in ("dict.src.txt", "dict.tgt.txt", "dict.txt"):
        (d / name).write_text("".join(f"{w} {100 - i}\n" for i, w in enumerate(words)))
    return d


def build(data_dir, task, arch, *flags):
    """Parse a fairseq command line (as fairseq-train would) and build the model."""
    argv = [str(data_dir), "--user-dir", PLUGIN, "--task", task, "--arch", arch, "--cpu",
            *flags]
    if task == "translation":
        argv += ["--source-lang", "src", "--target-lang", "tgt"]
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, argv)
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    cfg = convert_namespace_to_omegaconf(args)
    task_obj = tasks.setup_task(cfg.task)
    return task_obj.build_model(cfg.model), task_obj


MODELS = {  # model -> (task, tiny arch, the input embedding, the output layer)
    "translation": ("translation", "compemb_transformer_tiny",
                    lambda m: m.decoder.embed_tokens, lambda m: m.decoder.output_projection),
    "lm": ("language_modeling", "compemb_transformer_lm_tiny",
           lambda m: m.decoder.embed_tokens, lambda m: m.decoder.output_projection),
    "roberta": ("masked_lm", "compemb_roberta_tiny",
                lambda m: m.encoder.sentence_encoder.embed_tokens,
                lambda m: m.encoder.lm_head.output),
}


def _num_symbols(task):
    return len(task.source_dictionary)


@pytest.mark.parametrize("softmax", ["tied", "untied", "dense"])
@pytest.mark.parametrize("method", ["tt", "tr", "dpq"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_build_every_model_method_and_softmax(data_dir, model_name, method, softmax):
    if method not in load_methods():
        pytest.fail(f"compemb method {method!r} is not registered")
    task_name, arch, embed_of, output_of = MODELS[model_name]
    model, task = build(data_dir, task_name, arch, "--emb-method", method,
                        *METHOD_FLAGS[method], "--softmax", softmax)
    V, J = _num_symbols(task), 64
    embed, output = embed_of(model), output_of(model)
    layer_cls = compemb.get_method(method).layer_cls
    assert isinstance(embed, layer_cls) and (embed.num_embeddings, embed.embedding_dim) == (V, J)
    if softmax == "dense":
        assert isinstance(output, nn.Linear) and output.weight.shape == (V, J)
    else:
        assert isinstance(output, compemb.OutputLayer)
        assert output.tied == (softmax == "tied")
        if softmax == "tied":
            assert output.table is embed
        else:
            assert isinstance(output.table, layer_cls) and output.table is not embed
    # the state dict holds compressed parameters only: no V x J table unless asked for
    state = model.state_dict()
    big = [k for k, v in state.items() if torch.is_tensor(v) and v.shape == (V, J)]
    if method == "dpq":  # the training-time query table; the export drops it
        big = [k for k in big if not k.endswith(".query")]
    dense_head = ("encoder.lm_head.output.weight" if model_name == "roberta"
                  else "decoder.output_projection.weight")
    assert big == ([dense_head] if softmax == "dense" else [])
    report = compemb.compression_report(model)
    assert len(report.rows) == (1 if softmax != "untied" else 2) + (
        1 if model_name == "translation" else 0)
    assert state["_extra_state"]["compemb"]["--emb-method"] == method
    assert state["_extra_state"]["compemb"]["--softmax"] == softmax
    # a forward pass gives logits over the vocabulary
    model.eval()
    tokens = torch.randint(4, V, (2, 5))
    if model_name == "translation":
        out, _ = model(tokens, torch.tensor([5, 5]), tokens)
    elif model_name == "lm":
        out, _ = model(tokens)
    else:
        out, _ = model(tokens)
    assert out.shape == (2, 5, V) and torch.isfinite(out).all()


def test_share_all_embeddings_shares_one_compressed_table(data_dir):
    model, _ = build(data_dir, "translation", "compemb_transformer_tiny", "--emb-method", "dpq",
                     *METHOD_FLAGS["dpq"], "--share-all-embeddings")
    assert model.encoder.embed_tokens is model.decoder.embed_tokens
    assert model.decoder.output_projection.table is model.decoder.embed_tokens
    assert model.state_dict()["_extra_state"]["compemb"]["--softmax"] == "tied"
    assert len(compemb.compression_report(model).rows) == 1


def test_default_softmax_follows_the_models_tying_flags(data_dir):
    lm, _ = build(data_dir, "language_modeling", "compemb_transformer_lm_tiny",
                  "--emb-method", "dpq", *METHOD_FLAGS["dpq"])
    assert lm.decoder.output_projection.tied is False  # transformer_lm does not tie
    lm, _ = build(data_dir, "language_modeling", "compemb_transformer_lm_tiny",
                  "--emb-method", "dpq", *METHOD_FLAGS["dpq"],
                  "--share-decoder-input-output-embed")
    assert lm.decoder.output_projection.tied is True
    rob, _ = build(data_dir, "masked_lm", "compemb_roberta_tiny", "--emb-method", "dpq",
                   *METHOD_FLAGS["dpq"])
    assert rob.encoder.lm_head.output.tied is True  # RoBERTa ties unless told not to
    rob, _ = build(data_dir, "masked_lm", "compemb_roberta_tiny", "--emb-method", "dpq",
                   *METHOD_FLAGS["dpq"], "--untie-weights-roberta")
    assert rob.encoder.lm_head.output.tied is False


def test_dense_method_matches_the_stock_model(data_dir):
    """--emb-method dense: the same parameters (names aside) as fairseq's own model."""
    ours, _ = build(data_dir, "translation", "compemb_transformer_tiny", "--emb-method", "dense",
                    "--share-all-embeddings")
    stock, _ = build(data_dir, "translation", "transformer_tiny", "--share-all-embeddings",
                     "--encoder-ffn-embed-dim", "128")
    assert type(stock.encoder.embed_tokens) is nn.Embedding

    def shapes(model):
        return sorted(tuple(p.shape) for p in model.parameters())
    assert shapes(ours) == shapes(stock)
    emb = ours.encoder.embed_tokens.weight
    assert abs(emb.std().item() - 64 ** -0.5) < 0.03  # fairseq's init scale
    assert torch.all(emb[ours.encoder.embed_tokens.padding_idx] == 0)


def test_dpq_gets_fairseq_init_scale(data_dir):
    model, _ = build(data_dir, "translation", "compemb_transformer_tiny", "--emb-method", "dpq",
                     *METHOD_FLAGS["dpq"])
    table = model.encoder.embed_tokens.materialize()
    assert 0.5 * 64 ** -0.5 < table.std().item() < 2 * 64 ** -0.5


@pytest.mark.parametrize("method", ["dpq", "tt", "dense"])
def test_roberta_tables_start_at_its_dense_std_and_keep_their_structure(data_dir, method):
    """RobertaModel re-initialises nn.Linear/nn.Embedding BERT-style (std 0.02): by the
    core's init rule every method's table starts at that std, and the compressed layers
    keep their structure (DPQ: keys and values drawn at it, not re-drawn by RoBERTa)."""
    torch.manual_seed(0)
    model, _ = build(data_dir, "masked_lm", "compemb_roberta_tiny", "--emb-method", method,
                     *METHOD_FLAGS.get(method, []))
    table = model.encoder.sentence_encoder.embed_tokens
    weight = table.weight if method == "dense" else table.materialize()
    assert abs(weight.std().item() - 0.02) < 0.004, weight.std().item()
    if method == "dpq":
        assert abs(table.key_weight.std().item() - 0.02) < 0.004
    assert abs(model.encoder.lm_head.dense.weight.std().item() - 0.02) < 0.005


def test_tt_tables_start_at_fairseqs_embedding_std(data_dir):
    """The core's init rule: a TT table of the Transformer starts at fairseq's
    ``dim**-0.5``, as the dense and DPQ ones do (it started at the Glorot std before)."""
    model, _ = build(data_dir, "translation", "compemb_transformer_tiny", "--emb-method", "tt",
                     *METHOD_FLAGS["tt"])
    table = model.encoder.embed_tokens.materialize()
    assert table.std().item() == pytest.approx(64 ** -0.5, rel=0.05)


def test_flags_map_onto_the_spec():
    args = argparse.Namespace(emb_method="dpq", emb_codes=16, emb_groups=8, emb_variant="vq",
                              emb_shared_subspace=True, emb_rank=None, emb_shape=None,
                              emb_num_factors=None)
    spec = spec_from_args(args)
    assert spec.method == "dpq"
    assert spec.options == {"num_codes": 16, "num_groups": 8, "variant": "vq",
                            "shared_subspace": True}
    assert parse_shape("4,5,2x4,4,4") == ((4, 5, 2), (4, 4, 4))


def test_dpq_training_flags_reach_temperature_commitment_and_distance_norm():
    args = argparse.Namespace(emb_method="dpq", emb_codes=16, emb_groups=8, emb_variant="sx",
                              emb_temperature=0.5, emb_no_distance_norm=True)
    config = spec_from_args(args).config
    assert config.temperature == 0.5 and config.distance_norm is False
    args = argparse.Namespace(emb_method="dpq", emb_codes=16, emb_groups=8, emb_variant="vq",
                              emb_commitment=0.25)
    config = spec_from_args(args).config
    assert config.commitment == 0.25 and config.distance_norm is True
    # an option the variant ignores is refused, naming the flag
    args = argparse.Namespace(emb_method="dpq", emb_codes=16, emb_groups=8, emb_variant="vq",
                              emb_temperature=0.5)
    with pytest.raises(ValueError, match=r"temperature=0.5 has no effect with variant='vq'.*"
                                         r"--emb-temperature"):
        spec_from_args(args)
    args = argparse.Namespace(emb_method="tt", emb_rank="4", emb_temperature=0.5)
    with pytest.raises(ValueError, match="--emb-temperature does not apply to --emb-method tt"):
        spec_from_args(args)


def test_record_of_an_older_checkpoint_still_matches():
    """Checkpoints written before --emb-temperature/--emb-commitment/--emb-no-distance-norm
    existed recorded those settings as ``(temperature)`` ...: they still load."""
    from fairseq_plugin.build import CompressionRecord, compression_record

    args = argparse.Namespace(emb_method="dpq", emb_codes=16, emb_groups=8, emb_variant="sx")
    model = CompressionRecord()
    model.compemb_record = compression_record(args, "tied")
    assert model.compemb_record["--emb-no-distance-norm"] is False
    old = {k: v for k, v in model.compemb_record.items()
           if k not in ("--emb-temperature", "--emb-commitment", "--emb-no-distance-norm")}
    old.update({"(temperature)": 1.0, "(commitment)": 0.0, "(distance_norm)": True})
    model.set_extra_state({"compemb": old})  # no error
    old["(temperature)"] = 0.5
    with pytest.raises(ValueError, match="--emb-temperature differ"):
        model.set_extra_state({"compemb": old})


@pytest.mark.skipif("tt" not in load_methods(), reason="needs compemb.tt registered")
def test_tt_flags_map_onto_the_spec():
    args = argparse.Namespace(emb_method="tt", emb_rank="2,3", emb_shape="4,5,2x4,4,4",
                              emb_num_factors=None)
    spec = spec_from_args(args)
    assert spec.config.rank == (2, 3) and spec.config.shape == ((4, 5, 2), (4, 4, 4))


# ---------------------------------------------------------------------- bad input

BAD = [
    (["--emb-method", "svd"], r"--emb-method 'svd' is not a known method; use one of \[.*dpq"),
    ([], r"--emb-method is required"),
    (["--emb-method", "dpq", "--emb-codes", "8", "--emb-groups", "8", "--emb-rank", "4"],
     r"--emb-rank does not apply to --emb-method dpq; its flags are --emb-codes"),
    (["--emb-method", "dense", "--emb-codes", "8"],
     r"--emb-codes does not apply to --emb-method dense"),
    (["--emb-method", "dpq", "--emb-codes", "1"], r"--emb-method dpq --emb-codes 1: num_codes"),
    (["--emb-method", "dpq", "--emb-codes", "8", "--emb-variant", "pq"],
     r"variant must be one of \['sx', 'vq'\].*--emb-variant"),
    (["--emb-method", "dpq", "--emb-codes", "8", "--emb-groups", "7"],
     r"cannot compress the embedding of the 40-symbol dictionary \(40 x 64\).*7.*--emb-groups"),
    (["--emb-method", "dpq", "--emb-codes", "8", "--emb-groups", "8", "--softmax", "untied",
      "--share-all-embeddings"],
     r"--softmax untied .* but --share-all-embeddings ties .*; drop --share-all-embeddings "
     r"or use --softmax tied"),
    (["--emb-method", "dpq", "--emb-codes", "8", "--emb-groups", "8", "--softmax", "dense",
      "--share-decoder-input-output-embed"],
     r"--softmax dense .* dense.* --share-decoder-input-output-embed ties"),
    (["--emb-method", "dpq", "--emb-codes", "8", "--emb-groups", "8", "--softmax", "sampled"],
     r"--softmax 'sampled' is not a mode; use one of \['tied', 'untied', 'dense'\]"),
    (["--emb-method", "dpq", "--emb-codes", "8", "--emb-groups", "8", "--softmax", "tied",
      "--decoder-output-dim", "32"],
     r"--softmax tied needs the output dimension \(32\) to equal the embedding dimension \(64\)"),
    (["--emb-method", "dpq", "--emb-codes", "8", "--emb-groups", "8", "--adaptive-softmax-cutoff",
      "10"], r"--adaptive-softmax-cutoff .*drop --adaptive-softmax-cutoff"),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[" ".join(f) or "none" for f, _ in BAD])
def test_bad_translation_flags_name_the_flag(data_dir, flags, message):
    with pytest.raises(ValueError, match=message):
        build(data_dir, "translation", "compemb_transformer_tiny", *flags)


def test_bad_lm_and_roberta_flags(data_dir):
    with pytest.raises(ValueError, match=r"--adaptive-input .*drop it"):
        build(data_dir, "language_modeling", "compemb_transformer_lm_tiny", "--emb-method",
              "dpq", *METHOD_FLAGS["dpq"], "--adaptive-input")
    with pytest.raises(ValueError, match=r"--softmax tied .* --untie-weights-roberta asks for "
                                         r"a separate one"):
        build(data_dir, "masked_lm", "compemb_roberta_tiny", "--emb-method", "dpq",
              *METHOD_FLAGS["dpq"], "--softmax", "tied", "--untie-weights-roberta")


@pytest.mark.skipif("tt" not in load_methods(), reason="needs compemb.tt registered")
def test_tt_shape_that_does_not_factorise(data_dir):
    # 40 symbols, 64 dims: rows 2*2*2 = 8 < 40
    with pytest.raises(ValueError, match=r"^--emb-method tt --emb-shape 2,2,2x4,4,4: cannot "
                                         r"compress the embedding of the 40-symbol dictionary "
                                         r"\(40 x 64\): .*\(flags: shape=--emb-shape\); for "
                                         r"example --emb-method tt --emb-rank \d+ --emb-shape "
                                         r"[\d,]+x[\d,]+ reaches 10x for this table$"):
        build(data_dir, "translation", "compemb_transformer_tiny", "--emb-method", "tt",
              "--emb-shape", "2,2,2x4,4,4")
    with pytest.raises(ValueError, match=r"--emb-shape must be .*such as '25,30,40x4,8,8'"):
        build(data_dir, "translation", "compemb_transformer_tiny", "--emb-method", "tt",
              "--emb-shape", "2,2,2")


def test_bad_flag_stops_fairseq_train_before_training(data_dir, tmp_path):
    """From the command line: the message, and nothing written to --save-dir."""
    save = tmp_path / "ck"
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_cli.train", str(data_dir), "--user-dir", PLUGIN,
         "--task", "language_modeling", "--arch", "compemb_transformer_lm_tiny",
         "--emb-method", "dpq", "--emb-codes", "8", "--emb-groups", "8", "--emb-rank", "4",
         "--optimizer", "adam", "--lr", "0.001", "--max-tokens", "100", "--cpu",
         "--save-dir", str(save)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "ValueError: --emb-rank does not apply to --emb-method dpq" in proc.stderr
    assert "begin training" not in proc.stdout
    assert not save.exists() or not any(save.iterdir())


# ---------------------------------------------------------------------- safe loading

class _Payload:
    """Any class that is not on the allowlist."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_plugin_allowlists_namespace_and_numpy_containers_only():
    from fairseq_plugin.safe_load import FAIRSEQ_CHECKPOINT_GLOBALS
    names = sorted(g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"
                   for g in FAIRSEQ_CHECKPOINT_GLOBALS)
    names = [n for n in names if not n.startswith("numpy.dtypes.")]  # dtype classes
    assert len(names) == 7 and set(names) == {"argparse.Namespace", "numpy.core.multiarray._reconstruct",
                          "numpy.core.multiarray.scalar", "numpy.dtype", "numpy.ndarray",
                          "numpy._core.multiarray._reconstruct", "numpy._core.multiarray.scalar"}
    assert argparse.Namespace in torch.serialization.get_safe_globals()
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") in (None, "", "0")


def test_checkpoint_with_other_pickled_objects_is_refused(tmp_path):
    from fairseq import checkpoint_utils
    good = {"args": None, "cfg": {"model": argparse.Namespace(arch="x")},
            "model": {"w": torch.ones(2)},
            "extra_state": {"metrics": {"counts": np.arange(4), "best": np.float64(0.5)}}}
    torch.save(good, tmp_path / "good.pt")
    loaded = torch.load(tmp_path / "good.pt")  # weights_only=True, the default
    assert loaded["cfg"]["model"].arch == "x"
    assert loaded["extra_state"]["metrics"]["counts"].tolist() == [0, 1, 2, 3]
    for payload in (_Payload(), nn.Linear(2, 2), {"nested": [argparse.ArgumentParser]},
                    np.array([_Payload()], dtype=object)):
        bad = dict(good, extra_state={"evil": payload})
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            torch.load(tmp_path / "bad.pt")
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "bad.pt"))


# ---------------------------------------------------------------------- stock models

def test_plugin_leaves_fairseq_architectures_unchanged():
    """In a fresh process: every stock model and architecture is the same object before
    and after importing the plugin; the plugin only adds its own."""
    code = r"""
import sys
from fairseq.models import ARCH_MODEL_REGISTRY, ARCH_CONFIG_REGISTRY, MODEL_REGISTRY
from fairseq.models.transformer import TransformerModel
before = (dict(MODEL_REGISTRY), dict(ARCH_MODEL_REGISTRY), dict(ARCH_CONFIG_REGISTRY))
methods = dict(vars(TransformerModel))
from fairseq import utils
utils.import_user_module(type("A", (), {"user_dir": sys.argv[1]})())
after = (MODEL_REGISTRY, ARCH_MODEL_REGISTRY, ARCH_CONFIG_REGISTRY)
for old, new in zip(before, after):
    for key, value in old.items():
        assert new[key] is value, key
added = sorted(set(after[1]) - set(before[1]))
ours = [a for a in added if after[1][a].__module__.startswith("fairseq_plugin.")]
assert ours and all(a.startswith("compemb_") for a in ours), ours
# anything else added comes from a fairseq example the plugin imports (the
# truncated_bptt_lm task's module also registers its transformer_xl), not the plugin
others = {a: after[1][a].__module__ for a in added if a not in ours}
assert all(m.startswith("fairseq.examples.") for m in others.values()), others
added = ours
assert dict(vars(TransformerModel)) == methods
print(" ".join(added))
"""
    proc = subprocess.run([sys.executable, "-c", code, PLUGIN], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    added = proc.stdout.split()
    for arch in ("compemb_transformer_tiny", "compemb_transformer_base",
                 "compemb_transformer_wmt_en_de_big", "compemb_transformer_lm",
                 "compemb_transformer_lm_wiki103", "compemb_transformer_lm_tiny",
                 "compemb_roberta_base", "compemb_roberta_tiny"):
        assert arch in added


def test_stock_transformer_still_builds_nn_embedding(data_dir):
    model, _ = build(data_dir, "translation", "transformer_tiny")
    assert type(model.encoder.embed_tokens) is nn.Embedding
    assert type(model.decoder.output_projection) is nn.Linear
    assert "_extra_state" not in model.state_dict()


def test_architecture_sizes(data_dir):
    """The named architectures have the sizes their names promise (built on the meta
    device would need fairseq support; the big ones are checked through their args)."""
    from fairseq.models import ARCH_CONFIG_REGISTRY
    for arch, want in [("compemb_transformer_wmt_en_de_big", (1024, 4096, 16, 6)),
                       ("compemb_transformer_base", (512, 2048, 8, 6)),
                       ("compemb_transformer_tiny", (64, 128, 2, 2)),
                       ("compemb_roberta_base", (768, 3072, 12, 12)),
                       ("compemb_roberta_tiny", (64, 128, 2, 2))]:
        args = argparse.Namespace()
        ARCH_CONFIG_REGISTRY[arch](args)
        assert (args.encoder_embed_dim, args.encoder_ffn_embed_dim,
                args.encoder_attention_heads, args.encoder_layers) == want, arch
    for arch, want in [("compemb_transformer_lm_wiki103", (1024, 4096, 8, 16)),
                       ("compemb_transformer_lm_tiny", (64, 128, 2, 2))]:
        args = argparse.Namespace()
        ARCH_CONFIG_REGISTRY[arch](args)
        assert (args.decoder_embed_dim, args.decoder_ffn_embed_dim,
                args.decoder_attention_heads, args.decoder_layers) == want, arch
        assert not args.adaptive_input and args.adaptive_softmax_cutoff is None


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, damage):
    from fairseq import checkpoint_utils

    from fairseq_plugin.export import export_checkpoint

    good = {"args": None, "cfg": {"model": argparse.Namespace(arch="x", emb_method="dpq")},
            "model": {"w": torch.ones(300)}}
    path = tmp_path / "checkpoint_last.pt"
    torch.save(good, path)
    with pytest.raises(KeyError, match="best_loss"):  # readable: fairseq's own error stands
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07" * 64,
                      "empty": b""}[damage])
    message = r"checkpoint_last.pt is not a readable fairseq checkpoint \(corrupt or truncated\?\)"
    with pytest.raises(ValueError, match=message):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))  # resume, generate, eval-lm ...
    with pytest.raises(ValueError, match=message):
        export_checkpoint(str(path), str(tmp_path / "out.pt"))
    assert not (tmp_path / "out.pt").exists()
    with pytest.raises(FileNotFoundError):  # not damage: the error stays what it was
        checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "missing.pt"))
