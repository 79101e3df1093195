"""Choosing the settings of fitted tables for a target ratio over a model's vocabulary tables."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..dpq.math import codebook_storage_bytes, divisors
from ..spec import EmbeddingSpec
from ..tt import math as ttm
from ..tt.plan import FACTOR_ORDER, max_useful_rank
from .transform import kronecker_low_rank_size

__all__ = ["FitPlan", "plan_fit", "DEFAULT_EXACT_SHARE", "DPQ_EXACT_SHARE",
           "default_exact_share", "DEFAULT_TRANSFORM_RANK", "DPQ_RESIDUAL_SHARE",
           "default_residual_share", "TT_RESIDUAL_SHARE", "DPQ_SAMPLED_RESIDUAL_SHARE",
           "TT_SAMPLED_RESIDUAL_SHARE",
           "default_row_order"]

#: Share of each table's byte budget reserved for rows kept exactly (the most used tokens),
#: TT and TR. It was 0.1 (their cores cannot hold a trained table's row-specific detail)
#: until residual rows took that role at a fraction of the bytes per row
#: (:data:`TT_RESIDUAL_SHARE`).
DEFAULT_EXACT_SHARE = 0.0
#: The same for DPQ: none reserved (exact rows get only what the codes leave). Measured on
#: SmolLM2 at 10x with the rank-32 transform, perplexity on PTB / Python / legal, sampled
#: text only: share 0.1 (32 codes in 288 groups, 890 exact rows) +9.4 / +12.3 / +12.7%,
#: 0.05 (256 codes in 192 groups, 411 rows) +9.8 / +8.4 / +11.1%, 0 (64 codes in 288
#: groups, 91 rows) +7.9 / +7.0 / +9.0%: more code bits for every row beat exact rows
#: for the calibration text's most frequent tokens.
DPQ_EXACT_SHARE = 0.0


def default_exact_share(method: str) -> float:
    """:data:`DPQ_EXACT_SHARE` for ``"dpq"``, :data:`DEFAULT_EXACT_SHARE` otherwise."""
    return DPQ_EXACT_SHARE if method == "dpq" else DEFAULT_EXACT_SHARE


#: Share of each DPQ table's byte budget for residual rows
#: (:class:`compemb.fit.residual.ResidualRows`: more bits for the rows that cost most).
#: Measured on SmolLM2 at 10x (PTB + sampled text, no head fit), the head's KL to the dense
#: one on PTB / Python / legal head inputs: no residual (64 codes in 288 groups, 91 exact
#: rows) 0.0414 / 0.0721 / 0.0652; share 0.05 (256 codes in 192 groups, 0.74 MB of
#: residual rows at 2-5 bits) 0.0200 / 0.0719 / 0.0478; a base one bit smaller for the
#: residuals' 1.8 MB (32 codes in 288 groups) 0.0173 / 0.0774 / 0.0475 (Python, which the
#: calibration text lacks, worse). In perplexity, fit only: share 0.05 +1.2 / +8.3 / +8.4%,
#: 0.1 (32 codes in 288 groups, 2.1 MB) +0.6 / +10.0 / +9.1%.
DPQ_RESIDUAL_SHARE = 0.05
#: The same for DPQ when all the calibration text is sampled from the model (no user text):
#: the token weights are then the rank prior alone, which puts the residual rows on the
#: tokens common to every domain. Measured on SmolLM2 at 10x, sampled text only, the head
#: fit and the row scale, perplexity on PTB / Python / legal against dense, three seeds
#: (``bench.pretrained_lm``): share 0.05 (256 codes in 192 groups, 0.9 MB of residual rows)
#: +4.8 / +4.5 / +5.3%, +4.8 / +5.1 / +7.5%, +4.7 / +4.7 / +6.7% (mean +4.8 / +4.8 / +6.5%);
#: share 0.1 (32 codes in 288 groups, 2.0 MB) +4.7 / +3.7 / +6.7%, +3.9 / +3.9 / +6.9%,
#: +3.7 / +3.3 / +6.6% (mean +4.1 / +3.6 / +6.7%): a point better on PTB and Python, legal
#: (68-78% of whose added loss is on ids from 8,000 up, which the coarser base serves less
#: well) the same within its spread between seeds. With the user's text the weights
#: follow that text: 0.1 with PTB text and the head fit gave +0.8 / +6.4 / +8.2%,
#: +0.8 / +6.3 / +9.1% and +1.0 / +6.7 / +9.8% (three seeds) against +1.9 / +7.0 / +7.9%,
#: +1.9 / +9.1 / +7.9% and +1.6 / +8.3 / +5.4%: better in domain and on Python, worse on
#: legal in every seed, and worse in the worst corpus (8.2 / 9.1 / 9.8% against 7.9 /
#: 9.1 / 8.3%) (fit only, before the rank prior: +0.6 / +10.0 / +9.1% against +1.2 /
#: +8.3 / +8.4%), so that case keeps :data:`DPQ_RESIDUAL_SHARE`. 0.2 since 2026-12-07 10:24
#: UTC (128 codes in 192 groups of 3 dimensions, 2.4 MB; 0.15 gives 0.1's plan), with the
#: full row scale (one-off runs with the benchmark's compression and windows,
#: ``runs/exp/probe3.py``): +4.8 / +3.5 / +5.6%, +4.7 / +3.4 / +5.9%, +4.0 / +3.5 / +5.2%
#: against 0.1's +4.8 / +3.6 / +6.4%, +3.9 / +3.7 / +6.7%, +3.6 / +3.4 / +6.5% (seeds 0,
#: 1, 2; the benchmark rows "row scale power 1"): legal 0.8-1.3 points better in every
#: seed, Python the same, PTB up to 0.8 worse but within 5%; 0.3 (64 codes in 192 groups,
#: 3.7 MB; seed 0) +3.8 / +3.1 / +7.3%.
DPQ_SAMPLED_RESIDUAL_SHARE = 0.2
#: The same for TT and TR, whose cores miss most of a trained table's row-specific detail:
#: the residual rows carry it. SmolLM2 at 10x, PTB + sampled text, no head fit, perplexity
#: on PTB / Python / legal: 10% exact rows (rank 96, 552 rows) +416 / +7174 / +3944%;
#: residual share 0.3 (rank 84) +31.5 / +647 / +638%; 0.6 (rank 62) +14.8 / +115 / +159%;
#: 0.85 (rank 34) +7.7 / +44 / +52%. With the row order (:func:`default_row_order`), the
#: fit's weighted error in the head's metric (PTB + sampled, seed 0): 0.6 (rank 61) 0.0222,
#: 0.75 (rank 45) 0.0137, 0.85 (rank 32) 0.0095, 0.9 (rank 22) 0.0083. Unrotated, with the
#: head fit and 10 minutes' distillation, 0.9 and 0.85 were alike with PTB text. Fitted
#: in a rotated space (:func:`compemb.fit.default_rotation`), where one scale per residual
#: row rounds far better, more bytes in residual rows pay again (benchmark rows, head fit
#: and 10 minutes with the sampling counted in them, PTB + sampled text, seed 0): 0.85
#: (rank 32) +1.6 / +7.0 / +9.1%, 0.9 (rank 22) +1.0 / +5.3 / +6.7%, 0.93 (rank 14) +1.4 /
#: +4.6 / +5.9% (seed 1: 0.85 +1.6 / +5.6 / +9.4%, 0.93 +1.3 / +3.7 / +6.7%); and
#: all-MiniLM-L6-v2 (an encoder: no head metric, so unrotated), fit only, sentence cosine
#: at 10x 0.9979 / 0.9953 / 0.9960 (0.85) against 0.9987 / 0.9970 / 0.9972 (0.93), at 16x
#: 0.9934 / 0.9853 / 0.9851 against 0.9950 / 0.9863 / 0.9877.
TT_RESIDUAL_SHARE = 0.93
#: The same for TT and TR when all the calibration text is sampled from the model (no user
#: text; the token weights are then the rank prior alone): the same share. SmolLM2 at 10x
#: with the row order and the head fit, perplexity on PTB / Python / legal against dense
#: (benchmark rows, seeds 0 and 1): rotated, 0.93 (rank 14) +5.1 / +3.9 / +6.6% and +5.5
#: / +4.1 / +6.7% against 0.9's (rank 22) +5.7 / +5.2 / +7.2% and +5.9 / +4.8 / +7.0%,
#: 0.95 (rank 3; seed 0) +12.8 / +9.0 / +15.8%; unrotated, 0.9 +9.6 / +13.3 / +14.2% and +11.0 /
#: +13.9 / +15.8% against 0.85's +10.8 / +15.2 / +16.8% and +11.4 / +16.4 / +19.9%, and
#: 0.95 (rank 3: the cores all but gone) +24.4 / +25.7 / +33.0% (seed 0).
TT_SAMPLED_RESIDUAL_SHARE = 0.93


def default_residual_share(method: str, only_sampled: bool = False) -> float:
    """:data:`DPQ_RESIDUAL_SHARE` for ``"dpq"``, :data:`TT_RESIDUAL_SHARE` for TT/TR, or,
    when ``only_sampled`` (all the calibration text is sampled from the model),
    :data:`DPQ_SAMPLED_RESIDUAL_SHARE` / :data:`TT_SAMPLED_RESIDUAL_SHARE`."""
    if method != "dpq":
        return TT_SAMPLED_RESIDUAL_SHARE if only_sampled else TT_RESIDUAL_SHARE
    return DPQ_SAMPLED_RESIDUAL_SHARE if only_sampled else DPQ_RESIDUAL_SHARE


def default_row_scale(only_sampled: bool, method: str = "dpq") -> bool:
    """Whether a head's table gets a row scale
    (:meth:`compemb.fit.FittedEmbedding.set_row_scale`) when none is asked for: for DPQ when
    all the calibration text is sampled from the model (no user text).

    Why: the head fit tunes the rows to the head inputs of the calibration text, which
    makes up for the quantised rows' shrinkage in the user's domain; the scale then helps
    the other domains and costs the user's. Measured on SmolLM2-135M, 10x, after the head
    fit (perplexity on PTB / Python / legal against dense): DPQ, sampled text only, +4.8 /
    +5.4 / +5.8% without it, +4.8 / +4.5 / +5.3% with it (second seed +5.5 / +6.1 / +8.0%
    and +4.8 / +5.1 / +7.5%); DPQ, PTB text plus samples, +1.9 / +7.0 / +7.9% without it,
    +2.8 / +5.7 / +7.3% with it (set before the head fit instead: +2.3 / +6.0 / +7.4%;
    scaled only as far as the token's weight comes from the prior, not the text: +2.7 /
    +6.1 / +7.4%); TT (mostly residual rows over a rank-34 TT), sampled text only, +20.8 /
    +23.4 / +28.6% without it, +22.1 / +23.3 / +29.5% with it."""
    return bool(only_sampled) and method == "dpq"


def default_row_order(method: str) -> bool:
    """Whether a fitted TT/TR table stores a row order (:func:`compemb.fit.prefix_order`:
    similar rows under shared index prefixes, ``4*V`` bytes) when none is asked for: yes
    for ``"tt"`` and ``"tr"`` (DPQ has no index prefixes to share).

    Why: a TT's rows that share the index ``i1`` share the first core's slice, so placing
    similar rows there is what lets the cores hold the table. Measured on SmolLM2-135M at
    10x (rank 32 with it, 34 without; 85% of the bytes residual rows), PTB + sampled text:
    the fit's weighted error in the head's metric 0.0163 -> 0.0095 (median row 0.197 ->
    0.179 relative); perplexity on PTB / Python / legal with the head fit and 10 minutes'
    distillation (``bench.pretrained_lm`` rows) +2.2 / +14.7 / +13.7% and +2.5 / +15.1 /
    +16.0% (seeds 0, 1) against +5.4 / +26.3 / +32.3% and +4.4 / +25.9 / +34.8% without
    it; sampled text only, the head fit, +10.8 / +15.2 / +16.8% and +11.4 / +16.4 /
    +19.9% against +20.8 / +23.4 / +28.6%."""
    return method in ("tt", "tr")


#: Rank of the transform kept as a Kronecker product plus a low rank
#: (:class:`compemb.fit.transform.KroneckerLowRank`; ``None`` in :func:`plan_fit`: ``d x d``).
DEFAULT_TRANSFORM_RANK = 32
#: Bytes of one exact row's id.
_ID_BYTES = 4


@dataclass(frozen=True)
class FitPlan:
    """Settings of one fitted table (each of the model's vocabulary tables gets the same).

    Attributes:
        spec: the base method's settings.
        num_exact: rows kept exactly.
        transform: whether a ``d x d`` transform is stored (fits in the head's metric).
        transform_rank: the transform is a Kronecker product plus this rank
            (``kron_factors + 2*d*rank`` numbers), or ``None``: a ``d x d`` matrix.
        row_order: whether a ``[V]`` int32 row permutation is stored (TT/TR).
        logit_bias: whether a ``[V]`` logit bias is stored (a table that is a head).
        row_scale: whether a ``[V]`` row scale is stored at 8 bits (``V + 8`` bytes;
            :meth:`compemb.fit.FittedEmbedding.set_row_scale`).
        stored_bytes: bytes of one table as stored (the residual rows counted at their
            budget, which :func:`compemb.fit.fit_table` never exceeds).
        dense_bytes: bytes of one dense table.
        residual_bytes: budget of the residual rows (``fit_table(residual_bytes=)``).
        residual_share: the share of the budget asked for residual rows (the base's
            granularity may leave them more).
    """

    spec: EmbeddingSpec
    num_exact: int
    transform: bool
    row_order: bool
    logit_bias: bool
    stored_bytes: int
    dense_bytes: int
    transform_rank: Optional[int] = None
    residual_bytes: int = 0
    row_scale: bool = False
    residual_share: float = 0.0

    @property
    def ratio(self) -> float:
        return self.dense_bytes / self.stored_bytes

    def describe(self) -> str:
        opts = " ".join(f"{k}={v}" for k, v in self.spec.to_dict().items()
                        if k in ("rank", "shape", "num_codes", "num_groups"))
        extra = [f"{self.num_exact} exact rows"]
        if self.transform and self.transform_rank is not None:
            extra.append(f"transform (Kronecker + rank {self.transform_rank})")
        elif self.transform:
            extra.append("d x d transform")
        if self.row_order:
            extra.append("row order")
        if self.logit_bias:
            extra.append("logit bias")
        if self.row_scale:
            extra.append("row scale")
        if self.residual_bytes:
            extra.append(f"residual rows ({self.residual_bytes:,} bytes)")
        return (f"{self.spec.method} {opts} + {', '.join(extra)}: {self.stored_bytes:,} bytes "
                f"per table vs {self.dense_bytes:,} dense ({self.ratio:.2f}x)")


def _dpq_base(v: int, d: int, budget: int, elt: int) -> Optional[EmbeddingSpec]:
    """The DPQ setting with the most code bits per row (then more codes per group) whose
    codes and values fit in ``budget`` bytes."""
    best = None
    for groups in [g for g in divisors(d) if d // g >= 2] or [d]:
        for bits in range(1, 9):
            codes, values = codebook_storage_bytes(v, d, 2 ** bits, groups, False, elt)
            if codes + values > budget:
                continue
            key = (groups * bits, bits)
            if best is None or key > best[0]:
                best = (key, groups, 2 ** bits, codes + values)
    if best is None:
        return None
    return EmbeddingSpec("dpq", {"num_codes": best[2], "num_groups": best[1]})


def _tt_base(v: int, d: int, budget: int, elt: int, method: str) -> Optional[EmbeddingSpec]:
    """The TT/TR setting with the largest rank whose cores fit in ``budget`` bytes."""
    ring = method == "tr"
    for n in FACTOR_ORDER:
        try:
            shape = ttm.choose_shape(v, d, n)
        except ValueError:
            continue

        def nbytes(r: int) -> int:
            return ttm.num_parameters(shape, ttm.full_ranks(r, n, ring)) * elt

        if nbytes(1) > budget:
            continue
        lo, hi = 1, max_useful_rank(shape)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if nbytes(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return EmbeddingSpec(method, {"rank": lo, "shape": [list(shape[0]), list(shape[1])],
                                      "num_factors": n})
    return None


def _base_bytes(spec: EmbeddingSpec, v: int, d: int, elt: int) -> int:
    from ..spec import build_embedding

    with torch.device("meta"):
        layer = build_embedding(spec, v, d)
    storage = layer.storage()
    if spec.method == "dpq":
        o = spec.config
        codes, values = codebook_storage_bytes(v, d, o.num_codes, o.num_groups,
                                               o.shared_subspace, elt)
        return codes + values
    return storage.stored_parameters * elt


def _smallest_bytes(method: str, v: int, d: int, elt: int) -> int:
    """Bytes of the smallest base of ``method`` for a ``v x d`` table."""
    if method == "dpq":
        return sum(codebook_storage_bytes(v, d, 2, 1, False, elt))
    ring = method == "tr"
    sizes = []
    for n in FACTOR_ORDER:
        try:
            shape = ttm.choose_shape(v, d, n)
        except ValueError:
            continue
        sizes.append(ttm.num_parameters(shape, ttm.full_ranks(1, n, ring)) * elt)
    return min(sizes) if sizes else v * d * elt


def plan_fit(num_embeddings: int, embedding_dim: int, method: str, target_ratio: float, *,
             element_size: int = 4, transform: bool = True, row_order: bool = False,
             logit_bias: bool = False, exact_share: Optional[float] = None,
             transform_rank: Optional[int] = None,
             residual_share: Optional[float] = None, row_scale: bool = False) -> FitPlan:
    """Settings of a fitted table reaching ``target_ratio`` (dense bytes / bytes stored,
    both at ``element_size`` bytes per float; a model's vocabulary tables each get this
    ratio, so the ratio over all of them is the same).

    The budget ``V*d*element_size / target_ratio`` pays, in this order: the transform (if
    any: ``d x d``, or with ``transform_rank`` a Kronecker product plus that rank, when that
    is smaller; the plan's ``transform_rank`` says which), the row order (``4*V`` bytes, if any), the logit bias
    (``V*element_size``, if any) and the row scale (``V + 8``, if any); ``exact_share`` (default :func:`default_exact_share`) of the
    budget for exact rows and ``residual_share`` (default :func:`default_residual_share`)
    for residual rows; the base method with the most capacity in what is left
    (DPQ: the most code bits per row; TT/TR: the largest rank); then whatever the base's
    granularity leaves goes to the residual rows when there are any, else to more exact
    rows (``d*element_size + 4`` bytes each).
    ``ValueError`` naming the largest reachable ratio when the target cannot be met."""
    if method not in ("dpq", "tt", "tr"):
        raise ValueError(f"method must be 'dpq', 'tt' or 'tr' for a fitted table, got {method!r}")
    if not (isinstance(target_ratio, (int, float)) and target_ratio > 1):
        raise ValueError(f"ratio must be a number > 1, got {target_ratio!r}")
    if exact_share is None:
        exact_share = default_exact_share(method)
    if not 0 <= exact_share < 1:
        raise ValueError(f"exact_share must be in [0, 1), got {exact_share!r}")
    if residual_share is None:
        residual_share = default_residual_share(method)
    if not (isinstance(residual_share, (int, float)) and not isinstance(residual_share, bool)
            and 0 <= residual_share < 1 and exact_share + residual_share < 1):
        raise ValueError(f"residual_share must be in [0, 1) with exact_share + residual_share "
                         f"< 1, got {residual_share!r} (exact_share {exact_share!r})")
    if transform_rank is not None and not (isinstance(transform_rank, int)
                                           and not isinstance(transform_rank, bool)
                                           and transform_rank >= 0):
        raise ValueError(f"transform_rank must be None or an int >= 0, got {transform_rank!r}")
    v, d, elt = num_embeddings, embedding_dim, element_size
    if transform_rank is not None and (transform_rank >= d
                                       or kronecker_low_rank_size(d, transform_rank) >= d * d):
        transform_rank = None  # no smaller than the whole matrix
    transform_numbers = (0 if not transform else d * d if transform_rank is None
                         else kronecker_low_rank_size(d, transform_rank))
    dense = v * d * elt
    budget = int(dense / target_ratio)
    fixed = ((transform_numbers * elt) + (4 * v if row_order and method != "dpq" else 0)
             + (v * elt if logit_bias else 0) + (v + 8 if row_scale else 0))
    row_bytes = d * elt + _ID_BYTES
    reserve = int(budget * exact_share) + int(budget * residual_share)
    pick = _dpq_base if method == "dpq" else (lambda *a: _tt_base(*a, method))
    spec = pick(v, d, budget - fixed - reserve, elt) if budget - fixed - reserve > 0 else None
    if spec is None:  # no room for the reserve: try without it
        spec = pick(v, d, budget - fixed, elt) if budget - fixed > 0 else None
    if spec is None:
        least = _smallest_bytes(method, v, d, elt) + fixed
        raise ValueError(
            f"ratio {target_ratio} cannot be reached by {method} for a {v} x {d} table"
            f"{' with its transform' if transform else ''}"
            f"{' and logit bias' if logit_bias else ''}; the closest ratio that can "
            f"be had is {dense / least:.1f}x (ask for at most that)")
    base = _base_bytes(spec, v, d, elt)
    left = budget - fixed - base
    if residual_share > 0:  # exact rows get their share, the residual rows the rest
        num_exact = min(int(budget * exact_share) // row_bytes, left // row_bytes)
        residual = max(0, left - num_exact * row_bytes)
    else:
        num_exact, residual = max(0, left // row_bytes), 0
    num_exact = min(num_exact, v - 1)
    stored = base + fixed + num_exact * row_bytes + residual
    return FitPlan(spec=spec, num_exact=int(num_exact), transform=transform,
                   row_order=row_order and method != "dpq", logit_bias=logit_bias,
                   stored_bytes=stored, dense_bytes=dense,
                   transform_rank=transform_rank if transform else None,
                   residual_bytes=int(residual), row_scale=row_scale,
                   residual_share=float(residual_share))
