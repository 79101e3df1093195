"""bench.train_step runs end to end on tiny models: a row per model and method with
positive step times, the dense row as the ratio's base, the compression report's ratio,
the paper's figure labelled as the paper's. No timing assertions."""
import re

import pytest

from bench import train_step

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--warmup", "1", "--steps", "1", "--threads", "1", "--vocab", "64", "--d-model", "16",
        "--layers", "1", "--heads", "2", "--ffn", "32", "--batch", "2", "--seq-len", "6",
        "--tt-rank", "2", "--dpq-codes", "4", "--dpq-groups", "4"]


def test_table_has_a_row_per_model_and_method(capsys):
    rows = train_step.main(TINY)
    out = capsys.readouterr().out
    assert [(r.model, r.method) for r in rows] == [
        (m, k) for m in train_step.MODELS for k in train_step.METHODS]
    for r in rows:
        assert len(r.case.times) == 1 and r.case.times[0] > 0
        assert r.peak_mib is None  # CPU: no peak-memory column
        # the printed line: model, method, ms/step, min ms, x dense, peak, ratio
        line = re.search(rf"^{r.model}\s+{r.method}\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+-\s+"
                         rf"([0-9.]+)x$", out, flags=re.M)
        assert line, (r.model, r.method, out)
        assert float(line.group(1)) > 0
        if r.method == "dense":
            assert r.embedding_ratio == 1.0 and line.group(3) == "1.00"
        else:
            assert r.embedding_ratio > 1.0
            assert float(line.group(4)) == pytest.approx(r.embedding_ratio, abs=0.051)
    assert ("the TT paper's figure (Transformer-big, WMT'14, GPU, mixed precision): +8% per "
            "iteration (1.14 -> 1.23)") in out
    assert re.search(r"^  ours, marian TT: [+-]\d+% per step$", out, flags=re.M)
    assert re.search(r"^  ours, transfo_xl TT: [+-]\d+% per step$", out, flags=re.M)


def test_one_model_and_method_and_bad_names(capsys):
    rows = train_step.main(TINY + ["--models", "transfo_xl", "--methods", "dense,dpq-vq"])
    assert [(r.model, r.method) for r in rows] == [("transfo_xl", "dense"), ("transfo_xl", "dpq-vq")]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_step.main(TINY + ["--methods", "dense,svd"])
    assert "--methods: svd; choose from dense, tt, dpq-sx, dpq-vq" in capsys.readouterr().err
