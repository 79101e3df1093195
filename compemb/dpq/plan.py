"""Choosing DPQ settings for a target compression ratio."""
from __future__ import annotations

from .config import DPQConfig
from .math import code_bits, divisors, dpq_ratio

__all__ = ["plan_dpq"]

#: Codes per group the planner considers (powers of two: no bit wasted).
PLAN_NUM_CODES = tuple(2 ** b for b in range(1, 9))
#: Smallest sub-vector size ``d/D`` the planner considers (the paper's settings have
#: ``d/D >= 2``; scalar groups make ``D`` score tables for one number each).
PLAN_MIN_SUB_DIM = 2


def plan_dpq(num_embeddings: int, embedding_dim: int, target_ratio: float,
             variant: str = "sx", shared_subspace: bool = False) -> DPQConfig:
    """The DPQ setting reaching ``target_ratio`` (:func:`compemb.dpq.math.dpq_ratio`,
    float32 values) with the most code bits per symbol (``D * log2(Kc)``: the most
    information kept), among ``num_groups`` dividing ``embedding_dim`` (with ``d/D >= 2``
    where ``d`` allows it) and ``num_codes``
    in 2..256 (powers of two); ties go to more codes per group (a larger codebook),
    then to the higher ratio. ``ValueError`` naming the
    largest reachable ratio when none does."""
    if not target_ratio > 0:
        raise ValueError(f"target_ratio must be > 0, got {target_ratio!r}")
    best = None
    best_ratio = 0.0
    candidates = [g for g in divisors(embedding_dim) if embedding_dim // g >= PLAN_MIN_SUB_DIM]
    for groups in candidates or [embedding_dim]:
        for codes in PLAN_NUM_CODES:
            ratio = dpq_ratio(num_embeddings, embedding_dim, codes, groups, shared_subspace)
            best_ratio = max(best_ratio, ratio)
            if ratio < target_ratio:
                continue
            key = (groups * code_bits(codes), codes, ratio)
            if best is None or key > best[0]:
                best = (key, codes, groups)
    if best is None:
        raise ValueError(
            f"no DPQ setting reaches a compression ratio of {target_ratio} for a "
            f"{num_embeddings} x {embedding_dim} table; the largest reachable is "
            f"{best_ratio:.1f} (ask for at most that, or use a bigger vocabulary)")
    _, codes, groups = best
    return DPQConfig(num_codes=codes, num_groups=groups, variant=variant,
                     shared_subspace=shared_subspace)
