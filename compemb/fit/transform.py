"""A ``d x d`` transform stored in ``O(d*k)`` numbers: a Kronecker product plus a low rank.

A fitted table maps its base back to the model's coordinates through ``T = Q^T A^-1``
(:mod:`compemb.fit.fit`): ``A`` the root of the fit's metric, ``Q`` a random rotation for
PQ. Stored whole, ``T`` costs ``d*d`` numbers, a ninth of the byte budget of SmolLM2's
49152 x 576 table at 10x. Neither factor needs that:

* the metric ``M = S + lambda*I`` is a low-rank covariance plus a multiple of the identity,
  so its root is ``A = E_k diag(s_k) E_k^T + t (I - E_k E_k^T)`` up to the spectrum's tail,
  which :func:`low_rank_root` flattens to one value (its mean eigenvalue), keeping ``A``
  and ``A^-1`` exact inverses of each other;
* a rotation that spreads the variance over the PQ groups need not be Haar-random: the
  Kronecker product of two random rotations of ``a`` and ``b = d/a`` dimensions mixes every
  coordinate into every other (:func:`kronecker_rotation`).

Together ``T = kron(L, R) + V U^T`` with ``L [a, a]``, ``R [b, b]``, ``U, V [d, k]``:
``a*a + b*b + 2*d*k`` numbers (38,016 instead of 331,776 at d=576, k=32), and applying it
to ``n`` rows costs ``n*d*(a + b + 2k)`` multiply-adds instead of ``n*d*d``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["KroneckerLowRank", "kron_apply", "kronecker_factors", "kronecker_rotation",
           "low_rank_root", "kronecker_low_rank_size", "kronecker_low_rank_transform"]


def kronecker_factors(dim: int) -> Tuple[int, int]:
    """``(a, b)`` with ``a * b == dim`` and ``a <= b`` as close as can be (``(1, dim)`` for
    a prime ``dim``)."""
    if not (isinstance(dim, int) and dim >= 1):
        raise ValueError(f"dim must be an int >= 1, got {dim!r}")
    a = max(f for f in range(1, math.isqrt(dim) + 1) if dim % f == 0)
    return a, dim // a


def kronecker_low_rank_size(dim: int, rank: int) -> int:
    """Numbers stored by :class:`KroneckerLowRank` of ``dim`` and ``rank``."""
    a, b = kronecker_factors(dim)
    return a * a + b * b + 2 * dim * rank


def _rotation(n: int, generator: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def kronecker_rotation(dim: int, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Two random rotations ``(Q1 [a, a], Q2 [b, b])`` (float64, seeded) whose Kronecker
    product ``kron(Q1, Q2)`` is a ``dim x dim`` rotation (:func:`kronecker_factors`)."""
    a, b = kronecker_factors(dim)
    g = torch.Generator().manual_seed(seed)
    return _rotation(a, g), _rotation(b, g)


def low_rank_root(matrix: Tensor, rank: int) -> Tuple[Tensor, Tensor, float]:
    """The square root of a symmetric positive definite ``matrix [d, d]`` with its spectrum
    cut to the ``rank`` largest eigenvalues and one more for the rest (their mean):
    ``(E [d, k], s [k], t)`` such that ``A = E diag(s) E^T + t (I - E E^T)`` (float64).
    ``A @ A`` equals ``matrix`` on the kept eigenvectors and its mean on the others;
    ``A^-1 = E diag(1/s) E^T + (1/t)(I - E E^T)`` exactly."""
    m = matrix.detach().to(torch.float64)
    d = m.shape[0]
    if m.shape != (d, d):
        raise ValueError(f"matrix must be square, got {tuple(m.shape)}")
    if not (isinstance(rank, int) and 0 <= rank < d):
        raise ValueError(f"rank must be an int in [0, {d}), got {rank!r}")
    evals, evecs = torch.linalg.eigh((m + m.T) / 2)
    evals = evals.clamp_min(float(evals.max()) * 1e-8)
    keep = evecs[:, d - rank:] if rank else evecs[:, :0]
    tail = float(evals[:d - rank].mean())
    return keep, evals[d - rank:].sqrt(), math.sqrt(tail)


