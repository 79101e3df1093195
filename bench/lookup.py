"""Lookup and logits benchmark: compressed layers against ``nn.Embedding`` and a dense GEMM.

Run ``python -m bench.lookup`` (``--help`` for options). Prints, in one run, the
forward+backward time (median over interleaved repeats, so that every case sees the same
machine load) and the peak memory (resident-set growth of one step, measured in a forked
child) of

* a batch of 4096 ids, drawn Zipf-like (as in text) and uniformly, for ``nn.Embedding``
  (dense gradient, the transformers default), ``TTEmbedding``, ``TREmbedding`` and a
  full-rebuild TT baseline written here (the reference code's approach: build the V x J
  table from the cores, then index it);
* ``.logits(hidden)`` against the dense GEMM ``hidden @ W.T``;

at the paper's configurations 25000 x 256 (shape (25,30,40)x(4,8,8), rank 16) and
32768 x 1024 (shape (32,32,32)x(8,8,16), ranks 16 and 64), and checks the targets (as
ratios within this run) with PASS/MISS.

Cases are plain named callables (:class:`Case`), grouped so that every group has its
baseline; other methods add theirs by extending :data:`CASE_SOURCES` with a function
returning a list of cases (e.g. ``bench.dpq_cases.cases``) and :data:`TARGET_SOURCES` with
one returning their PASS/MISS rows.

Reading the numbers: the header prints the load average. On a machine with more runnable
processes than cores, every multi-threaded op waits for descheduled threads, and a layer
made of ~20 parallel ops (TT, TR) suffers far more than one of ~3 (``nn.Embedding``);
compare ``--threads 1`` and ``--threads 2`` there (``--threads 1,2`` runs both). The
benchmark sets ``OMP_WAIT_POLICY=PASSIVE`` unless it is set already (see below).
"""
from __future__ import annotations

import os

# Threads that have finished a parallel region sleep instead of spinning (set before torch
# loads OpenMP; an explicit OMP_WAIT_POLICY wins). On a shared 2-core machine the spinning
# worker steals the cores from the main thread: at 2 threads a TT step measured 460 ms
# spinning and 28 ms passive, nn.Embedding 90 and 71 ms.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import math  # noqa: E402
import multiprocessing as mp  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from compemb.tr import TREmbedding  # noqa: E402
from compemb.tt import TTEmbedding  # noqa: E402

BATCH = 4096
# The ring carries its first rank through every product: a lookup costs R0 times a TT
# lookup of the same rank (J*R*R0 multiply-adds per row), and at rank 64 the shared
# prefixes of 32768 x 1024 alone take about 1 GB (measured: 18-24 s and 3-5 GB per step).
# The paper's TR ranks are 16 and 32, so larger TR ranks are left out.
TR_MAX_RANK = 32
CONFIGS = [  # name, V, J, shape, ranks to run
    ("25000x256", 25000, 256, ((25, 30, 40), (4, 8, 8)), (16,)),
    ("32768x1024", 32768, 1024, ((32, 32, 32), (8, 8, 16)), (16, 64)),
]


