"""DPQ benchmark cases for ``python -m bench.lookup``: DPQ training against
``nn.Embedding``, and the inference form (``CodebookEmbedding``) against ``nn.Embedding``
lookups and the dense logits GEMM, at 32768 x 1024.

``cases(device)`` returns :class:`bench.lookup.Case` objects; ``targets(cases)`` the
issue-2 targets (lookup within 1.3x of ``nn.Embedding``, ``.logits`` within 1.1x of the
dense GEMM). Run alone: ``python -m bench.dpq_cases [--repeats N] [--threads T]``.
"""
from __future__ import annotations

import argparse
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from compemb.dpq import CodebookEmbedding, DPQEmbedding

V, J = 32768, 1024
BATCH = 4096
LOGITS_BATCH = 1024
#: (num_codes, num_groups) settings timed; ratios 64x, 93x and 62x (METHODS.md formula).
SETTINGS: Sequence[Tuple[int, int]] = ((256, 32), (32, 64), (16, 128))


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _ids(dist: str, n: int, device: torch.device) -> torch.Tensor:
    from .lookup import uniform_ids, zipf_ids
    g = torch.Generator().manual_seed(0)
    return (zipf_ids if dist == "zipf" else uniform_ids)(V, n, g).to(device)


def _codebook(num_codes: int, num_groups: int, device: torch.device) -> CodebookEmbedding:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(num_codes, (V, num_groups), generator=g)
    values = torch.randn(num_groups, num_codes, J // num_groups, generator=g)
    return CodebookEmbedding(codes, values).to(device)


def cases(device: str = "cpu", settings: Sequence[Tuple[int, int]] = SETTINGS,
          dists: Sequence[str] = ("zipf", "uniform")) -> list:
    """Named timed cases (``bench.lookup.Case``), grouped with their baselines:

    * ``dpq train 32768x1024 <dist>``: forward+backward of 4096 ids, ``nn.Embedding``
      (dense gradient) against ``DPQEmbedding`` SX and VQ;
    * ``codebook lookup 32768x1024 <dist>``: inference forward (no grad) of 4096 ids,
      ``nn.Embedding`` against ``CodebookEmbedding``;
    * ``codebook logits 32768x1024 B=1024``: inference ``hidden @ W.T`` (no grad), dense
      GEMM against ``CodebookEmbedding.logits``.
    """
    from .lookup import Case
    dev = torch.device(device)
    sync = _sync(dev)
    out: List[Case] = []
    for dist in dists:
        group = f"dpq train {V}x{J} {dist}"

        def dense_train(dist=dist):
            ids = _ids(dist, BATCH, dev)
            grad = torch.randn(BATCH, J, device=dev)
            emb = nn.Embedding(V, J).to(dev)

            def step():
                emb.weight.grad = None
                emb(ids).backward(grad)
                sync()
            return step

        out.append(Case("nn.Embedding", group, dense_train, baseline=True))
        for num_codes, num_groups in settings:
            for variant in ("sx", "vq"):
                def dpq_train(dist=dist, k=num_codes, d=num_groups, variant=variant):
                    ids = _ids(dist, BATCH, dev)
                    grad = torch.randn(BATCH, J, device=dev)
                    layer = DPQEmbedding(V, J, k, d, variant=variant).to(dev)

                    def step():
                        for p in layer.parameters():
                            p.grad = None
                        layer(ids).backward(grad)
                        sync()
                    return step

                out.append(Case(f"DPQ-{variant.upper()} K={num_codes} D={num_groups}", group,
                                dpq_train))

        group = f"codebook lookup {V}x{J} {dist}"

        def dense_lookup(dist=dist):
            ids = _ids(dist, BATCH, dev)
            emb = nn.Embedding(V, J).to(dev)

            def step():
                with torch.no_grad():
                    emb(ids)
                sync()
            return step

        out.append(Case("nn.Embedding", group, dense_lookup, baseline=True))
        for num_codes, num_groups in settings:
            def lookup(dist=dist, k=num_codes, d=num_groups):
                ids = _ids(dist, BATCH, dev)
                layer = _codebook(k, d, dev)

                def step():
                    with torch.no_grad():
                        layer(ids)
                    sync()
                return step

            out.append(Case(f"Codebook K={num_codes} D={num_groups}", group, lookup))

    group = f"codebook logits {V}x{J} B={LOGITS_BATCH}"

    def hidden():
        return torch.randn(LOGITS_BATCH, J, generator=torch.Generator().manual_seed(1)).to(dev)

    def dense_logits():
        h = hidden()
        weight = torch.randn(V, J, device=dev)

        def step():
            with torch.no_grad():
                F.linear(h, weight)
            sync()
        return step

    out.append(Case("dense GEMM", group, dense_logits, baseline=True))
    for num_codes, num_groups in settings:
        def logits(k=num_codes, d=num_groups):
            h = hidden()
            layer = _codebook(k, d, dev)

            def step():
                with torch.no_grad():
                    layer.logits(h)
                sync()
            return step

        out.append(Case(f"Codebook K={num_codes} D={num_groups}", group, logits))
    return out


def targets(cases: list) -> List[Tuple[str, float, float, bool]]:
    """(description, measured ratio of medians, limit, passed) for the codebook targets."""
    rows = []
    base = {c.group: c for c in cases if c.baseline}
    for c in cases:
        if c.baseline or not c.group.startswith("codebook") or c.group not in base:
            continue
        limit = 1.3 if "lookup" in c.group else 1.1
        x = c.median_ms / base[c.group].median_ms
        rows.append((f"{c.group}: {c.name} / {base[c.group].name}", x, limit, x <= limit))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    from .lookup import report, run
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--only", default="", help="run only groups containing this text")
    args = parser.parse_args(argv)
    todo = [c for c in cases(args.device) if args.only in c.group]
    print(f"torch {torch.__version__}, {args.device}, {args.threads} threads, "
          f"{args.repeats} repeats")
    run(todo, args.repeats, args.threads, memory=not args.no_memory and args.device == "cpu")
    print(report(todo))
    print("\ntargets (ratios of medians in this run)")
    for desc, x, limit, ok in targets(todo):
        print(f"  {'PASS' if ok else 'MISS'}  {desc} = {x:.2f} (target <= {limit})")


if __name__ == "__main__":
    main()
