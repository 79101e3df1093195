"""Settings of the Tensor-Ring method (paper appendix B)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from ..tt.config import Rank, normalize_config

__all__ = ["TRConfig"]


@dataclass(frozen=True)
class TRConfig:
    """Settings of a :class:`compemb.tr.TREmbedding`.

    Attributes:
        rank: TR-rank: an int (all ``N`` ranks equal, ``R0 = RN = rank``) or a list of the
            ``N`` ranks ``R0..R_{N-1}`` (the ring closes with ``RN = R0``). A ring of rank
            ``R`` has about ``R0`` times the parameters and work of a train of rank ``R``.
        shape: ``((I1..IN), (J1..JN))`` or ``None`` for the automatic choice (as for TT).
        num_factors: ``N`` (>= 2); ``None`` (default): the shape's ``N`` when a shape is
            given, else 3; a value that disagrees with ``shape`` is a ``ValueError``.
    """

    rank: Rank = 8
    shape: Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]] = None
    num_factors: Optional[int] = None

    def __post_init__(self) -> None:
        normalize_config(self, ring=True)
