"""Calibration statistics for fitting a compressed table to a pretrained one (pure functions).

Two statistics decide where a compressed table may be wrong:

* **token weights**: how often each row is used. A fit weighted by raw counts of a short
  calibration text is excellent on that text and poor on any other (its rare and unseen
  tokens are given up); :func:`token_weights` smooths and caps the counts so that no row
  is given up (the rule is in its docstring).
* **the head metric**: a logit is ``h . w_i``, so the error of row ``i`` costs
  ``e_i^T S e_i`` with ``S = E[h h^T]`` the second moment of the head's input (the final
  hidden states). :func:`metric_root` turns ``S`` (plus a multiple of the identity, for
  the input side of a tied table) into the map under which plain L2 is that cost.

Shapes: ``V`` rows (vocabulary), ``d`` = embedding dim.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["count_tokens", "token_weights", "rank_prior", "check_prior", "SecondMoment",
           "metric_root",
           "DEFAULT_PRIOR", "SAMPLED_PRIOR", "SAMPLED_UNIFORM_PRIOR", "default_prior",
           "DEFAULT_CAP", "RANK_OFFSET", "RANK_UNIFORM"]

#: Share of the total weight given to the prior (every row, seen or not).
DEFAULT_PRIOR = 0.3
#: The prior's share when the only calibration text is sampled from the model itself and the
#: prior is informative (:func:`rank_prior` or a given distribution): the weights are the
#: prior alone, the samples' counts unused (their head inputs still feed the fit). The
#: samples' counts say less about a user's text than the tokenizer's ranks do (measured: see
#: :func:`rank_prior`).
SAMPLED_PRIOR = 1.0
#: The same with a uniform prior, which knows nothing of frequency: the samples' counts keep
#: a share.
SAMPLED_UNIFORM_PRIOR = 0.85
#: :func:`rank_prior`: the Zipf law's offset (ids below it weigh about the same; the
#: special, byte and first-merge tokens) and the share spread uniformly over all rows.
RANK_OFFSET = 200.0
RANK_UNIFORM = 0.3
#: Largest weight of one row, in units of the mean weight (1).
DEFAULT_CAP = 30.0


def default_prior(only_sampled: bool, uniform: bool) -> float:
    """The prior's share for :func:`token_weights` when none is given: :data:`DEFAULT_PRIOR`
    when there is user text (its counts lead), else :data:`SAMPLED_PRIOR` (an informative
    prior, e.g. :func:`rank_prior`) or :data:`SAMPLED_UNIFORM_PRIOR` (``uniform``)."""
    if not only_sampled:
        return DEFAULT_PRIOR
    return SAMPLED_UNIFORM_PRIOR if uniform else SAMPLED_PRIOR


def rank_prior(num_embeddings: int, offset: float = RANK_OFFSET, exponent: float = 1.0,
               uniform: float = RANK_UNIFORM) -> Tensor:
    """``float64 [V]``: a distribution over ids that assumes lower ids are more frequent,
    ``uniform / V + (1 - uniform) * z``, with ``z_i`` proportional to
    ``(i + offset) ** -exponent`` (Zipf's law over the id as a rank).

    Why: tokenizers number their tokens in the order they learnt them (BPE by merge, which
    follows frequency in the tokenizer's training text; sentencepiece by score; fairseq
    dictionaries by count), so the id is a free estimate of how common a token is in
    general text, including the code and formal prose that a short calibration text
    lacks. As the prior of :func:`token_weights` it lifts those tokens above the rare
    ones, where a uniform prior gives all unseen tokens the same floor. Measured on
    SmolLM2-135M (tied 49152 x 576 table, DPQ 10x; perplexity on PTB / Python / legal
    against dense), calibrated on 8k sampled tokens only, fit only: uniform prior 0.3
    +8.4 / +9.1 / +11.3%, this prior at 0.5 (``uniform`` 0.4) +7.1 / +8.1 / +10.3%, at 0.7
    +6.9 / +6.7 / +9.7%; with the head fit: uniform 0.3 +7.4 / +6.9 / +10.1%, this prior at
    0.7 +6.1 / +5.2 / +8.9%, at 0.85 +5.9 / +5.8 / +7.3% (two seeds in the benchmark:
    +5.9 / +5.7 / +7.2%, +5.8 / +5.4 / +8.3%), at 1.0 (:data:`SAMPLED_PRIOR`: the samples'
    counts unused) +4.5 / +4.2 / +8.5% and +4.7 / +5.0 / +7.6%. On PTB
    plus the samples, fit only: uniform +1.2 / +8.3 / +8.4%, this prior at 0.5 (``uniform``
    0.4) +1.6 / +8.3 / +7.9%, at 0.7 +2.6 / +6.9 / +9.2%: with only sampled text the counts
    say little and the prior helps everywhere; with the user's text a larger prior trades
    that domain for the others, so it keeps :data:`DEFAULT_PRIOR`. The ``uniform`` share
    keeps a floor under every row whatever order a tokenizer gives its ids (the prior is an
    option: ``token_prior="uniform"`` in ``compemb_hf``). ``ValueError`` for a bad argument.
    """
    if not (isinstance(num_embeddings, int) and num_embeddings > 0):
        raise ValueError(f"num_embeddings must be a positive int, got {num_embeddings!r}")
    if not offset > 0:
        raise ValueError(f"offset must be > 0, got {offset!r}")
    if not exponent >= 0:
        raise ValueError(f"exponent must be >= 0, got {exponent!r}")
    if not 0.0 <= uniform <= 1.0:
        raise ValueError(f"uniform must be in [0, 1], got {uniform!r}")
    z = (torch.arange(num_embeddings, dtype=torch.float64) + offset) ** -float(exponent)
    return uniform / num_embeddings + (1.0 - uniform) * z / z.sum()


def check_prior(weights: Tensor, num_embeddings: int, name: str = "prior_distribution"
                ) -> Tensor:
    """``weights [V]`` (one finite, non-negative weight per row, positive sum) as a
    ``float64`` distribution on the CPU; ``ValueError`` naming ``name`` otherwise."""
    q = weights.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if (weights.dim() != 1 or q.numel() != num_embeddings or not bool(torch.isfinite(q).all())
            or bool((q < 0).any()) or not float(q.sum()) > 0):
        raise ValueError(f"{name} must be a [{num_embeddings}] tensor of finite non-negative "
                         f"weights with a positive sum, got shape {tuple(weights.shape)}")
    return q / q.sum()


def count_tokens(ids: Union[Tensor, Iterable[Tensor]], num_embeddings: int) -> Tensor:
    """``float64 [V]`` occurrences of each id in ``ids`` (a tensor of any shape, or an
    iterable of them, e.g. batches streamed from a text). ``ValueError`` for an id outside
    ``[0, V)``."""
    counts = torch.zeros(num_embeddings, dtype=torch.float64)
    for t in ([ids] if isinstance(ids, Tensor) else ids):
        flat = t.reshape(-1).long().cpu()
        if flat.numel() == 0:
            continue
        if int(flat.min()) < 0 or int(flat.max()) >= num_embeddings:
            raise ValueError(f"ids must lie in [0, {num_embeddings}), got range "
                             f"[{int(flat.min())}, {int(flat.max())}]")
        counts += torch.bincount(flat, minlength=num_embeddings).to(torch.float64)
    return counts


def token_weights(counts: Tensor, prior: float = DEFAULT_PRIOR, cap: float = DEFAULT_CAP,
                  exclude: Optional[Tensor] = None,
                  prior_distribution: Optional[Tensor] = None) -> Tensor:
    """Per-row fit weights ``float32 [V]`` (mean 1) from token ``counts [V]``.

    The rule: ``p = (1 - prior) * counts / N + prior * q`` (the counts' frequencies blended
    with a prior distribution ``q`` holding ``prior`` of the mass; ``N`` the total count;
    ``q`` = ``prior_distribution``, uniform ``1 / V`` if not given, e.g. :func:`rank_prior`),
    weight ``w = min(V * p, cap)``, then rescaled to mean 1.

    Why: a fit weighted by raw frequencies spends the whole budget on the tokens of the
    calibration text; a token it never saw gets weight 0 and any row at all, so the
    compressed model breaks on the next domain (measured in shared/PRETRAINED.md: +2% in
    domain, +19-26% out). The prior gives every row at least ``prior`` times its prior
    weight ``V * q`` (with a uniform ``q``, ``prior`` of the mean weight): an unseen token
    is fitted, only less tightly, and the cap stops the few most
    frequent tokens (``the``, ``,``) from owning a codebook: beyond ``cap`` times the mean
    their error is already small, and more weight only moves centroids away from
    everything else. ``counts`` all zero gives the prior's weights. ``exclude`` (ids, e.g.
    rows kept exact) get weight 0.
    """
    if not 0.0 <= prior <= 1.0:
        raise ValueError(f"prior must be in [0, 1] (the share of the prior), got {prior!r}")
    if not cap >= 1.0:
        raise ValueError(f"cap must be >= 1 (the largest weight, in mean weights), got {cap!r}")
    counts = counts.detach().to(torch.float64).reshape(-1)
    if bool((counts < 0).any()):
        raise ValueError("counts must be non-negative")
    v = counts.numel()
    total = float(counts.sum())
    q = (torch.full_like(counts, 1.0 / v) if prior_distribution is None
         else check_prior(prior_distribution, v))
    p = (counts / total * (1.0 - prior) + prior * q) if total > 0 else q.clone()
    w = (p * v).clamp_max(cap)
    if exclude is not None and exclude.numel():
        w[exclude.long().cpu()] = 0
    if not float(w.sum()) > 0:
        w = torch.ones_like(w)
    return (w / w.mean()).to(torch.float32)


class SecondMoment:
    """Running ``S = E[h h^T]`` and ``E[h]`` of vectors ``h [..., d]`` (float64), e.g. the
    final hidden states fed to an LM head, accumulated batch by batch (``update``)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.sum = torch.zeros(dim, dim, dtype=torch.float64)
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.count = 0

    @torch.no_grad()
    def update(self, hidden: Tensor, mask: Optional[Tensor] = None) -> None:
        """Add ``hidden [..., d]`` (rows where ``mask [...]`` is true, if given)."""
        h = hidden.detach().reshape(-1, self.dim)
        if mask is not None:
            h = h[mask.reshape(-1).to(torch.bool)]
        h = h.to(device="cpu", dtype=torch.float64)
        self.sum += h.T @ h
        self.total += h.sum(0)
        self.count += h.shape[0]

    def value(self) -> Tensor:
        """``float64 [d, d]``; ``ValueError`` before any update."""
        if self.count == 0:
            raise ValueError("SecondMoment has seen no vectors")
        return self.sum / self.count

    def mean(self) -> Tensor:
        """``float64 [d]``: ``E[h]``."""
        if self.count == 0:
            raise ValueError("SecondMoment has seen no vectors")
        return self.total / self.count