def kron_apply(x: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``x [..., d] @ kron(left, right)`` without building it: ``left^T X right`` for each
    row ``X`` of ``x`` seen as ``[a, b]`` (``left [a, a]``, ``right [b, b]``)."""
    a, b = left.shape[0], right.shape[0]
    y = x.reshape(-1, a, b) @ right  # [n, a, b]
    return torch.matmul(left.transpose(0, 1), y).reshape(x.shape)


class KroneckerLowRank(nn.Module):
    """``T = kron(left, right) + v @ u.T``, a ``[d, d]`` transform kept as its factors.

    Args:
        left: ``[a, a]``; right: ``[b, b]`` with ``a * b = d``.
        u, v: ``[d, k]`` (``k`` may be 0).

    :meth:`rows` is ``x @ T`` (a fitted table's rows), :meth:`hidden` is ``h @ T.T`` (what
    the logits contract with), :meth:`matrix` builds ``T``. Parameters ``left``,
    ``right``, ``u``, ``v``.
    """

    def __init__(self, left: Tensor, right: Tensor, u: Tensor, v: Tensor) -> None:
        super().__init__()
        a, b = left.shape[0], right.shape[0]
        d = a * b
        if left.shape != (a, a) or right.shape != (b, b):
            raise ValueError(f"left and right must be square, got {tuple(left.shape)} and "
                             f"{tuple(right.shape)}")
        if u.dim() != 2 or u.shape[0] != d or v.shape != u.shape:
            raise ValueError(f"u and v must both be [{d}, k], got {tuple(u.shape)} and "
                             f"{tuple(v.shape)}")
        self.left = nn.Parameter(left.detach().clone())
        self.right = nn.Parameter(right.detach().clone())
        self.u = nn.Parameter(u.detach().clone())
        self.v = nn.Parameter(v.detach().clone())
        self.dim, self.rank = d, int(u.shape[1])

    @classmethod
    def empty(cls, dim: int, rank: int, dtype: torch.dtype = torch.float32) -> "KroneckerLowRank":
        """Identity placeholders of this structure (to load a checkpoint into)."""
        a, b = kronecker_factors(dim)
        return cls(torch.eye(a, dtype=dtype), torch.eye(b, dtype=dtype),
                   torch.zeros(dim, rank, dtype=dtype), torch.zeros(dim, rank, dtype=dtype))

    def rows(self, x: Tensor) -> Tensor:
        """``x [..., d] @ T``."""
        p = [t.to(x.dtype) for t in (self.left, self.right, self.u, self.v)]
        out = kron_apply(x, p[0], p[1])
        if self.rank:
            out = out + (x @ p[3]) @ p[2].transpose(0, 1)
        return out

    def hidden(self, h: Tensor) -> Tensor:
        """``h [..., d] @ T.T``."""
        p = [t.to(h.dtype) for t in (self.left, self.right, self.u, self.v)]
        out = kron_apply(h, p[0].transpose(0, 1), p[1].transpose(0, 1))
        if self.rank:
            out = out + (h @ p[2]) @ p[3].transpose(0, 1)
        return out

    def matrix(self) -> Tensor:
        """``T [d, d]``."""
        return torch.kron(self.left, self.right) + self.v @ self.u.transpose(0, 1)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, kron=({self.left.shape[0]}, {self.right.shape[0]}), "
                f"rank={self.rank}")


def kronecker_low_rank_transform(root: Optional[Tuple[Tensor, Tensor, float]], dim: int,
                                 rotation: Optional[Tuple[Tensor, Tensor]]) -> KroneckerLowRank:
    """``T = Q^T A^-1`` as :class:`KroneckerLowRank` (float64) for ``A`` given by
    :func:`low_rank_root` (``None``: identity) and ``Q = kron(Q1, Q2)`` (``None``: identity).

    With ``A^-1 = (1/t) I + E diag(1/s - 1/t) E^T``: ``T = (1/t) kron(Q1^T, Q2^T) + (Q^T E
    diag(1/s - 1/t)) E^T``, so ``left = Q1^T / t``, ``right = Q2^T``, ``u = E``,
    ``v = Q^T E diag(1/s - 1/t)``."""
    a, b = kronecker_factors(dim)
    if rotation is None:
        q1, q2 = torch.eye(a, dtype=torch.float64), torch.eye(b, dtype=torch.float64)
    else:
        q1, q2 = (r.to(torch.float64) for r in rotation)
    if root is None:
        e, s, t = torch.zeros(dim, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), 1.0
    else:
        e, s, t = root
    v = kron_apply(e.T, q1, q2).T  # [d, k]: Q^T E, as (E^T kron(Q1, Q2))^T
    v = v * (1.0 / s - 1.0 / t).unsqueeze(0)
    return KroneckerLowRank(q1.T / t, q2.T, e, v)