@dataclass
class Case:
    """One timed thing. ``setup()`` builds what ``step`` needs and returns the step: a
    callable doing one forward+backward (or forward) pass, which drops the gradients it
    made before returning (so the peak-memory run sees them allocated within the step).
    ``group`` collects cases compared with each other; ``baseline`` marks the group's
    reference."""

    name: str
    group: str
    setup: Callable[[], Callable[[], None]]
    baseline: bool = False
    times: List[float] = field(default_factory=list)
    peak_mib: Optional[float] = None

    @property
    def median_ms(self) -> float:
        t = sorted(self.times)
        return 1e3 * t[len(t) // 2] if t else float("nan")


# ----------------------------------------------------------------------------- inputs
def zipf_ids(num_embeddings: int, n: int, generator: torch.Generator, s: float = 1.0) -> Tensor:
    """Ids with P(i) proportional to 1/(i+1)^s (a frequency-sorted vocabulary)."""
    weights = 1.0 / torch.arange(1, num_embeddings + 1, dtype=torch.float64) ** s
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def uniform_ids(num_embeddings: int, n: int, generator: torch.Generator) -> Tensor:
    return torch.randint(0, num_embeddings, (n,), generator=generator)


# ----------------------------------------------------------------------------- baselines
class FullRebuildTT(nn.Module):
    """The reference code's TT embedding: rebuild the whole V x J table from the cores
    at every call (successive core products, then one permute), then index it."""

    def __init__(self, layer: TTEmbedding) -> None:
        super().__init__()
        self.cores = nn.ParameterList([nn.Parameter(c.detach().clone()) for c in layer.cores])
        self.shape = layer.shape
        self.num_embeddings = layer.num_embeddings

    def full(self) -> Tensor:
        rows, cols = self.shape
        n = len(rows)
        res = self.cores[0].reshape(-1, self.cores[0].shape[-1])  # [I1*J1, R1]
        for core in self.cores[1:]:
            res = (res @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1])
        res = res.reshape([d for k in range(n) for d in (rows[k], cols[k])])
        res = res.permute(*range(0, 2 * n, 2), *range(1, 2 * n, 2))
        return res.reshape(math.prod(rows), math.prod(cols))[: self.num_embeddings]

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.full())


DEVICE = torch.device("cpu")  # set by --device


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _lookup_step(module: nn.Module, ids: Tensor, grad: Tensor) -> Callable[[], None]:
    module, ids, grad = module.to(DEVICE), ids.to(DEVICE), grad.to(DEVICE)
    params = list(module.parameters())

    def step() -> None:
        module(ids).backward(grad)
        _sync()
        for p in params:  # freed at the end, so the next step starts without them
            p.grad = None

    return step


def lookup_cases(configs: Sequence = CONFIGS, batch: int = BATCH,
                 dists: Sequence[str] = ("zipf", "uniform"), tr: bool = True) -> List[Case]:
    """nn.Embedding, TT, TR and the full-rebuild TT for each configuration and id
    distribution; every step does forward and backward with the same output gradient."""
    cases: List[Case] = []
    for name, v, j, shape, ranks in configs:
        for dist in dists:
            group = f"lookup {name} {dist}"

            def inputs(v=v, j=j, dist=dist):
                g = torch.Generator().manual_seed(0)
                ids = (zipf_ids if dist == "zipf" else uniform_ids)(v, batch, g)
                return ids, torch.randn(batch, j, generator=g)

            def dense(v=v, j=j, inputs=inputs):
                ids, grad = inputs()
                return _lookup_step(nn.Embedding(v, j), ids, grad)

            cases.append(Case("nn.Embedding", group, dense, baseline=True))
            for r in ranks:
                def tt(v=v, j=j, r=r, shape=shape, inputs=inputs):
                    ids, grad = inputs()
                    return _lookup_step(TTEmbedding(v, j, r, shape=shape), ids, grad)

                def rebuild(v=v, j=j, r=r, shape=shape, inputs=inputs):
                    ids, grad = inputs()
                    return _lookup_step(FullRebuildTT(TTEmbedding(v, j, r, shape=shape)), ids, grad)

                cases.append(Case(f"TT r={r}", group, tt))
                cases.append(Case(f"TT full-rebuild r={r}", group, rebuild))
                if tr and r <= TR_MAX_RANK:
                    def ring(v=v, j=j, r=r, shape=shape, inputs=inputs):
                        ids, grad = inputs()
                        return _lookup_step(TREmbedding(v, j, r, shape=shape), ids, grad)

                    cases.append(Case(f"TR r={r}", group, ring))
    return cases


