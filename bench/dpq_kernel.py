"""One-token DPQ logits by layout: the native kernel's decode path against a dense GEMV.

Run ``python -m bench.dpq_kernel [--threads 1] [--repeats 60]``. For V = 49152 (SmolLM2's
vocabulary) and random codes, prints the median time of
:func:`compemb.dpq.kernels.logits_from_blocked` for one hidden state (``impl="native"``:
the C kernel's one-token path, in-register permutes for ``uint8`` codes on AVX-512) at the
layouts ``compemb compress`` and the decode benchmark use, and of the dense ``[1, d] @
[d, V]`` product of the same size: interleaved over the repeats (the dense tables, 113 MB
each, stream through the cache between calls, as the rest of a model does in a decode
step), then each case back to back (its codes stay in the cache). The kernel must be built
(a C compiler); the numbers are checked equal to the PyTorch path before timing.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/lookup.py

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from compemb.dpq import kernels  # noqa: E402

#: (codes per group, groups, dimensions per group): 128 x 192 x 3 is compress_pretrained's
#: DPQ at 10x with no user text (residual share 0.2), 32 x 288 x 2 its layout at share 0.1,
#: 256 x 144 x 4 the decode benchmark's inference form.
LAYOUTS = ((32, 288, 2), (64, 192, 3), (128, 192, 3), (256, 144, 4))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--vocab", type=int, default=49152)
    args = parser.parse_args(argv)
    if not kernels.native_available():
        raise SystemExit("the native DPQ kernel is not built here (needs gcc); nothing to time")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    cases = {}
    for num_codes, groups, dims in LAYOUTS:
        codes = torch.randint(num_codes, (args.vocab, groups), generator=g)
        values = torch.randn(groups, num_codes, dims, generator=g)
        blocked = kernels.block_codes(codes, num_codes)
        hidden = torch.randn(1, groups * dims, generator=g)
        fast = kernels.logits_from_blocked(hidden, values, blocked, args.vocab, impl="native")
        ref = kernels.logits_from_blocked(hidden, values, blocked, args.vocab, impl="torch")
        assert torch.equal(fast, ref), (num_codes, groups)
        cases[f"K={num_codes}, {groups} groups of {dims}"] = (
            lambda h=hidden, v=values, b=blocked: kernels.logits_from_blocked(
                h, v, b, args.vocab, impl="native"))
        weight = torch.randn(args.vocab, groups * dims, generator=g)
        cases[f"dense GEMV, d={groups * dims}"] = lambda h=hidden, w=weight: h @ w.T
    interleaved = {name: [] for name in cases}
    for fn in cases.values():
        fn()
    for _ in range(args.repeats):
        for name, fn in cases.items():
            interleaved[name].append(_seconds(fn))
    warm = {name: [_seconds(fn) for _ in range(args.repeats)] for name, fn in cases.items()}
    print(f"# bench.dpq_kernel, V={args.vocab}, one hidden state, {args.threads} thread(s), "
          f"median of {args.repeats}, load average {os.getloadavg()[0]:.2f}")
    print("| case | ms, interleaved | ms, back to back |\n| --- | ---: | ---: |")
    for name in cases:
        print(f"| {name} | {1e3 * statistics.median(interleaved[name]):.3f} "
              f"| {1e3 * statistics.median(warm[name]):.3f} |")


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
