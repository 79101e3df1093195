"""Fitting a compressed table to a pretrained one, weighted and in the model's metric.

:func:`fit_table` is the entry point: ``W [V, d]`` -> :class:`FittedEmbedding` of any
registered method. The table is mapped into the metric (``X = W @ A``, see
:func:`compemb.fit.stats.metric_root`), optionally rotated (PQ: evens out the groups, as
OPQ does; residual rows: evens out the dimensions that one scale per row serves, see
:func:`default_rotation`), the ``N`` rows with the largest token weights are kept exactly,
and the rest is fitted with per-row weights:

* ``"dpq"``: product quantisation by weighted k-means per group, stored directly in the
  inference form (:class:`compemb.dpq.CodebookEmbedding`: packed codes and values);
* ``"tt"`` / ``"tr"``: TT-SVD / TR-SVD, then a few Adam steps on the weighted error
  (an SVD cannot take row weights: they do not factor through the cores); optionally on
  rows reordered so that similar rows share index prefixes (:func:`prefix_order`);
* any other method: its own ``from_dense`` on ``X`` (unweighted).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..dpq.codebook import CodebookEmbedding
from ..dpq.math import _nearest, check_groups, kmeans
from ..registry import get_method
from ..spec import EmbeddingSpec
from .layer import FittedEmbedding
from .residual import ResidualRows, allocate_bits
from .transform import (kron_apply, kronecker_low_rank_transform, kronecker_rotation,
                        low_rank_root)

__all__ = ["fit_table", "fit_codebook", "fit_tensor_network", "prefix_order", "default_rotation",
           "random_rotation", "weighted_error"]


def random_rotation(dim: int, seed: int = 0) -> Tensor:
    """A random orthogonal ``float64 [d, d]`` (QR of a Gaussian, signs fixed), seeded."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def weighted_error(approx: Tensor, target: Tensor, weights: Optional[Tensor]) -> float:
    """``sum_i w_i ||approx_i - target_i||^2 / sum_i w_i ||target_i||^2`` (relative)."""
    diff = (approx.double() - target.double()).pow(2).sum(1)
    norm = target.double().pow(2).sum(1)
    if weights is not None:
        w = weights.double().to(diff.device)
        diff, norm = diff * w, norm * w
    return float(diff.sum() / norm.sum().clamp_min(1e-30))


