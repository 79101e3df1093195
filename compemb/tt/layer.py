"""The Tensor-Train embedding layer (and the shared base of the Tensor-Ring one)."""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_indices, check_state_shapes
from ..report import LayerStorage
from . import math as ttm
from ..init import check_init_std
from .config import TTConfig

__all__ = ["TTEmbedding", "TensorNetworkEmbedding"]

Rank = Union[int, Sequence[int]]
#: At inference, a multiply-add of building the table counts this many of a GEMM's when
#: :meth:`TensorNetworkEmbedding.logits` picks its path (the table is built in cache-sized
#: chunks by small batched products, :func:`compemb.tt.math.logits_through_table`).
#: Measured on the 2-core CPU at rank 64, one and two threads: building the table won from
#: about 16-24 hidden states at 32768 x 512 and 32-40 at 49152 x 576; this weight places
#: the switch at 24 and 34.
MATERIALIZE_WEIGHT = 0.6
#: At inference, batches of up to this many ids are looked up from the prefix products
#: that logits keep (:func:`compemb.tt.math.rows_from_prefix`: a decode step's token took
#: 0.1 ms instead of 0.9 ms through the prefix tree at 49152 x 576, rank 64); larger
#: batches share prefixes through :func:`compemb.tt.math.lookup`.
PREFIX_LOOKUP_MAX = 64
ShapeArg = Optional[Tuple[Sequence[int], Sequence[int]]]


