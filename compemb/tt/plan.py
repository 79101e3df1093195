"""Planning TT/TR settings for a target compression ratio."""
from __future__ import annotations

import math
from typing import Optional, Tuple

from . import math as ttm
from .config import TTConfig

__all__ = ["plan_tt", "plan_tr", "max_useful_rank"]

FACTOR_ORDER = (3, 4, 2, 5, 6)  # the paper's N=3 first; more factors reach higher ratios


def max_useful_rank(shape: ttm.Shape) -> int:
    """The largest bond rank a table of this shape can use (the smallest unfolding size):
    beyond it a TT of ``shape`` is exact and more rank only adds parameters."""
    modes = [i * j for i, j in zip(*shape)]
    return min(min(math.prod(modes[: k + 1]), math.prod(modes[k + 1:]))
               for k in range(len(modes) - 1))


def _plan(num_embeddings: int, embedding_dim: int, target_ratio: float, ring: bool
          ) -> Tuple[int, ttm.Shape, int]:
    best_ratio: Optional[float] = None
    for n in FACTOR_ORDER:
        try:
            shape = ttm.choose_shape(num_embeddings, embedding_dim, n)
        except ValueError:
            continue
        dense = num_embeddings * embedding_dim

        def ratio(r: int) -> float:
            return dense / ttm.num_parameters(shape, ttm.full_ranks(r, n, ring))

        best_ratio = max(best_ratio or 0.0, ratio(1))
        if ratio(1) < target_ratio:
            continue
        lo, hi = 1, max_useful_rank(shape)  # largest rank with ratio >= target
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if ratio(mid) >= target_ratio:
                lo = mid
            else:
                hi = mid - 1
        return lo, shape, n
    raise ValueError(
        f"target_ratio={target_ratio} cannot be reached by a {'TR' if ring else 'TT'} table of "
        f"{num_embeddings} x {embedding_dim} with 2..6 factors"
        + (f" (at most {best_ratio:.1f}x at rank 1)" if best_ratio else
           f"; embedding_dim={embedding_dim} has too few factors") + "; ask for a lower ratio")


def plan_tt(num_embeddings: int, embedding_dim: int, target_ratio: float) -> TTConfig:
    """The TT setting with the largest rank (the most capacity) whose compression ratio
    ``V*J / parameters`` is at least ``target_ratio``: ``N = 3`` factors when that reaches
    it (the paper's choice), else 4, 2, 5, 6; automatic shape."""
    rank, shape, n = _plan(num_embeddings, embedding_dim, target_ratio, ring=False)
    return TTConfig(rank=rank, shape=shape, num_factors=n)


def plan_tr(num_embeddings: int, embedding_dim: int, target_ratio: float):
    """As :func:`plan_tt`, for the ring (all ``N`` ranks equal)."""
    from ..tr.config import TRConfig

    rank, shape, n = _plan(num_embeddings, embedding_dim, target_ratio, ring=True)
    return TRConfig(rank=rank, shape=shape, num_factors=n)
