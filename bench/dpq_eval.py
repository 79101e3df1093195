"""DPQ eval-mode logits against the exported form (issue 14, item 3).

A ``DPQEmbedding`` in eval mode gives the same logits as its exported
``CodebookEmbedding``; before the eval code cache it recomputed the codes of the whole
vocabulary at every ``logits()`` call. This prints, at 32768 x 512, K=32, G=64 (groups),
for a batch of B=8 hidden vectors (the size of a decoding step), the median time of

* ``CodebookEmbedding.logits`` (the exported form),
* ``DPQEmbedding.logits`` in eval mode (codes cached after the first call),
* ``DPQEmbedding.logits`` with the cache dropped before every call (what each call cost
  before the cache),

interleaved over the repeats, and the ratio against the target (eval logits within 1.5x of
the exported form). Run: ``python -m bench.dpq_eval [--repeats N] [--threads T]``.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Callable, Dict  # noqa: E402

import torch  # noqa: E402

from compemb.dpq import DPQEmbedding  # noqa: E402

V, J, K, G, B = 32768, 512, 32, 64, 8
TARGET = 1.5


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def run(repeats: int = 20, threads: int = 2) -> Dict[str, float]:
    """Median milliseconds per case; prints them and the target check."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layer = DPQEmbedding(V, J, num_codes=K, num_groups=G, variant="sx").eval()
    exported = layer.export()
    hidden = torch.randn(B, J)
    with torch.no_grad():
        torch.testing.assert_close(layer.logits(hidden), exported.logits(hidden))

        def uncached():
            layer.clear_codes_cache()
            return layer.logits(hidden)

        cases = {"exported CodebookEmbedding.logits": lambda: exported.logits(hidden),
                 "DPQEmbedding.logits, eval (cached codes)": lambda: layer.logits(hidden),
                 "DPQEmbedding.logits, eval, codes recomputed": uncached}
        for fn in cases.values():  # warm-up
            fn()
        times: Dict[str, list] = {name: [] for name in cases}
        for _ in range(repeats):
            for name, fn in cases.items():
                times[name].append(_time(fn))
        layer.logits(hidden)  # leave the cache filled
    medians = {name: statistics.median(t) for name, t in times.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"DPQ eval logits, {V} x {J}, K={K}, G={G}, B={B}; torch {torch.__version__}, "
          f"{threads} thread(s), {repeats} repeats, load average {load:.1f}")
    for name, ms in medians.items():
        print(f"  {name:<46s} {ms:9.2f} ms")
    base = medians["exported CodebookEmbedding.logits"]
    ratio = medians["DPQEmbedding.logits, eval (cached codes)"] / base
    before = medians["DPQEmbedding.logits, eval, codes recomputed"] / base
    print(f"  eval / exported: {ratio:.2f}x (target <= {TARGET}x: "
          f"{'PASS' if ratio <= TARGET else 'MISS'}); without the cache {before:.1f}x")
    return medians


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    run(args.repeats, args.threads)


if __name__ == "__main__":
    main()