def fit_codebook(points: Tensor, num_codes: int, num_groups: int,
                 weights: Optional[Tensor] = None, iters: int = 10, seed: int = 0,
                 max_rows: int = 8192, init: str = "random") -> CodebookEmbedding:
    """Product quantisation of ``points [V, d]``: ``num_groups`` groups of ``d/D``
    dimensions, ``num_codes`` centroids each, by k-means weighted by ``weights [V]``;
    every row then gets its nearest centroids (weight 0 included).

    The centroids are fitted on at most ``max_rows`` rows: the heaviest quarter of them by
    weight, plus a uniform sample of the rest whose weights are scaled up by the sampling
    rate (an unbiased estimate of the full weighted objective). Assigning a point costs
    ``D * Kc`` distances, so this bounds the Lloyd iterations' cost; the final assignment
    covers every row. ``init``: k-means seeding (``"random"``: distinct rows drawn by
    weight; ``"kmeans++"`` costs ``Kc`` sequential passes)."""
    v, d = points.shape
    check_groups(d, num_groups)
    x = points.detach().float().reshape(v, num_groups, d // num_groups).transpose(0, 1)
    gen = torch.Generator().manual_seed(seed)
    w = torch.ones(v) if weights is None else weights.detach().float().cpu()
    sample, sample_w = torch.arange(v), w
    if v > max_rows:
        top = w.argsort(descending=True, stable=True)
        heavy, rest = top[:max_rows // 4], top[max_rows // 4:]
        picked = rest[torch.randperm(rest.numel(), generator=gen)[:max_rows - heavy.numel()]]
        sample = torch.cat([heavy, picked])
        sample_w = torch.cat([w[heavy], w[picked] * (rest.numel() / picked.numel())])
    centroids, _ = kmeans(x[:, sample].contiguous(), num_codes, iters=iters, generator=gen,
                          init=init, weights=sample_w if float(sample_w.sum()) > 0 else None)
    assign = _nearest(x.contiguous(), centroids)
    return CodebookEmbedding(assign.t().contiguous(), centroids)


def prefix_order(points: Tensor, row_factors: Sequence[int]) -> Tensor:
    """A row order ``LongTensor [V]`` (``order[r]`` = the row placed at position ``r``)
    that puts similar rows under shared TT index prefixes: the rows are sorted along
    their first principal direction and cut into ``I1`` blocks of ``I2*..*IN`` (the rows
    sharing ``i1``), and each block is ordered the same way by its own principal
    direction, recursively. ``points [V, d]``."""
    v = points.shape[0]
    x = points.detach().double()
    sizes = [math.prod(row_factors[k + 1:]) for k in range(len(row_factors))]
    order: List[Tensor] = []

    def split(ids: Tensor, level: int) -> None:
        if level >= len(row_factors) - 1 or ids.numel() <= 1:
            order.append(ids)
            return
        sub = x[ids]
        sub = sub - sub.mean(0)
        try:
            direction = torch.linalg.svd(sub, full_matrices=False)[2][0]
            ids = ids[(sub @ direction).argsort()]
        except RuntimeError:  # degenerate block: keep its order
            pass
        for start in range(0, ids.numel(), sizes[level]):
            split(ids[start:start + sizes[level]], level + 1)

    split(torch.arange(v), 0)
    return torch.cat(order)


def fit_tensor_network(points: Tensor, spec: EmbeddingSpec, weights: Optional[Tensor] = None,
                       row_order: bool = False, steps: int = 60, lr: float = 0.02
                       ) -> Tuple[torch.nn.Module, Optional[Tensor]]:
    """TT/TR layer of ``spec`` fitted to ``points [V, d]``: TT-SVD (TR-SVD), then ``steps``
    Adam steps on ``sum_i w_i ||row_i - x_i||^2`` (``lr`` relative to each core's RMS);
    the lower-error of the two is kept. With ``row_order`` the rows are first placed by
    :func:`prefix_order`. Returns ``(layer, row_index)``: row ``i`` of ``points`` is row
    ``row_index[i]`` of the layer (``None`` without reordering)."""
    method = get_method(spec.method)
    x = points.detach().float()
    row_index = None
    if row_order:
        probe = method.build(spec.config, x.shape[0], x.shape[1])
        order = prefix_order(x, probe.shape[0])
        x = x[order]
        weights = None if weights is None else weights[order]
        row_index = torch.empty_like(order)
        row_index[order] = torch.arange(order.numel())
    layer = method.from_dense(spec.config, x)
    w = None if weights is None else weights.float()
    if steps > 0:
        best = weighted_error(layer.materialize().detach(), x, w)
        best_state = [c.detach().clone() for c in layer.parameters()]
        groups = [{"params": [p], "lr": lr * float(p.detach().pow(2).mean().sqrt().clamp_min(1e-8))}
                  for p in layer.parameters()]
        opt = torch.optim.Adam(groups)
        scale = 1.0 / float(((x * x).sum(1) * (w if w is not None else 1)).sum())
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            err = (layer.materialize() - x).pow(2).sum(1)
            loss = (err * w).sum() * scale if w is not None else err.sum() * scale
            loss.backward()
            opt.step()
        now = weighted_error(layer.materialize().detach(), x, w)
        if not now < best:
            with torch.no_grad():
                for p, b in zip(layer.parameters(), best_state):
                    p.copy_(b)
    return layer, row_index


def default_rotation(method: str, residual_bytes: int, has_metric: bool) -> bool:
    """Whether :func:`fit_table` rotates the fit's space (at random; the rotation is stored
    in the transform) when ``rotate`` is not given: for ``"dpq"``, whose groups need the
    variance spread evenly over them, and for any method with ``residual_bytes`` and a
    ``metric`` (whose transform then holds the rotation at no extra byte).

    Why the residual rows: each is rounded with one scale per row
    (:func:`compemb.fit.residual.quantize_rows`), which serves badly a row whose dimensions
    differ in spread or that has a few large entries; a rotation spreads every row's error
    evenly over the dimensions and brings it closer to Gaussian. Measured on SmolLM2-135M's
    table (TT 10x, rank 22, 90% of the bytes residual rows; in the head's metric, PTB +
    sampled token weights): the residuals' median kurtosis 3.68 -> 2.97, the fit's weighted
    error 0.0083 -> 0.0056 (median row 0.167 -> 0.124 relative); perplexity on PTB / Python
    / legal with no text and the head fit +9.6 / +13.3 / +14.2% -> +5.7 / +5.2 / +7.2%
    (seed 0, ``runs/exp/probe3.py``: the benchmark's compression and windows)."""
    return method == "dpq" or (residual_bytes > 0 and has_metric)


def fit_table(weight: Tensor, spec: EmbeddingSpec, *, token_weights: Optional[Tensor] = None,
              metric: Optional[Tuple[Tensor, Tensor]] = None, rotate: Optional[bool] = None,
              num_exact: int = 0, row_order: bool = False, padding_idx: Optional[int] = None,
              head_mean: Optional[Tensor] = None, seed: int = 0,
              tt_steps: int = 60, transform_rank: Optional[int] = None,
              residual_bytes: int = 0) -> FittedEmbedding:
    """A :class:`FittedEmbedding` of ``spec``'s method for the pretrained ``weight [V, d]``.

    Args:
        token_weights: ``[V]`` per-row weights (:func:`compemb.fit.stats.token_weights`);
            ``None``: uniform.
        metric: ``(A, A_inv)`` from :func:`compemb.fit.stats.metric_root`; ``None``: plain L2.
        rotate: follow ``A`` by a random rotation (default: for ``"dpq"``, where it
            spreads the variance evenly over the groups, and for any method with
            ``residual_bytes`` and a ``metric``: :func:`default_rotation`).
        num_exact: rows kept exactly: the ``num_exact`` largest ``token_weights`` (ties
            to the lower id); they get weight 0 in the fit.
        row_order: TT/TR only: reorder rows by :func:`prefix_order`.
        padding_idx: a row that stays zero.
        head_mean: ``[d]`` mean of the LM head's input (a table that is also a head): the
            layer gets ``logit_bias = -(W_hat - W) @ head_mean``, which cancels each row's
            logit error along the mean, exactly in expectation. Pass ``metric`` built from
            the covariance (second moment minus the mean's outer product) with it: the
            bias takes care of the mean direction.
        transform_rank: store the map back (``A^-1``, after the rotation) as a
            :class:`compemb.fit.transform.KroneckerLowRank` of this rank instead of a
            ``d x d`` matrix: the metric keeps its ``transform_rank`` largest eigenvalues and
            the mean of the rest (:func:`compemb.fit.transform.low_rank_root`), the
            rotation is a Kronecker product of two (:func:`~compemb.fit.transform.kronecker_rotation`).
        residual_bytes: bytes for residual rows
            (:class:`compemb.fit.residual.ResidualRows`): the base's residual (in the fit's
            space) of the rows where it costs most, at 2-8 bits per dimension, chosen by
            :func:`compemb.fit.residual.allocate_bits` from ``token_weights``; 0: none.

    The result is in ``weight``'s dtype and on the CPU; for ``"dpq"`` the base is the
    inference form (:class:`compemb.dpq.CodebookEmbedding`)."""
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating [num_embeddings, embedding_dim] tensor, "
                         f"got {getattr(weight, 'shape', type(weight).__name__)}")
    v, d = weight.shape
    if not (isinstance(residual_bytes, int) and not isinstance(residual_bytes, bool)
            and residual_bytes >= 0):
        raise ValueError(f"residual_bytes must be an int >= 0, got {residual_bytes!r}")
    if not (isinstance(num_exact, int) and 0 <= num_exact < v):
        raise ValueError(f"num_exact must be an int in [0, {v}), got {num_exact!r}")
    if head_mean is not None and tuple(head_mean.shape) != (d,):
        raise ValueError(f"head_mean must be [{d}], got {tuple(head_mean.shape)}")
    w = weight.detach().to("cpu", torch.float64)
    if token_weights is not None:
        if token_weights.shape != (v,):
            raise ValueError(f"token_weights must be [{v}], got {tuple(token_weights.shape)}")
        tw = token_weights.detach().float().cpu().clone()
    else:
        tw = torch.ones(v)
    if padding_idx is not None:
        tw[padding_idx] = 0
    a, a_inv = metric if metric is not None else (None, None)
    do_rotate = (rotate if rotate is not None
                 else default_rotation(spec.method, residual_bytes, metric is not None))
    if transform_rank is not None and (a is not None or do_rotate):
        if not (isinstance(transform_rank, int) and 0 <= transform_rank < d):
            raise ValueError(f"transform_rank must be None or an int in [0, {d}), got "
                             f"{transform_rank!r}")
        root = None if a is None else low_rank_root(a.double() @ a.double(), transform_rank)
        rotation = kronecker_rotation(d, seed) if do_rotate else None
        x = w
        if root is not None:  # x = W A_k, A_k = t I + E diag(s - t) E^T
            e, s, t = root
            x = t * w + ((w @ e) * (s - t)) @ e.T
        if rotation is not None:
            x = kron_apply(x, *rotation)
        transform = kronecker_low_rank_transform(root, d, rotation)
    else:
        x = w if a is None else w @ a.double()
        transform = None if a_inv is None else a_inv.double()
        if do_rotate:
            q = random_rotation(d, seed)
            x = x @ q
            transform = q.T if transform is None else q.T @ transform
    exact_ids = None
    if num_exact:
        exact_ids = tw.argsort(descending=True, stable=True)[:num_exact].sort().values
        tw[exact_ids] = 0
        if not float(tw.sum()) > 0:
            tw = torch.ones(v)
    fit_w = None if token_weights is None and not num_exact and padding_idx is None else tw
    row_index = None
    if spec.method == "dpq":
        o = spec.config
        if o.shared_subspace:
            raise ValueError("fitting a pretrained table supports num_groups codebooks, not "
                             "shared_subspace=True")
        base = fit_codebook(x.float(), o.num_codes, o.num_groups, fit_w, seed=seed)
    elif spec.method in ("tt", "tr"):
        base, row_index = fit_tensor_network(x.float(), spec, fit_w, row_order=row_order,
                                             steps=tt_steps)
    else:
        base = get_method(spec.method).from_dense(spec.config, x.float())
    residual = None
    if residual_bytes:
        with torch.no_grad():
            rows = base.materialize().detach().float()
            if row_index is not None:
                rows = rows[row_index]
            error = x.float() - rows
        bits = allocate_bits(error, fit_w if fit_w is not None else torch.ones(v), residual_bytes,
                             element_size=weight.element_size())
        if bool((bits > 0).any()):
            residual = ResidualRows.from_rows(error, bits, dtype=weight.dtype)
    base = base.to(weight.dtype)
    exact_rows = None if exact_ids is None else weight.detach().cpu()[exact_ids]
    layer = FittedEmbedding(base, None if transform is None else transform.to(weight.dtype),
                            exact_ids, exact_rows, row_index, padding_idx=padding_idx,
                            residual=residual)
    if head_mean is not None:
        with torch.no_grad():
            error = layer.materialize().double() - weight.detach().cpu().double()
            bias = -(error @ head_mean.double().cpu())
        layer = FittedEmbedding(base, layer.transform, exact_ids, exact_rows, row_index,
                                padding_idx=padding_idx, logit_bias=bias.to(weight.dtype),
                                residual=residual)
    return layer
