"""FittedEmbedding: a compressed table fitted to a pretrained one.

A pretrained table ``W [V, d]`` is compressed as ``W ~= B[row_index] @ T`` with rows
``exact_ids`` kept as they are:

* ``B`` is any compemb layer (a DPQ codebook, TT cores, ...) fitted to ``W @ A``, the table
  mapped into the metric where plain L2 is what an error costs the model (see
  :mod:`compemb.fit.stats`); ``T [d, d]`` maps back (``A^-1``, times a rotation for PQ),
  stored whole or as a Kronecker product plus a low rank
  (:class:`compemb.fit.transform.KroneckerLowRank`, ``O(d*k)`` numbers).
* ``row_index [V]`` (optional) is a permutation: row ``i`` of the table is row
  ``row_index[i]`` of ``B``, so a TT can place similar rows under shared index prefixes.
* ``exact_rows [N, d]``: the ``N`` most used rows, kept exactly (mixed allocation).
* ``residual`` (optional, :class:`compemb.fit.residual.ResidualRows`): for some rows, the
  base's residual at 2-8 bits per dimension, added in the base's space (graded mixed
  allocation: more bits for the rows that cost more).
* ``logit_bias [V]`` (optional, for a table that is also the LM head): added to the
  logits only (never to looked-up rows). Fitted as ``-(W_hat_i - W_i) . E[h]``, it cancels
  the part of each row's error that shifts its logit the same way in every context (the
  head's input is dominated by its mean), at ``4*V`` bytes.
* ``row_scale [V]`` (optional): each fitted row (not the exact ones) times a per-token
  factor, stored at 8 bits (``V + 8`` bytes), against the rows' shrinkage
  (:func:`shrinkage_scale`): a quantised row is a mean of the rows that share its codes,
  so it is shorter along its dense row, and as a head its token's logit falls exactly
  where the context predicts it.
"""
from __future__ import annotations

import copy
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_indices
from ..output import embedding_logits
from ..report import LayerStorage
from .residual import ResidualRows
from .slots import cached_per_state, slot_map
from .transform import KroneckerLowRank

__all__ = ["FittedEmbedding", "shrinkage_scale", "ROW_SCALE_POWER"]

#: The row scale is ``s ** -ROW_SCALE_POWER`` for a row whose projection on its dense row
#: is ``s`` (see :func:`shrinkage_scale`). It was 0.5 until 2026-12-07 07:00 UTC.
ROW_SCALE_POWER = 1.0
#: Levels of the stored row scale (uint8 codes between its min and max).
_SCALE_LEVELS = 255


def shrinkage_scale(fitted: Tensor, dense: Tensor, power: float = ROW_SCALE_POWER,
                    bounds: tuple = (0.5, 1.5)) -> Tensor:
    """``float32 [V]`` row factors ``s_i ** -power`` for the rows of ``fitted [V, d]``,
    ``s_i = <fitted_i, dense_i> / |dense_i|^2`` (clamped to ``bounds``; a zero dense row
    gets 1): the part of the dense row that a row keeps.

    Where the context predicts token ``i`` (its head input along ``dense_i``), its logit is
    about ``s_i`` times the dense one, so dividing by ``s_i`` (``power=1``, the default)
    restores it there, at the cost of scaling the row's error up everywhere. Measured on
    SmolLM2's DPQ 10x table with no user text (residual rows 0.1, the head fit; perplexity
    on PTB / Python / legal against dense, seeds 0, 1, 2): ``power=0.5`` +4.7 / +3.7 /
    +6.7%, +3.9 / +3.9 / +6.9%, +3.7 / +3.3 / +6.6%; ``power=1`` +4.8 / +3.6 / +6.4%,
    +3.9 / +3.7 / +6.7%, +3.6 / +3.4 / +6.5% (``bench.pretrained_lm``): legal 0.2 points
    better in every seed, the others within 0.15. (With residual rows 0.05, applied to
    compressed models after the fact, ``power=1`` had cost PTB 0.5-1.0 point against 0.5,
    two seeds.) Even after it, the tokens from id 8,000 up are under-predicted where they
    occur (their logit falls 0.13-0.37 nats more than the log-partition), which is where
    most of the remaining loss is."""
    if fitted.shape != dense.shape or fitted.dim() != 2:
        raise ValueError(f"fitted and dense must be the same [V, d] shape, got "
                         f"{tuple(fitted.shape)} and {tuple(dense.shape)}")
    f, w = fitted.detach().double(), dense.detach().double().to(fitted.device)
    norm = (w * w).sum(1)
    s = torch.where(norm > 0, (f * w).sum(1) / norm.clamp_min(1e-300), torch.ones_like(norm))
    return s.clamp(*bounds).pow(-power).float()


