"""The Tensor-Ring embedding layer (paper appendix B)."""
from __future__ import annotations

from ..tt import math as ttm
from ..tt.layer import TensorNetworkEmbedding
from .config import TRConfig

__all__ = ["TREmbedding"]


class TREmbedding(TensorNetworkEmbedding):
    """Tensor-Ring embedding: like :class:`compemb.tt.TTEmbedding`, but the first and last
    bond have rank ``R0 = RN > 1`` and an element is the trace of the product of the core
    slices (Zhao et al. 2016; Khrulkov et al. 2020, appendix B)::

        W[i, j] = trace(G1[:, i1, j1, :] @ G2[:, i2, j2, :] @ ... @ GN[:, iN, jN, :])

    Same arguments and attributes as ``TTEmbedding``, except that ``rank`` is an int or the
    ``N`` ranks ``R0..R_{N-1}``, and ``ranks`` is ``(R0, .., R_{N-1}, R0)``. Lookups share
    prefixes as for TT, carrying the ring index ``r0`` along (``R0`` times the work of a
    train of the same rank). Init: eq. (2) with ``R0`` counted as one more bond, so the
    table has variance ``2/(V+J)``.

    ``from_dense`` uses TR-SVD (Zhao et al. 2016, Alg. 1; :func:`compemb.tt.math.tr_svd`):
    the first unfolding is truncated to rank ``R0*R1`` and split into the two bond indices,
    the rest is a TT-SVD sweep carrying the ring index. Full ranks reproduce the table
    exactly. It is not rank-minimal: the split of the first factor into ``(r0, r1)`` is
    arbitrary, so a table that *is* a ring of rank ``R`` needs inner ranks up to about
    ``R0 * R`` to be recovered exactly, and a truncation is quasi-optimal, not optimal
    (no ALS refinement is done).
    """

    ring = True
    method = "tr"
    config_cls = TRConfig

    _decompose = staticmethod(ttm.tr_svd)
