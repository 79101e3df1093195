"""Settings of the Tensor-Train method (METHODS.md, paper section 3)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

__all__ = ["TTConfig", "normalize_tt_options", "normalize_config", "DEFAULT_NUM_FACTORS"]

Rank = Union[int, Tuple[int, ...]]

#: ``num_factors`` when neither it nor a shape is given (the paper's choice).
DEFAULT_NUM_FACTORS = 3


def normalize_tt_options(rank: object, shape: object, num_factors: object, ring: bool
                         ) -> Tuple[Rank, Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]], int]:
    """Check the V/J-independent settings of a TT or TR layer and return them as
    ``(rank, shape, num_factors)`` with tuples for lists. ``num_factors`` is taken from
    ``shape`` when a shape is given (a different ``num_factors`` is a ``ValueError``);
    ``None`` without a shape means :data:`DEFAULT_NUM_FACTORS`. (The V/J-dependent checks are in
    :func:`compemb.tt.math.check_shape` and :func:`compemb.tt.math.choose_shape`.)"""
    if shape is not None:
        try:
            rows, cols = shape  # type: ignore[misc]
            shape = (tuple(rows), tuple(cols))
        except (TypeError, ValueError):
            raise ValueError(
                f"shape must be ((I1, .., IN), (J1, .., JN)) or None for the automatic choice, "
                f"got {shape!r}") from None
        if len(shape[0]) != len(shape[1]) or len(shape[0]) < 2 or not all(
                _is_int(x) and x >= 1 for x in shape[0] + shape[1]):
            raise ValueError(
                f"shape must be ((I1, .., IN), (J1, .., JN)): two tuples of the same length "
                f"N >= 2 of positive ints, got {shape!r}")
        if num_factors is not None and num_factors != len(shape[0]):
            raise ValueError(
                f"num_factors={num_factors!r} disagrees with shape {shape!r}, which has "
                f"{len(shape[0])} factors; leave num_factors out (it is taken from the shape) "
                f"or set it to {len(shape[0])}")
        num_factors = len(shape[0])
    elif num_factors is None:
        num_factors = DEFAULT_NUM_FACTORS
    if not _is_int(num_factors) or num_factors < 2:
        raise ValueError(f"num_factors must be an integer >= 2 (3 is the paper's choice), "
                         f"got {num_factors!r}")
    want = num_factors if ring else num_factors - 1
    what = (f"an int or a list of {want} ranks (R0..R{num_factors - 1})" if ring
            else f"an int or a list of {want} inner ranks (R1..R{num_factors - 1})")
    if isinstance(rank, Sequence) and not isinstance(rank, str):
        rank = tuple(rank)
        if len(rank) != want:
            raise ValueError(f"rank has {len(rank)} entries but {num_factors} factors need {what}")
        values = rank
    else:
        values = (rank,)
    if not all(_is_int(r) for r in values):
        raise ValueError(f"rank must be {what}, got {rank!r}")
    if min(values) < 1:
        raise ValueError(f"rank must be >= 1 ({what}), got {rank!r}")
    return rank, shape, num_factors  # type: ignore[return-value]


def normalize_config(config: object, ring: bool) -> None:
    """``__post_init__`` of TTConfig/TRConfig: validate, store lists as tuples."""
    rank, shape, n = normalize_tt_options(config.rank, config.shape,  # type: ignore[attr-defined]
                                          config.num_factors, ring=ring)  # type: ignore[attr-defined]
    object.__setattr__(config, "rank", rank)
    object.__setattr__(config, "shape", shape)
    object.__setattr__(config, "num_factors", n)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TTConfig:
    """Settings of a :class:`compemb.tt.TTEmbedding`.

    Attributes:
        rank: TT-rank: an int (all inner ranks equal) or a list of the ``N-1`` inner ranks
            ``R1..R_{N-1}`` (``R0 = RN = 1``). Parameters grow as ``rank**2``; the paper uses
            8-64.
        shape: ``((I1..IN), (J1..JN))`` with ``prod(Ik) >= num_embeddings`` (extra rows are
            padding) and ``prod(Jk) == embedding_dim``; ``None`` picks near-equal ``Ik``
            with the least padding and the most balanced exact split of ``J``.
        num_factors: ``N``, the number of cores (>= 2); ``None`` (default): the shape's
            ``N`` when a shape is given, else 3. A value that disagrees with ``shape`` is a
            ``ValueError``. Always an int after construction.
    """

    rank: Rank = 16
    shape: Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]] = None
    num_factors: Optional[int] = None

    def __post_init__(self) -> None:
        normalize_config(self, ring=False)