class _StandardStrideGrad(torch.autograd.Function):
    """Identity on a core; its gradient leaves with the core's own row-major strides.

    The products reach the cores through permuted views, which leave arbitrary strides on
    size-1 dimensions (a TT's end ranks); DistributedDataParallel compares strides
    literally, warns "Grad strides do not match bucket view strides" and copies."""

    @staticmethod
    def forward(ctx, core: Tensor) -> Tensor:  # type: ignore[override]
        return core.view_as(core)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        strides, step = [], 1
        for size in reversed(grad.shape):
            strides.insert(0, step)
            step *= max(size, 1)
        if grad.stride() == tuple(strides):
            return grad
        return grad.clone(memory_format=torch.contiguous_format)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Core products run in at least float32 (bf16/fp16 cores, or autocast, included)."""
    return torch.promote_types(dtype, torch.float32)


class TensorNetworkEmbedding(nn.Module):
    """Common code of :class:`TTEmbedding` and :class:`compemb.tr.TREmbedding`: a
    ``V x J`` table stored as ``N`` cores; see :mod:`compemb.tt.math` for the index
    conventions and the contractions. Subclasses set ``ring``, ``method`` and
    ``config_cls`` and, for ``from_dense``, ``_decompose``."""

    ring: bool = False
    method: str = ""
    config_cls: type = TTConfig

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: Rank, shape: ShapeArg = None,
                 num_factors: Optional[int] = None, padding_idx: Optional[int] = None,
                 init_std: Optional[float] = None) -> None:
        super().__init__()
        check_init_std(init_std)
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.config = self.config_cls(rank=rank, shape=shape, num_factors=num_factors)
        n = self.config.num_factors
        if self.config.shape is None:
            self.shape: ttm.Shape = ttm.choose_shape(num_embeddings, embedding_dim, n)
        else:
            self.shape = ttm.check_shape(self.config.shape, num_embeddings, embedding_dim)
        self.ranks: Tuple[int, ...] = ttm.full_ranks(self.config.rank, n, self.ring)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = _check_padding_idx(padding_idx, num_embeddings)
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.empty(s)) for s in ttm.core_shapes(self.shape, self.ranks)])
        self.reset_parameters(std=init_std)

    def reset_parameters(self, std: Optional[float] = None) -> None:
        """Paper eq. (2), any ranks: every core element ~ N(0, s^2) with ``s`` from
        :func:`compemb.tt.math.init_std`, so the table has mean 0 and variance 2/(V+J).
        With ``std`` (the init rule, :mod:`compemb.init`: the row std the host model gives
        its own dense table) the cores are then scaled by one common factor so that the
        table has that std (:meth:`rescale_`)."""
        check_init_std(std)
        scale = ttm.init_std(self.num_embeddings, self.embedding_dim, self.ranks, self.ring)
        with torch.no_grad():
            for core in self.cores:
                core.normal_(0.0, scale)
        if std is not None and not self.cores[0].is_meta:  # (meta: no values to scale)
            self.rescale_(std)

    @torch.no_grad()
    def rescale_(self, std: float) -> None:
        """Multiply every core by one factor so that the materialized table has row std
        ``std`` (the structure of the init is kept); for a model whose dense tables start
        at ``std`` and which compares methods from the same start."""
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std!r}")
        factor = (std / float(self.materialize().std())) ** (1.0 / len(self.cores))
        for core in self.cores:
            core.mul_(factor)

    # ------------------------------------------------------------------ lookups
    def _cores(self) -> List[Tensor]:
        dtype = _compute_dtype(self.cores[0].dtype)
        return [_StandardStrideGrad.apply(c).to(dtype) for c in self.cores]

    def forward(self, input: Tensor) -> Tensor:
        """``input [...]`` (integer ids) -> ``[..., embedding_dim]``.

        Rows are computed from the cores once per distinct id of the batch, each distinct
        prefix ``(i1..ik)`` once (see :func:`compemb.tt.math.lookup`); the ``V x J``
        table is never built. Under ``torch.compile`` ids are not de-duplicated (static
        shapes). At inference (no gradient wanted, eager) up to ``PREFIX_LOOKUP_MAX`` ids
        are computed from the prefix products that :meth:`logits` keeps (built here if
        needed): one small product per row. Products run in float32 (also under
        autocast); the output has the cores' dtype, like ``nn.Embedding``'s."""
        check_indices(input, self.num_embeddings)
        flat = input.reshape(-1).long()
        rows_f = self.shape[0]
        with torch.autocast(input.device.type, enabled=False):
            cores = self._cores()
            if 0 < flat.numel() <= PREFIX_LOOKUP_MAX and self._prefix_cacheable():
                # decode sizes at inference: from the prefixes that logits keep
                out = ttm.rows_from_prefix(cores, self._logits_prefix(cores), flat)
                if self.padding_idx is not None:
                    out = out.masked_fill((flat == self.padding_idx).unsqueeze(1), 0.0)
            elif torch.compiler.is_compiling() or flat.numel() == 0:
                out = ttm.gather_rows(cores, flat, rows_f, share=False)
                if self.padding_idx is not None:
                    out = out.masked_fill((flat == self.padding_idx).unsqueeze(1), 0.0)
            else:
                out = ttm.lookup(cores, flat, rows_f, self.padding_idx)
        return out.view(*input.shape, self.embedding_dim).to(self.cores[0].dtype)

    def materialize(self) -> Tensor:
        """The ``[V, J]`` table (float32 or wider; padding row zero)."""
        with torch.autocast(self.cores[0].device.type, enabled=False):
            table = ttm.full_table(self._cores(), self.num_embeddings)
            if self.padding_idx is not None:
                table = table.index_fill(0, torch.tensor([self.padding_idx], device=table.device), 0.0)
        return table

    def logits(self, hidden: Tensor) -> Tensor:
        """``hidden [..., J] -> hidden @ materialize().T  [..., V]``.

        Picks the cheaper contraction for the batch (by multiply-adds,
        :func:`compemb.tt.math.logits_costs`): for large batches the table is built once and
        one GEMM follows (which runs in the autocast dtype when autocast is on); for small
        ones the hidden states are contracted through the cores (in float32). At inference
        (no gradient wanted, eager) the prefix products of that contraction
        (:func:`compemb.tt.math.logits_prefix`, ``V/IN x R x J/JN`` numbers) are kept
        between calls while the cores are unchanged, so decoding a token costs one
        contraction with the last core and one product with them."""
        if hidden.shape[-1] != self.embedding_dim:
            raise ValueError(f"hidden has last dimension {hidden.shape[-1]}, expected "
                             f"embedding_dim={self.embedding_dim}")
        lead = hidden.shape[:-1]
        flat = hidden.reshape(-1, self.embedding_dim)
        cached = self._prefix_cacheable()
        dense_cost, through_cost = ttm.logits_costs(self.shape, self.ranks, flat.shape[0],
                                                    cached_prefix=cached)
        if cached:  # the contraction is then one well-shaped GEMM; building the table is not
            gemm = flat.shape[0] * self.num_embeddings * self.embedding_dim
            build_table = through_cost >= MATERIALIZE_WEIGHT * (dense_cost - gemm) + gemm
        else:
            build_table = 2 * through_cost >= dense_cost
        if build_table and cached:
            out = self._logits_through_table(flat)
        elif build_table:
            table = self.materialize()
            if not torch.is_autocast_enabled(flat.device.type):
                table = table.to(flat.dtype)
            out = F.linear(flat, table)
        else:
            out = self._logits_through_cores(flat, cached)
        return out.view(*lead, self.num_embeddings)

    def _logits_through_table(self, flat: Tensor) -> Tensor:
        """``flat @ materialize().T`` at inference from the kept prefix products, the table
        built a cache-sized chunk of rows at a time (:func:`compemb.tt.math.logits_through_table`)."""
        return self._contract(flat, lambda cores, h, dtype: ttm.logits_through_table(
            cores, h, self.num_embeddings, prefix=self._logits_prefix(cores), dtype=dtype))

    def _prefix_cacheable(self) -> bool:
        """Inference: no gradient to the cores wanted, eager (not traced)."""
        return not ((torch.is_grad_enabled() and any(c.requires_grad for c in self.cores))
                    or torch.compiler.is_compiling()
                    or any(c.is_inference() for c in self.cores))

    def _logits_prefix(self, cores: List[Tensor]) -> Tensor:
        """:func:`compemb.tt.math.logits_prefix` of the cores, kept (a plain attribute, not in
        ``state_dict``) while every core is the same tensor at the same version."""
        key = tuple((c, c._version, c.data_ptr(), c.dtype) for c in self.cores)
        cached = self.__dict__.get("_prefix_cache")
        if cached is None or len(cached[0]) != len(key) or any(
                a[0] is not b[0] or a[1:] != b[1:] for a, b in zip(cached[0], key)):
            with torch.no_grad():
                cached = (key, ttm.logits_prefix(cores))
            self.__dict__["_prefix_cache"] = cached
        return cached[1]

    def _logits_through_cores(self, flat: Tensor, cached: bool = False) -> Tensor:
        return self._contract(flat, lambda cores, h, dtype: ttm.logits_through_cores(
            cores, h.to(cores[0].dtype), self.num_embeddings,
            prefix=self._logits_prefix(cores) if cached else None))

    def _contract(self, flat: Tensor, contraction: Callable[[List[Tensor], Tensor, torch.dtype],
                                                            Tensor]) -> Tensor:
        """``contraction(cores, flat, out_dtype) -> [B, V]`` with autocast off (the cores'
        products in their own dtype), the padding column zero, in the autocast dtype when
        autocast is on (else ``flat``'s)."""
        device_type = flat.device.type
        autocast = torch.is_autocast_enabled(device_type)
        out_dtype = torch.get_autocast_dtype(device_type) if autocast else flat.dtype
        with torch.autocast(device_type, enabled=False):
            out = contraction(self._cores(), flat, out_dtype)
            if self.padding_idx is not None:
                out = out.index_fill(1, torch.tensor([self.padding_idx], device=out.device), 0.0)
        return out.to(out_dtype)

    # ------------------------------------------------------------------ construction
    # (weight [V, J], shape, ranks) -> cores; set by each form (tt_svd / tr_svd)
    _decompose: Callable[[Tensor, ttm.Shape, Sequence[int]], List[Tensor]]

    @classmethod
    def from_dense(cls, weight: Tensor, rank: Rank, shape: ShapeArg = None,
                   num_factors: Optional[int] = None,
                   padding_idx: Optional[int] = None) -> "TensorNetworkEmbedding":
        """A layer whose cores approximate the trained table ``weight [V, J]`` (TT-SVD or
        TR-SVD, see ``_decompose``), on ``weight``'s device and in its dtype; the padding
        row is zeroed before the decomposition. With full ranks the table is reproduced to
        float error."""
        if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"weight must be a floating [num_embeddings, embedding_dim] tensor, "
                             f"got {getattr(weight, 'shape', type(weight).__name__)}")
        layer = cls(weight.shape[0], weight.shape[1], rank, shape=shape, num_factors=num_factors,
                    padding_idx=padding_idx)
        w = weight.detach().to(_compute_dtype(weight.dtype))
        if layer.padding_idx is not None:
            w = w.clone()
            w[layer.padding_idx] = 0
        cores = cls._decompose(w, layer.shape, layer.ranks)
        layer = layer.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for param, core in zip(layer.cores, cores):
                param.copy_(core)
        return layer

    def export(self) -> "TensorNetworkEmbedding":
        """The inference form: the layer itself (training and inference store the same
        cores)."""
        return self

    # ------------------------------------------------------------------ reporting, loading
    def storage(self) -> LayerStorage:
        params = sum(c.numel() for c in self.cores)
        size = self.cores[0].element_size()
        return LayerStorage(
            method=self.method, shape=ttm.shape_string(self.shape, self.ranks, self.ring),
            num_embeddings=self.num_embeddings, embedding_dim=self.embedding_dim,
            stored_parameters=params, stored_bytes=params * size,
            dense_bytes=self.num_embeddings * self.embedding_dim * size)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: Any,
                              strict: bool, missing_keys: list, unexpected_keys: list,
                              error_msgs: list) -> None:
        expected = {f"cores.{k}": tuple(c.shape) for k, c in enumerate(self.cores)}
        before = len(error_msgs)
        check_state_shapes(type(self).__name__, expected, state_dict, prefix, error_msgs)
        if len(error_msgs) > before:
            theirs = [tuple(state_dict[prefix + k].shape) for k in expected if prefix + k in state_dict]
            error_msgs.append(
                f"{type(self).__name__}: the checkpoint's cores {theirs} do not match this "
                f"layer's {list(expected.values())} ({ttm.shape_string(self.shape, self.ranks, self.ring)})")
            for key in expected:  # load none of this layer's cores rather than some
                state_dict.pop(prefix + key, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        s = (f"{self.num_embeddings}, {self.embedding_dim}, "
             f"{ttm.shape_string(self.shape, self.ranks, self.ring)}")
        return s + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")


def _check_padding_idx(padding_idx: Optional[int], num_embeddings: int) -> Optional[int]:
    if padding_idx is None:
        return None
    if not isinstance(padding_idx, int) or isinstance(padding_idx, bool) or not (
            -num_embeddings <= padding_idx < num_embeddings):
        raise ValueError(f"padding_idx must be None or an int in [-{num_embeddings}, "
                         f"{num_embeddings}) (num_embeddings={num_embeddings}), got {padding_idx!r}")
    return padding_idx % num_embeddings


class TTEmbedding(TensorNetworkEmbedding):
    """Tensor-Train embedding (Khrulkov et al., ICLR 2020): a ``V x J`` table stored as
    ``N`` cores, core ``k`` of shape ``(R[k], Ik, Jk, R[k+1])`` with ``R[0] = R[N] = 1``.

    Args:
        num_embeddings, embedding_dim: the table ``V x J``.
        rank: an int or the ``N-1`` inner ranks.
        shape: ``((I1..IN), (J1..JN))`` or ``None`` (automatic, see
            :func:`compemb.tt.math.choose_shape`).
        num_factors: ``N`` when ``shape`` is ``None`` (default 3); with a shape, leave it
            out or give the shape's ``N`` (another value is a ``ValueError``).
        padding_idx: a row that is always zero and gets no gradient.

    Attributes: ``cores`` (``nn.ParameterList``), ``shape``, ``ranks`` (the full tuple
    ``(1, R1, .., R_{N-1}, 1)``), ``config`` (:class:`TTConfig`).

    Init: paper eq. (2) for any ranks (:func:`compemb.tt.math.init_std`): the table has mean
    0 and variance ``2/(V+J)``; with ``init_std`` (the init rule of :mod:`compemb.init`)
    the cores are then scaled by one factor so that the table's std is ``init_std``.
    ``from_dense`` starts from a trained table by TT-SVD.
    """

    ring = False
    method = "tt"
    config_cls = TTConfig

    _decompose = staticmethod(ttm.tt_svd)