def metric_root(second_moment: Optional[Tensor], dim: int, identity_weight: float = 1.0
                ) -> Tuple[Tensor, Tensor]:
    """``(A, A_inv)``, ``float64 [d, d]`` symmetric, with ``A @ A = M`` where
    ``M = d * S / trace(S) + identity_weight * I`` (``S`` scaled to mean eigenvalue 1).

    Fitting ``W @ A`` in plain L2 fits ``W`` in the metric ``M``: the error of a row costs
    what it costs a logit (``S``) plus ``identity_weight`` times its plain L2 (the input
    side of a tied table, which reads the row itself). ``second_moment=None``: identity."""
    if second_moment is None:
        eye = torch.eye(dim, dtype=torch.float64)
        return eye, eye
    s = second_moment.detach().to(torch.float64)
    if s.shape != (dim, dim):
        raise ValueError(f"second_moment must be [{dim}, {dim}], got {tuple(s.shape)}")
    if not identity_weight >= 0:
        raise ValueError(f"identity_weight must be >= 0, got {identity_weight!r}")
    trace = float(torch.diagonal(s).sum())
    if not trace > 0:
        raise ValueError("second_moment has zero trace (no signal in the hidden states)")
    m = s * (dim / trace) + identity_weight * torch.eye(dim, dtype=torch.float64)
    m = (m + m.T) / 2
    evals, evecs = torch.linalg.eigh(m)
    evals = evals.clamp_min(float(evals.max()) * 1e-8)
    root = (evecs * evals.sqrt()) @ evecs.T
    inv = (evecs * evals.rsqrt()) @ evecs.T
    return root, inv
