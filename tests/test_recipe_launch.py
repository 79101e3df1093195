"""Recipes under `accelerate launch` with two CPU processes (recipes/launch.sh with
recipes/accelerate/cpu_ddp.yaml): each process trains on its own share of the data, one
results.json is written, and it says how many processes trained."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

import compemb
from recipes import lstm_lm, sentiment
from recipes.common.ptb import Vocab, load_ptb_text
from recipes.models.lstm_lm import LSTMLanguageModel
from test_recipes import make_rt_archive  # as test_recipe_bert does

ROOT = Path(__file__).resolve().parents[1]


def _launch(recipe: str, out: Path, *argv: str) -> dict:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "ACCELERATE_CONFIG": str(ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml"),
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("ACCELERATE_USE_CPU", None)  # launch.sh must set it from the config
    proc = subprocess.run(["bash", str(ROOT / "recipes" / "launch.sh"), recipe, "--scale", "smoke",
                           "--no-progress", "--threads", "1", "--out", str(out), *argv],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


def test_lstm_lm_two_processes_split_the_streams(ptb_cache, tmp_path):
    two = _launch("lstm_lm", tmp_path / "two", "--method", "tt", "--rank", "4")
    lstm_lm.main(["--scale", "smoke", "--no-progress", "--threads", "1", "--method", "tt",
                  "--rank", "4", "--out", str(tmp_path / "one")])
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["hardware"].endswith(", 2 processes")
    # the same epochs over the same text: each process has half the streams, so an epoch
    # is half the steps and the same tokens (up to the streams' rounding)
    scale = lstm_lm.SCALES["smoke"]
    per_step = scale["batch"] * scale["bptt"]
    assert abs(2 * two["steps"] - one["steps"]) <= 2
    assert abs(two["train_tokens"] - one["train_tokens"]) <= 2 * 2 * per_step
    assert math.isfinite(two["value"]) and two["value"] != one["value"]
    vocab = Vocab(load_ptb_text()["train"])
    model = LSTMLanguageModel(len(vocab), scale["dim"], scale["hidden"], scale["layers"],
                              compemb.EmbeddingSpec.from_dict(two["settings"]), output="tied")
    model.load_state_dict(torch.load(tmp_path / "two" / "model.pt", weights_only=True))


def test_sentiment_two_processes_shard_the_batches(cache, tmp_path):
    make_rt_archive(cache)
    two = _launch("sentiment", tmp_path / "two")
    sentiment.main(["--scale", "smoke", "--no-progress", "--threads", "1", "--out", str(tmp_path / "one")])
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["steps"] == one["steps"] // 2  # 8 batches: 4 on each process
    assert two["examples"] == one["examples"]  # every test example is scored once
    assert 0.0 <= two["value"] <= 1.0