def logits_cases(configs: Sequence = CONFIGS, batches: Dict[str, int] = None) -> List[Case]:
    """``layer.logits(hidden)`` forward+backward against the dense ``hidden @ W.T``."""
    batches = batches or {"25000x256": 2048, "32768x1024": 1024}
    cases: List[Case] = []
    for name, v, j, shape, ranks in configs:
        b = batches.get(name, 1024)
        group = f"logits {name} B={b}"

        def inputs(b=b, j=j, v=v):
            g = torch.Generator().manual_seed(1)
            return (torch.randn(b, j, generator=g).to(DEVICE),
                    torch.randn(b, v, generator=g).to(DEVICE))

        def dense(v=v, j=j, inputs=inputs):
            hidden, grad = inputs()
            weight = nn.Parameter(torch.randn(v, j, device=DEVICE) * 0.02)

            def step() -> None:
                F.linear(hidden, weight).backward(grad)
                _sync()
                weight.grad = None
            return step

        cases.append(Case("dense GEMM", group, dense, baseline=True))
        for r in ranks:
            def tt(v=v, j=j, r=r, shape=shape, inputs=inputs):
                hidden, grad = inputs()
                layer = TTEmbedding(v, j, r, shape=shape).to(DEVICE)

                def step() -> None:
                    layer.logits(hidden).backward(grad)
                    _sync()
                    for p in layer.parameters():
                        p.grad = None
                return step

            cases.append(Case(f"TT r={r}", group, tt))
    return cases


# Functions returning lists of cases, and functions turning the measured cases into
# (description, ratio, limit, passed) rows; other methods' cases join here (e.g.
# bench.dpq_cases.cases / bench.dpq_cases.targets).
def dpq_cases() -> List[Case]:
    """DPQ training and CodebookEmbedding inference (``bench/dpq_cases.py``)."""
    from . import dpq_cases as dpq

    return dpq.cases(str(DEVICE))


CASE_SOURCES: List[Callable[[], List[Case]]] = [lookup_cases, logits_cases, dpq_cases]


# ----------------------------------------------------------------------------- measuring
def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return -1


def _peak_child(case: Case, threads: int, conn) -> None:
    torch.set_num_threads(threads)
    try:
        import ctypes

        # fixed mmap threshold: every block > 64 KiB is mapped on allocation and unmapped
        # when freed, so the resident set follows the live tensors (no reuse of pages
        # kept by malloc); then one warm-up step (one-time library buffers) and the
        # measured one.
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
    try:
        step = case.setup()
        step()
        base = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark
            f.write("5")
        step()
        conn.send((_status_kib("VmHWM") - base) / 1024)
    except Exception as exc:  # pragma: no cover - reported, not fatal
        conn.send(f"{type(exc).__name__}: {exc}")
    conn.close()


def peak_memory_mib(case: Case, threads: int) -> Optional[float]:
    """Resident-set growth (MiB) of one step (after a warm-up step) in a forked process
    (so no earlier case's freed memory is reused); None where /proc is not available."""
    if not os.path.exists("/proc/self/clear_refs") or "fork" not in mp.get_all_start_methods():
        return None
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_peak_child, args=(case, threads, child))
    proc.start()
    result = parent.recv()
    proc.join()
    return result if isinstance(result, float) else None


def run(cases: List[Case], repeats: int, threads: int, memory: bool = True) -> None:
    """Time every case ``repeats`` times, interleaved (round-robin over the cases so that
    load changes hit all of them alike); one warm-up step each."""
    if memory:
        for case in cases:
            case.peak_mib = peak_memory_mib(case, threads)
    torch.set_num_threads(threads)
    steps = []
    for case in cases:
        step = case.setup()
        step()  # warm-up
        steps.append(step)
    for _ in range(repeats):
        for case, step in zip(cases, steps):
            t0 = time.perf_counter()
            step()
            case.times.append(time.perf_counter() - t0)


def _find(cases: List[Case], group: str, name: str) -> Optional[Case]:
    for c in cases:
        if c.group == group and c.name == name:
            return c
    return None


def report(cases: List[Case]) -> str:
    lines = []
    groups: List[str] = []
    for c in cases:
        if c.group not in groups:
            groups.append(c.group)
    for group in groups:
        members = [c for c in cases if c.group == group]
        base = next((c for c in members if c.baseline), members[0])
        lines.append(f"\n{group}")
        lines.append(f"  {'case':<24}{'ms (median)':>12}{'min ms':>9}{'x base':>8}{'peak MiB':>10}")
        for c in members:
            peak = "-" if c.peak_mib is None else f"{c.peak_mib:.0f}"
            lines.append(f"  {c.name:<24}{c.median_ms:>12.1f}{1e3 * min(c.times):>9.1f}"
                         f"{c.median_ms / base.median_ms:>8.2f}{peak:>10}")
    return "\n".join(lines)


