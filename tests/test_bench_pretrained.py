"""bench/pretrained_lm.py: the round-to-nearest baseline and the plot (the perplexity runs
themselves need the packaged models and take hours on a CPU: they are a benchmark)."""
import json

import pytest
import torch

from bench.pretrained_lm import (LEGAL_CALIB, LEGAL_EVAL, PY_CALIB, PY_EVAL, default_rows,
                                 loss_by_band, markdown, perplexity, plot, round_to_nearest,
                                 token_nll)


def test_round_to_nearest_levels_bytes_and_error():
    w = torch.randn(64, 96)
    errors = []
    for bits in (8, 4, 3, 2):
        for group in (None, 32):
            q, nbytes = round_to_nearest(w, bits, group)
            levels = q.reshape(-1, group or 96)
            assert all(row.unique().numel() <= 2 ** bits for row in levels)
            meta = (64 * 96 // group) * 4 if group else 64 * 8
            assert nbytes == 64 * 96 * bits // 8 + meta
            errors.append(float((q - w).pow(2).mean()))
    assert errors[0] < errors[2] < errors[4] < errors[6]  # fewer bits, more error (per row)
    assert errors[3] < errors[2]  # groups of 32 beat one scale per row at 4 bits


class _Unigram(torch.nn.Module):
    """A causal LM stand-in whose logits ignore the context: ``log_probs [V]`` everywhere."""

    def __init__(self, log_probs):
        super().__init__()
        self.log_probs = log_probs

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.log_probs.expand(*input_ids.shape, -1)})


def test_token_nll_and_perplexity_score_every_predicted_token():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    windows = torch.tensor([[0, 1, 2, 3], [3, 0, 0, 1], [2, 2, 1, 0]])
    nll = token_nll(_Unigram(probs.log()), windows, batch=2)
    expected = -probs.log()[windows[:, 1:].reshape(-1)]
    assert torch.allclose(nll, expected)
    assert perplexity(_Unigram(probs.log()), windows) == pytest.approx(
        float(expected.double().mean().exp()))


def test_loss_by_band_splits_the_added_loss_by_target_id():
    targets = torch.tensor([0, 1, 600, 600, 3000, 30000])
    dense = torch.ones(6)
    nll = dense + torch.tensor([0.0, 0.2, 0.1, 0.1, 0.4, 1.2])
    bands = loss_by_band(nll, dense, targets, bands=(0, 500, 2000))
    assert list(bands) == ["0-500", "500-2000", "2000-V"]
    shares = {k: v[0] for k, v in bands.items()}
    assert shares == pytest.approx({"0-500": 2 / 6, "500-2000": 2 / 6, "2000-V": 2 / 6})
    assert [v[1] for v in bands.values()] == pytest.approx([0.1, 0.1, 0.8])  # of the 2.0 added
    assert [v[2] for v in bands.values()] == pytest.approx([0.1, 0.1, 0.8])  # nats per token
    empty = loss_by_band(nll, dense, targets, bands=(0, 500, 2000, 20000, 25000))
    assert empty["20000-25000"] == [0.0, 0.0, 0.0]


def test_evaluation_and_calibration_files_are_disjoint():
    assert not set(PY_EVAL) & set(PY_CALIB)
    assert not set(LEGAL_EVAL) & set(LEGAL_CALIB)
    rows = default_rows(10)
    assert rows[0] == "dpq:10:random-sampled:0" and len(rows) == len(set(rows))
    for method in ("dpq", "tt"):
        for ratio in (4, 10, 16, 32):
            for minutes in (0, 10):
                assert f"{method}:{ratio}:ptb+random-sampled:{minutes}" in rows
    assert {f"rtn:{b}:{k}" for b in (8, 4, 3, 2) for k in ("row", "g32")} <= set(rows)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"model": "smollm2", "row": "dense", "bytes": 1000, "ratio": 1.0, "ppl": {"ptb": 10.0, "python": 5.0}},
            {"model": "smollm2", "row": "rtn int4 row", "bytes": 200, "ratio": 5.0, "ppl": {"ptb": 12.0, "python": 6.0}},
            {"model": "smollm2", "row": "dpq 10x", "bytes": 100, "calibration_minutes": 0, "method": "dpq", "source": "ptb", "ratio": 10.0,
             "ppl": {"ptb": 11.0, "python": 5.5}}]
    src = tmp_path / "r.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    plot(src, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    table = markdown(src).splitlines()
    assert table[2].startswith("| dense |") and "12.00 (+20.0%)" in table[3]
    assert "PTB, fit only" in table[4] and "11.00 (+10.0%)" in table[4]
    # rows sorted by kind, then ratio (a 4x row run later comes before the 10x one)
    rows.append({"model": "smollm2", "row": "dpq 4x", "bytes": 250, "method": "dpq", "ratio": 4.0,
                 "source": "ptb+random-sampled", "calibration_minutes": 0,
                 "head_fit": {"steps": 7}, "exact_share": 0.05, "ppl": {"ptb": 10.5, "python": 5.0}})
    src.write_text("\n".join(json.dumps(r) for r in rows))
    table = markdown(src).splitlines()
    assert table[4].startswith("| dpq 4x | PTB + sampled (random starts), head fit 7 steps, "
                               "exact share 0.05 |")
    # a DPQ row without the field ran at the share of its day (0.1), not today's default (0)
    assert "PTB, fit only, exact share 0.1 |" in table[5]
    assert table[5].startswith("| dpq 10x |")
    rows[-1]["transform_rank"] = 32
    src.write_text("\n".join(json.dumps(r) for r in rows))
    assert "exact share 0.05, transform Kronecker + rank 32 |" in markdown(src).splitlines()[4]
    rows[-1].update(residual_share=0.05, seed=1)  # residual rows and a second seed are named
    src.write_text("\n".join(json.dumps(r) for r in rows))
    assert "rank 32, residual rows 0.05, seed 1 |" in markdown(src).splitlines()[4]
    rows[-1]["row_scale"] = True  # a row scale without a recorded power ran at 0.5
    src.write_text("\n".join(json.dumps(r) for r in rows))
    assert "residual rows 0.05, row scale, seed 1 |" in markdown(src).splitlines()[4]
    rows[-1]["row_scale_power"] = 1.0
    src.write_text("\n".join(json.dumps(r) for r in rows))
    assert "residual rows 0.05, row scale power 1, seed 1 |" in markdown(src).splitlines()[4]


def test_rows_not_run_lists_the_default_rows_a_file_lacks(tmp_path):
    from bench.pretrained_lm import default_rows, rows_not_run

    done = [{"model": "smollm2", "row": "dense", "bytes": 1, "ratio": 1.0, "ppl": {}},
            {"model": "smollm2", "row": "rtn int4 g32", "bytes": 1, "ratio": 6.4, "ppl": {}},
            {"model": "smollm2", "row": "dpq 10x", "method": "dpq", "target": 10.0,
             "source": "random-sampled", "calibration_minutes": 0.0, "ppl": {}}]
    src = tmp_path / "r.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in done))
    missing = rows_not_run(src)
    assert missing == [s for s in default_rows(10.0) if s not in ("rtn:4:g32", "dpq:10:random-sampled:0")]