class FittedEmbedding(nn.Module):
    """``table = row_scale * (base.materialize()[row_index] @ transform)``, rows ``exact_ids``
    replaced by ``exact_rows``; the padding row (if any) zero.

    Args:
        base: a compemb layer of ``V`` rows and ``d`` columns (``forward``, ``logits``,
            ``materialize``, ``storage``).
        transform: ``[d, d]``, a :class:`~compemb.fit.transform.KroneckerLowRank` of ``d``
            (the same map in fewer numbers), or ``None`` (identity).
        exact_ids: ``LongTensor [N]`` distinct ids kept exactly, or ``None``.
        exact_rows: ``[N, d]`` their rows.
        row_index: ``LongTensor [V]``, a permutation of ``range(V)``, or ``None``.
        logit_bias: ``[V]`` added to :meth:`logits` only, or ``None``.
        padding_idx: a row returned as zeros.
        row_scale: ``[V]`` positive factors of the fitted rows (stored at 8 bits:
            :meth:`set_row_scale`), or ``None``.
        residual: :class:`~compemb.fit.residual.ResidualRows` of ``d`` columns (ids are
            table rows), added to the base's rows before the transform; or ``None``.

    ``forward(ids [...]) -> [..., d]``; ``logits(hidden [..., d]) -> [..., V]`` is
    ``base.logits(hidden @ transform.T)`` (the base's own fast path, never ``V x d``) with
    the exact rows' columns computed directly. Parameters: the base's, ``transform`` (or
    its factors ``transform.left/right/u/v``) and ``exact_rows`` (all trainable, e.g. by
    ``compemb_hf.calibrate``); buffers ``exact_ids`` and ``row_index`` (int32 in
    ``state_dict``).
    """

    def __init__(self, base: nn.Module, transform: Union[Tensor, KroneckerLowRank, None] = None,
                 exact_ids: Optional[Tensor] = None, exact_rows: Optional[Tensor] = None,
                 row_index: Optional[Tensor] = None, padding_idx: Optional[int] = None,
                 logit_bias: Optional[Tensor] = None,
                 residual: Optional[ResidualRows] = None,
                 row_scale: Optional[Tensor] = None) -> None:
        super().__init__()
        v, d = getattr(base, "num_embeddings", None), getattr(base, "embedding_dim", None)
        if v is None or d is None or not callable(getattr(base, "materialize", None)):
            raise TypeError(f"base must be a compemb layer (num_embeddings, embedding_dim, "
                            f"materialize), got {type(base).__name__}")
        self.base = base
        self.num_embeddings, self.embedding_dim = int(v), int(d)
        ref = next(iter(base.parameters()), None)
        dtype = ref.dtype if ref is not None else torch.float32
        device = ref.device if ref is not None else None
        if isinstance(transform, KroneckerLowRank):
            if transform.dim != d:
                raise ValueError(f"transform must map {d} dimensions, got one of {transform.dim}")
            self.transform = copy.deepcopy(transform).to(device=device, dtype=dtype)
        elif transform is not None:
            if tuple(transform.shape) != (d, d):
                raise ValueError(f"transform must be [{d}, {d}], got {tuple(transform.shape)}")
            self.transform = nn.Parameter(transform.detach().to(device=device, dtype=dtype).clone())
        else:
            self.register_parameter("transform", None)
        if (exact_ids is None) != (exact_rows is None):
            raise ValueError("exact_ids and exact_rows go together (both or neither)")
        if exact_ids is not None:
            ids = exact_ids.detach().reshape(-1).long()
            if exact_rows.shape != (ids.numel(), d):
                raise ValueError(f"exact_rows must be [{ids.numel()}, {d}] (one row per exact "
                                 f"id), got {tuple(exact_rows.shape)}")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v
                                or ids.unique().numel() != ids.numel()):
                raise ValueError(f"exact_ids must be distinct ids in [0, {v})")
            self.register_buffer("exact_ids", ids.to(device=device, dtype=torch.int32))
            self.exact_rows = nn.Parameter(exact_rows.detach().to(device=device, dtype=dtype).clone())
        else:
            self.register_buffer("exact_ids", None)
            self.register_parameter("exact_rows", None)
        if row_index is not None:
            idx = row_index.detach().reshape(-1).long()
            if idx.numel() != v or not torch.equal(idx.sort().values, torch.arange(v)):
                raise ValueError(f"row_index must be a permutation of range({v})")
            self.register_buffer("row_index", idx.to(device=device, dtype=torch.int32))
        else:
            self.register_buffer("row_index", None)
        if logit_bias is not None:
            if tuple(logit_bias.shape) != (v,):
                raise ValueError(f"logit_bias must be [{v}], got {tuple(logit_bias.shape)}")
            self.logit_bias = nn.Parameter(logit_bias.detach().to(device=device, dtype=dtype).clone())
        else:
            self.register_parameter("logit_bias", None)
        if residual is not None:
            if not isinstance(residual, ResidualRows) or residual.dim != d:
                raise ValueError(f"residual must be a ResidualRows of dim {d}, got {residual!r}")
            ids = residual.ids
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
                raise ValueError(f"residual ids must lie in [0, {v})")
            self.residual = copy.deepcopy(residual).to(device=device)
            self.residual.scales.data = self.residual.scales.data.to(dtype)
        else:
            self.residual = None
        self.register_buffer("row_scale_codes", None)
        self.register_buffer("row_scale_range", None)
        if row_scale is not None:
            self.set_row_scale(row_scale)
        if padding_idx is not None and not (isinstance(padding_idx, int) and -v <= padding_idx < v):
            raise ValueError(f"padding_idx must be None or an int in [-{v}, {v}), got {padding_idx!r}")
        self.padding_idx = None if padding_idx is None else padding_idx % v

    @classmethod
    def empty(cls, base: nn.Module, transform: bool, num_exact: int, row_index: bool,
              padding_idx: Optional[int] = None, logit_bias: bool = False,
              transform_rank: Optional[int] = None,
              residual_counts: Optional[dict] = None,
              row_scale: bool = False) -> "FittedEmbedding":
        """A layer of this structure with placeholder values, to ``load_state_dict`` a
        checkpoint into (``transform_rank``: the transform is a
        :class:`~compemb.fit.transform.KroneckerLowRank` of that rank; ``residual_counts``:
        ``{bits: rows}`` of the :class:`~compemb.fit.residual.ResidualRows`;
        ``row_scale``: whether a row scale is stored)."""
        v, d = base.num_embeddings, base.embedding_dim
        if transform and transform_rank is not None:
            placeholder = KroneckerLowRank.empty(d, transform_rank)
        else:
            placeholder = torch.eye(d) if transform else None
        return cls(base, placeholder,
                   torch.arange(num_exact) if num_exact else None,
                   torch.zeros(num_exact, d) if num_exact else None,
                   torch.arange(v) if row_index else None, padding_idx=padding_idx,
                   logit_bias=torch.zeros(v) if logit_bias else None,
                   residual=ResidualRows(d, {int(b): int(n) for b, n in residual_counts.items()})
                   if residual_counts else None,
                   row_scale=torch.ones(v) if row_scale else None)

    # ------------------------------------------------------------------ row scale
    @torch.no_grad()
    def set_row_scale(self, scale: Tensor, head_mean: Optional[Tensor] = None) -> None:
        """Store ``scale [V]`` (positive, finite) as the fitted rows' factors (lookups,
        :meth:`materialize` and :meth:`logits` alike; exact rows stay as they are), at 8
        bits: uint8 codes between its min and max (buffers ``row_scale_codes``,
        ``row_scale_range``).

        ``head_mean [d]`` (needs a ``logit_bias``): the bias moves so that every logit at
        the mean head input stays what it was, and the scale acts only on how a logit
        varies with the context. The head's input is dominated by its mean, so without
        this a factor of 1.02 would shift a token's logit in every context (measured on
        SmolLM2 DPQ 10x calibrated on news text, scaled after the head fit: +4.0% perplexity
        there instead of +2.8% with it)."""
        v = self.num_embeddings
        if not isinstance(scale, Tensor) or tuple(scale.shape) != (v,):
            raise ValueError(f"row_scale must be a [{v}] tensor, got "
                             f"{getattr(scale, 'shape', type(scale).__name__)}")
        scale = scale.detach().float().cpu()
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise ValueError("row_scale must be positive and finite")
        if head_mean is not None:
            if self.logit_bias is None:
                raise ValueError("head_mean moves the logit bias, but this table has none "
                                 "(build it with logit_bias=...)")
            if tuple(head_mean.shape) != (self.embedding_dim,):
                raise ValueError(f"head_mean must be [{self.embedding_dim}], got "
                                 f"{tuple(head_mean.shape)}")
        device = next(self.parameters()).device
        if head_mean is not None:  # the unscaled logits at the mean, before anything changes
            old = self.row_scale()
            at_mean = (self.logits(head_mean.to(device, self.logit_bias.dtype).unsqueeze(0))[0]
                       - self.logit_bias).float()
            unscaled = at_mean if old is None else at_mean / old
        lo, hi = float(scale.min()), float(scale.max())
        step = (hi - lo) / _SCALE_LEVELS
        codes = (torch.zeros(v) if step == 0 else ((scale - lo) / step).round()
                 ).clamp(0, _SCALE_LEVELS).to(torch.uint8)
        self.row_scale_codes = codes.to(device)
        self.row_scale_range = torch.tensor([lo, hi], dtype=torch.float32, device=device)
        if head_mean is not None:
            before = 1.0 if old is None else old
            shift = (before - self.row_scale()) * unscaled
            if self.exact_ids is not None and self.exact_ids.numel():
                shift[self.exact_ids.long()] = 0  # exact columns are not scaled
            self.logit_bias.add_(shift.to(self.logit_bias.dtype))

    def row_scale(self, ids: Optional[Tensor] = None) -> Optional[Tensor]:
        """``float32 [V]`` (or ``[...]`` for ``ids [...]``: only those rows dequantised): the
        stored row scale, or ``None`` when there is none."""
        if self.row_scale_codes is None:
            return None
        codes = self.row_scale_codes if ids is None else self.row_scale_codes[ids]
        lo, hi = self.row_scale_range[0].float(), self.row_scale_range[1].float()
        return lo + codes.float() * ((hi - lo) / _SCALE_LEVELS)

    # ------------------------------------------------------------------ table access
    def _slots(self, ids: Tensor) -> Tensor:
        """``[...]`` position of each id in ``exact_ids``, -1 where it is not kept (the
        ``[V]`` map is built once per state of ``exact_ids``, not per call; under
        ``torch.compile`` / ``torch.export`` it is built in the graph)."""
        slots = cached_per_state(
            self, "_slot_cache", [self.exact_ids],
            lambda: slot_map(self.exact_ids, self.num_embeddings, ids.device), ids.device)
        return slots[ids]

    def forward(self, input: Tensor) -> Tensor:
        """``input [...]`` (ids) -> ``[..., d]``."""
        check_indices(input, self.num_embeddings)
        ids = input.long()
        base_ids = ids if self.row_index is None else self.row_index[ids].long()
        out = self.base(base_ids)
        if self.residual is not None:
            out = self.residual.add_to_lookup(ids, out, self.num_embeddings)
        out = self._through_transform(out)
        scale = self.row_scale(ids)
        if scale is not None:
            out = out * scale.to(out.dtype).unsqueeze(-1)
        if self.exact_ids is not None and self.exact_ids.numel():
            slot = self._slots(ids)
            kept = self.exact_rows.to(out.dtype)[slot.clamp_min(0)]
            out = torch.where((slot >= 0).unsqueeze(-1), kept, out)
        if self.padding_idx is not None:
            out = out.masked_fill((ids == self.padding_idx).unsqueeze(-1), 0)
        return out

    def materialize(self) -> Tensor:
        """The ``[V, d]`` table."""
        table = self.base.materialize()
        if self.row_index is not None:
            table = table[self.row_index.long()]
        if self.residual is not None:
            table = self.residual.add_to_table(table)
        table = self._through_transform(table)
        scale = self.row_scale()
        if scale is not None:
            table = table * scale.to(table.dtype).unsqueeze(-1)
        if self.exact_ids is not None and self.exact_ids.numel():
            table = table.index_copy(0, self.exact_ids.long(), self.exact_rows.to(table.dtype))
        if self.padding_idx is not None:
            table = table.index_fill(0, torch.tensor([self.padding_idx], device=table.device), 0)
        return table

    def logits(self, hidden: Tensor) -> Tensor:
        """``hidden [..., d] -> hidden @ materialize().T  [..., V]`` without building the
        table: ``base.logits(hidden @ transform.T)``, columns reordered by ``row_index``,
        exact rows' columns computed directly; plus ``logit_bias``."""
        if hidden.shape[-1] != self.embedding_dim:
            raise ValueError(f"hidden has last dimension {hidden.shape[-1]}, expected "
                             f"embedding_dim={self.embedding_dim}")
        h = self._through_transform(hidden, transposed=True)
        out = embedding_logits(self.base, h)
        if self.row_index is not None:
            out = out.index_select(-1, self.row_index.long())
        if self.residual is not None:
            out = self.residual.add_to_logits(h, out)
        scale = self.row_scale()
        if scale is not None:
            out = out * scale.to(out.dtype)
        if self.exact_ids is not None and self.exact_ids.numel():
            exact = F.linear(hidden.to(out.dtype), self.exact_rows.to(out.dtype))
            out = out.index_copy(out.dim() - 1, self.exact_ids.long(), exact)
        if self.logit_bias is not None:
            out = out + self.logit_bias.to(out.dtype)
        if self.padding_idx is not None:
            out = out.index_fill(-1, torch.tensor([self.padding_idx], device=out.device), 0)
        return out

    def _through_transform(self, x: Tensor, transposed: bool = False) -> Tensor:
        """``x [..., d] @ T`` (rows of the base), or ``@ T.T`` (hidden states)."""
        t = self.transform
        if t is None:
            return x
        if isinstance(t, KroneckerLowRank):
            return t.hidden(x) if transposed else t.rows(x)
        return F.linear(x, t.to(x.dtype)) if transposed else x @ t.to(x.dtype)

    def export(self) -> "FittedEmbedding":
        """The same table with the base in its inference form (``base.export()``, e.g.
        DPQ codes and values); ``self`` when the base has none."""
        export = getattr(self.base, "export", None)
        if not callable(export):
            return self
        out = FittedEmbedding(export(), self.transform, self.exact_ids, self.exact_rows,
                              self.row_index, self.padding_idx, self.logit_bias, self.residual)
        out.row_scale_codes = self.row_scale_codes
        out.row_scale_range = self.row_scale_range
        return out

    # ------------------------------------------------------------------ bookkeeping
    def storage(self) -> LayerStorage:
        """The base's bytes plus the transform, the exact rows (with their int32 ids) and
        the int32 row index; dense bytes in the dtype of the transform / exact rows."""
        base = self.base.storage()
        extra = extra_params = 0
        transform = ([] if self.transform is None else list(self.transform.parameters())
                     if isinstance(self.transform, KroneckerLowRank) else [self.transform])
        for p in transform + [self.exact_rows, self.logit_bias]:
            if p is not None:
                extra += p.numel() * p.element_size()
                extra_params += p.numel()
        for b in (self.exact_ids, self.row_index, self.row_scale_codes, self.row_scale_range):
            if b is not None:
                extra += b.numel() * b.element_size()
        if self.residual is not None:
            extra += self.residual.storage_bytes()
            extra_params += sum(p.numel() for p in self.residual.parameters())
        ref = next((p for p in transform + [self.exact_rows] if p is not None), None)
        size = ref.element_size() if ref is not None else base.dense_bytes // max(
            1, base.num_embeddings * base.embedding_dim)
        parts = [base.shape]
        if isinstance(self.transform, KroneckerLowRank):
            parts.append(f"transform rank {self.transform.rank}")
        elif self.transform is not None:
            parts.append("transform")
        if self.exact_ids is not None:
            parts.append(f"exact={self.exact_ids.numel()}")
        if self.row_index is not None:
            parts.append("row order")
        if self.logit_bias is not None:
            parts.append("logit bias")
        if self.row_scale_codes is not None:
            parts.append("row scale")
        if self.residual is not None:
            parts.append(f"residual rows {sum(self.residual.counts.values())}")
        return LayerStorage(
            method=f"{base.method}+fit", shape=", ".join(parts),
            num_embeddings=self.num_embeddings, embedding_dim=self.embedding_dim,
            stored_parameters=base.stored_parameters + extra_params,
            stored_bytes=base.stored_bytes + extra,
            dense_bytes=self.num_embeddings * self.embedding_dim * size)

    def extra_repr(self) -> str:
        parts = [f"{self.num_embeddings}, {self.embedding_dim}",
                 f"transform={self.transform is not None}",
                 f"exact={0 if self.exact_ids is None else self.exact_ids.numel()}",
                 f"row_order={self.row_index is not None}",
                 f"logit_bias={self.logit_bias is not None}",
                 f"row_scale={self.row_scale_codes is not None}",
                 f"residual={None if self.residual is None else self.residual.counts}"]
        if self.padding_idx is not None:
            parts.append(f"padding_idx={self.padding_idx}")
        return ", ".join(parts)