def targets(cases: List[Case]) -> List[Tuple[str, float, float, bool]]:
    """(description, measured ratio, limit, passed) for the CPU targets of issue 2."""
    out = []

    def ratio(group: str, num: str, den: str) -> Optional[float]:
        a, b = _find(cases, group, num), _find(cases, group, den)
        return None if a is None or b is None else a.median_ms / b.median_ms

    for dist in ("zipf", "uniform"):
        g = f"lookup 32768x1024 {dist}"
        for r, limit in ((16, 0.5), (64, 1.5)):
            x = ratio(g, f"TT r={r}", "nn.Embedding")
            if x is not None:
                out.append((f"{g}: TT r={r} / nn.Embedding", x, limit, x <= limit))
    for c in cases:
        if c.name.startswith("TT r=") and c.group.startswith("lookup"):
            x = ratio(c.group, c.name, c.name.replace("TT ", "TT full-rebuild "))
            if x is not None:
                out.append((f"{c.group}: {c.name} / full rebuild", x, 0.2, x <= 0.2))
        if c.name.startswith("TT r=") and c.group.startswith("logits"):
            x = ratio(c.group, c.name, "dense GEMM")
            if x is not None:
                out.append((f"{c.group}: {c.name} / dense GEMM", x, 1.1, x <= 1.1))
    return out


def dpq_targets(cases: List[Case]) -> List[Tuple[str, float, float, bool]]:
    from . import dpq_cases as dpq

    return dpq.targets(cases)


TARGET_SOURCES: List[Callable[[List[Case]], List[Tuple[str, float, float, bool]]]] = [
    targets, dpq_targets]


def main(argv: Optional[Sequence[str]] = None) -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per case")
    parser.add_argument("--threads", default="2",
                        help="torch.set_num_threads; a comma list runs everything once per value")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--no-tr", action="store_true", help="leave out the TR layer")
    parser.add_argument("--only", default="", help="run only groups containing this text")
    parser.add_argument("--logits-batch", type=int, default=None,
                        help="hidden vectors per .logits step at every configuration (default: "
                             "2048 at 25000 x 256, 1024 at 32768 x 1024; the lookups use 4096)")
    args = parser.parse_args(argv)
    if args.logits_batch is not None and args.logits_batch < 1:
        parser.error(f"argument --logits-batch: must be >= 1, got {args.logits_batch}")
    DEVICE = torch.device(args.device)
    peaks: Dict[Tuple[str, str], Optional[float]] = {}  # measured once, in the first pass
    for threads in [int(t) for t in args.threads.split(",")]:
        cases: List[Case] = []
        for source in CASE_SOURCES:
            if source is lookup_cases:
                cases += source(tr=not args.no_tr)
            elif source is logits_cases and args.logits_batch is not None:
                cases += source(batches={name: args.logits_batch for name, *_ in CONFIGS})
            else:
                cases += source()
        if args.only:
            cases = [c for c in cases if args.only in c.group]
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"\n=== torch {torch.__version__} on {DEVICE}, {threads} threads "
              f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), {args.repeats} repeats, "
              f"batch {BATCH} ids (load average {load:.1f} on {os.cpu_count()} cpus)")
        memory = not args.no_memory and DEVICE.type == "cpu" and not peaks
        run(cases, args.repeats, threads, memory=memory)
        for case in cases:
            if memory:
                peaks[(case.group, case.name)] = case.peak_mib
            case.peak_mib = peaks.get((case.group, case.name))
        print(report(cases))
        rows = [row for source in TARGET_SOURCES for row in source(cases)]
        if rows:
            print("\ntargets (ratios of medians in this run)")
            for desc, x, limit, ok in rows:
                print(f"  {'PASS' if ok else 'MISS'}  {desc} = {x:.2f} (target <= {limit})")


if __name__ == "__main__":
    main()
