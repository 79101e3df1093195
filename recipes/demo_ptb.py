"""The README's main job: a small LSTM language model on PTB trained three times, with a
dense, a Tensor-Train and a DPQ input embedding (the softmax a plain dense layer, the same
in all three), printing each compression report and the perplexities.

For compressed softmax layers too (tied or untied), see ``python -m recipes.lstm_lm --help``.

    ./dev.sh demo [--steps 400]
"""
from __future__ import annotations

import argparse
from typing import List, Optional

import torch

import compemb

from .lstm_lm import SCALES, train

RUNS = [
    ("dense", compemb.EmbeddingSpec("dense")),
    ("tt r=16", compemb.EmbeddingSpec("tt", {"rank": 16})),
    ("dpq-sx K=32 D=25", compemb.EmbeddingSpec("dpq", {"num_codes": 32, "num_groups": 25})),
]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="training steps per model")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    scale = dict(SCALES["small"], layers=1, dropout=0.1)
    rows = []
    for label, spec in RUNS:
        result = train(spec, "dense", scale, max_steps=args.steps)
        print(f"\n== {label} ==")
        print(result["report_obj"])
        rows.append((label, result))
    print(f"\nPTB, 1-layer LSTM h={scale['hidden']}, dense softmax, {args.steps} steps of "
          f"{scale['batch']}x{scale['bptt']} tokens each")
    print(f"{'embedding':<18} {'ratio':>8} {'params':>10} {'valid ppl':>10} {'test ppl':>9} {'time':>7}")
    for label, r in rows:
        print(f"{label:<18} {r['embedding_ratio']:>7.1f}x {r['total_parameters']:>10,} "
              f"{r['valid_ppl']:>10.1f} {r['value']:>9.1f} {r['wall_time_s']:>6.0f}s")


if __name__ == "__main__":
    main()
