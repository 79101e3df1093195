"""DPQEmbedding: an embedding table trained end to end as discrete codes (DPQ-SX/VQ)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_indices, check_state_shapes
from ..report import LayerStorage
from .codebook import CodebookEmbedding, _check_padding, table_logits
from ..init import check_init_std
from .config import DPQConfig
from .math import (check_groups, code_bits, codebook_index, codebook_storage_bytes,
                   distributed_world_size, kmeans, all_reduce_, batch_moments,
                   normalize_scores, update_running_stats)

__all__ = ["DPQEmbedding"]

#: Weight of the VQ codebook (centroid) term ``mean ||stopgrad(q) - V[c]||^2`` whose
#: gradient the layer injects in backward (the reference code's alpha = 1).
CODEBOOK_LOSS_WEIGHT = 1.0


class DPQEmbedding(nn.Module):
    """Differentiable Product Quantization embedding (METHODS.md; Chen et al., ICML 2020).

    A query table ``Q [V, d]`` is split into ``D = num_groups`` groups of ``s = d/D``.
    Group ``g`` has keys ``K_g`` and values ``V_g`` (``Kc x s``; one pair for all groups
    with ``shared_subspace``). The code of symbol ``i`` in group ``g`` is the argmax over
    ``k`` of a score, and the output row is ``concat_g V_g[code]``:

    * ``variant="sx"``: score ``q_ig . K_gk``; straight-through: the forward is exactly
      the codebook row, the backward that of ``softmax(score / temperature) @ V_g``
      (gradients reach query, keys and values).
    * ``variant="vq"``: score ``-||q_ig - V_gk||^2`` (keys are the values); the output is
      ``V[c]`` in value and passes its gradient to ``q`` unchanged (``q + stopgrad(V[c] -
      q)``). The codebook loss ``CODEBOOK_LOSS_WEIGHT * mean ||stopgrad(q) - V[c]||^2``
      (weight 1, the reference's) plus ``commitment * mean ||q - stopgrad(V[c])||^2``
      (means over the batch's non-padding tokens and the ``d`` dims) is added by the
      layer itself: its gradient is injected in the backward pass of the output, so a
      plain ``loss.backward()`` (or any trainer) updates the codebook. Its last value is
      kept (detached) in ``self.codebook_loss`` for logging.

    With ``distance_norm`` the scores are batch-normalised per (group, code) over the
    mini-batch's tokens (no scale, no shift) in training, with running statistics
    (``running_mean``, ``running_var`` buffers ``[D, Kc]``, momentum 0.1 as in
    ``nn.BatchNorm``, saved in ``state_dict``) in eval.

    Several processes (``torch.distributed``): with ``sync_statistics=True`` (default) and
    a ``process_group`` (default ``None``: the default group, all processes) of more than
    one process, the batch statistics are all-reduced over that group, and so are the
    matching gradient sums in backward (as ``nn.SyncBatchNorm`` does), and the VQ token
    count: every process normalises by the group's batch and DDP training matches one
    process on the whole batch. These all-reduces are collectives: they run in every
    training-mode forward with autograd or not (``distance_norm``: the scores'
    statistics; ``"vq"``: the token count), and in the backward of an SX forward with
    ``distance_norm``; every process of the group must make the same calls, or the ones
    that do wait for ever. Eval forwards, ``codes()``, ``export()``, and ``logits()`` /
    ``materialize()`` (which use the running statistics) never all-reduce. For a forward
    that only some processes run (rank-0-only evaluation in training mode, uneven loops,
    independent runs per process) pass ``sync_statistics=False`` (each process uses its
    own batch), or a ``process_group`` of the processes that run it (model-parallel
    subgroups: the data-parallel group of this table's replicas). Both are attributes and
    may be changed between forwards. A pickled layer keeps no process group (``None``);
    a deep copy shares the original's.

    Memory: the ``[U, D, Kc]`` scores are handled a few groups at a time and recomputed
    in the backward pass rather than stored, so training keeps ``O(U*d)`` per batch
    beyond the parameters.

    In eval the output is ``values`` gathered by the codes: exactly what
    :meth:`export` 's :class:`CodebookEmbedding` returns. On CPU (outside
    ``torch.compile``) codes are computed once per distinct id of the batch.

    Shapes: ``forward(LongTensor [...]) -> [..., d]`` in the values' dtype (scores are
    computed in float32, also under autocast).
    """

    momentum = 0.1
    eps = 1e-5

    def __init__(self, num_embeddings: int, embedding_dim: int, num_codes: int, num_groups: int,
                 variant: str = "sx", shared_subspace: bool = False, distance_norm: bool = True,
                 temperature: float = 1.0, commitment: float = 0.0,
                 padding_idx: Optional[int] = None, *, process_group: Any = None,
                 sync_statistics: bool = True, init_std: Optional[float] = None) -> None:
        super().__init__()
        check_init_std(init_std)
        if not isinstance(sync_statistics, bool):
            raise ValueError(f"sync_statistics must be True (all-reduce the batch statistics "
                             f"over process_group) or False (each process its own), got "
                             f"{sync_statistics!r}")
        self.sync_statistics = sync_statistics
        self.process_group = process_group
        self.config = DPQConfig(num_codes=num_codes, num_groups=num_groups, variant=variant,
                                shared_subspace=shared_subspace, distance_norm=distance_norm,
                                temperature=temperature, commitment=commitment)
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_groups(embedding_dim, num_groups)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_codes = num_codes
        self.num_groups = num_groups
        self.variant = variant
        self.shared_subspace = shared_subspace
        self.padding_idx = _check_padding(padding_idx, num_embeddings)
        sub = embedding_dim // num_groups
        books = 1 if shared_subspace else num_groups
        self.query = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        self.values = nn.Parameter(torch.empty(books, num_codes, sub))
        if variant == "sx":
            self.key_weight = nn.Parameter(torch.empty(books, num_codes, sub))
        else:
            self.register_parameter("key_weight", None)
        if distance_norm:
            self.register_buffer("running_mean", torch.zeros(num_groups, num_codes))
            self.register_buffer("running_var", torch.ones(num_groups, num_codes))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
        self.codebook_loss: Optional[Tensor] = None
        self.reset_parameters()
        # (a second draw after the N(0, 1) one: the random stream the entry points drew
        # before the rule was in the core; none when N(0, 1) is the host's scale too)
        if init_std is not None and init_std != 1.0:
            self.reset_parameters(std=init_std)

    def reset_parameters(self, std: float = 1.0) -> None:
        """Query, keys and values ~ N(0, std^2) (``std=1`` as ``nn.Embedding``); running
        stats reset. The init rule (:mod:`compemb.init`): hosts pass the std they give their
        own dense tables (fairseq: ``dim**-0.5``, Transformer-XL: ``init_std``, transformers:
        the replaced table's); a common scale leaves the codes as they are and gives output
        rows of that std."""
        check_init_std(std, "std")
        with torch.no_grad():
            nn.init.normal_(self.query, std=std)
            nn.init.normal_(self.values, std=std)
            if self.key_weight is not None:
                nn.init.normal_(self.key_weight, std=std)
            if self.padding_idx is not None:
                self.query[self.padding_idx].zero_()
            if self.running_mean is not None:
                self.running_mean.zero_()
                self.running_var.fill_(1)

    # ------------------------------------------------------------------ processes

    @property
    def process_group(self) -> Any:
        """The ``torch.distributed`` group the training statistics are all-reduced over
        (``None``: the default group)."""
        return self.__dict__["_process_group"].group

    @process_group.setter
    def process_group(self, group: Any) -> None:
        self.__dict__["_process_group"] = _GroupRef(group)

    def _synced(self) -> bool:
        """Whether this layer's training statistics are all-reduced now (see the class
        docstring): ``sync_statistics`` and more than one process in ``process_group``."""
        return self.sync_statistics and distributed_world_size(self.process_group) > 1

    @property
    def keys(self) -> Tensor:
        """``[G, Kc, s]`` keys (the values themselves for ``"vq"``)."""
        return self.values if self.key_weight is None else self.key_weight

    # ------------------------------------------------------------------ core

    @torch.no_grad()
    def _codes_of(self, q: Tensor, weights: Optional[Tensor], training: bool) -> Tensor:
        """Codes ``[D, U]`` of queries ``q [D, U, s]`` (float32), without autograd: the
        argmax of the (normalised) scores, a few groups at a time; in training also
        updates the running statistics."""
        keys = self.keys.detach().float()
        sync = training and self._synced()
        codes = q.new_empty(q.shape[0], q.shape[1], dtype=torch.long)
        for c in _group_chunks(q.shape[0], q.shape[1], self.num_codes, sync, q.device):
            k = keys if keys.shape[0] == 1 else keys[c]
            if self.variant == "sx":
                scores = torch.matmul(q[c], k.transpose(1, 2))  # [Dc, U, Kc]
            else:  # -||q - k||^2 = 2 q.k - |q|^2 - |k|^2
                scores = torch.matmul(q[c], k.transpose(1, 2)).mul_(2)
                scores.sub_((q[c] * q[c]).sum(-1, keepdim=True)).sub_(
                    (k * k).sum(-1).unsqueeze(1))
            if self.running_mean is not None:  # (views: the update lands in the buffers)
                scores = normalize_scores(scores, weights, self.running_mean[c],
                                          self.running_var[c], training, self.momentum,
                                          self.eps, sync, self.process_group)
            codes[c] = scores.argmax(-1)
        return codes

    def _gather(self, codes: Tensor) -> Tensor:
        """``codes [U, D] -> [U, D, s]`` value rows."""
        table = self.values.reshape(-1, self.values.shape[-1])
        return F.embedding(codebook_index(codes, self.num_codes, self.shared_subspace), table)

    def _rows(self, ids: Tensor, weights: Tensor, training: bool,
              batch_stats: Optional[bool] = None) -> Tensor:
        """Output rows ``[U, d]`` for symbols ``ids [U]`` standing for ``weights [U]``
        tokens each. ``training``: straight-through gradients (and the VQ codebook loss);
        ``batch_stats`` (default: ``training``): distance normalisation by this batch's
        statistics, updating the running ones, instead of by the running ones."""
        batch_stats = training if batch_stats is None else batch_stats
        sub = self.embedding_dim // self.num_groups
        q = self.query[ids].view(ids.shape[0], self.num_groups, sub)  # [U, D, s]
        with torch.autocast(ids.device.type, enabled=False):
            qg = q.float().transpose(0, 1)  # [D, U, s]
            if training and self.variant == "sx" and torch.is_grad_enabled():
                codes, zero = _SXStraightThrough.apply(
                    qg, self.keys.float(), self.values.detach().float(), weights, self,
                    batch_stats)
                hard = self._gather(codes.t())  # [U, D, s], exactly the codebook rows
                # value: hard (+0); gradient to query and keys: that of softmax(y/tau) @ V
                out = hard + zero.transpose(0, 1).to(hard.dtype)
            else:
                hard = self._gather(self._codes_of(qg.detach(), weights, batch_stats).t())
                out = hard
                if training and self.variant == "vq":
                    count = weights.detach().sum()
                    if self._synced():  # the mean over the group's batch, as one process takes
                        group = self.process_group
                        count = all_reduce_(count, group) / distributed_world_size(group)
                    out, loss = _VQStraightThrough.apply(q, hard, weights, count,
                                                         CODEBOOK_LOSS_WEIGHT,
                                                         float(self.config.commitment))
                    self.codebook_loss = loss.detach()
        return out.reshape(ids.shape[0], self.embedding_dim)

    def forward(self, indices: Tensor) -> Tensor:
        """``LongTensor [...] -> [..., embedding_dim]``."""
        _refuse_export(self)
        check_indices(indices, self.num_embeddings)
        flat = indices.reshape(-1).long()
        keep = (flat != self.padding_idx) if self.padding_idx is not None else None
        if self._dedup(flat):
            ids, inverse = torch.unique(flat, return_inverse=True)
            if keep is None:
                weights = torch.bincount(inverse, minlength=ids.numel())
            else:
                weights = torch.bincount(inverse, weights=keep.float(), minlength=ids.numel())
        else:
            ids, inverse = flat, None
            weights = keep if keep is not None else torch.ones_like(flat)
        rows = self._rows(ids, weights.float(), self.training)
        out = rows if inverse is None else rows[inverse]
        if keep is not None:
            out = out * keep.unsqueeze(1).to(out.dtype)
        return out.view(*indices.shape, self.embedding_dim)

    @staticmethod
    def _dedup(flat: Tensor) -> bool:
        """Compute once per distinct id: on CPU (a sort is cheap next to the scores); not
        on CUDA (``unique`` would sync the host) nor inside ``torch.compile``."""
        return flat.device.type == "cpu" and flat.numel() > 1 and not torch.compiler.is_compiling()

    # ------------------------------------------------------------------ inference form

    @torch.no_grad()
    def codes(self, chunk: int = 8192) -> Tensor:
        """``LongTensor [V, D]``: each symbol's codes as in eval (running statistics).

        In eval mode the result is cached (a plain attribute, not in ``state_dict``) and
        returned again while the tensors it depends on (query, keys, running statistics)
        are the same tensors with no change since (their ``_version`` counters and data
        pointers: an optimizer step, ``copy_``, ``.to()`` or ``load_state_dict`` all
        invalidate it); ``train()`` and ``load_state_dict`` drop it. So eval
        :meth:`logits` / :meth:`materialize` cost what the exported form's do. Not
        cached in training mode, under ``torch.compile`` or for inference tensors. Do
        not modify the returned tensor in place."""
        key = self._codes_key()
        cached = self.__dict__.get("_codes_cache")
        if key is not None and cached is not None and _same_key(cached[0], key):
            return cached[1]
        codes = self._compute_codes(chunk)
        if key is not None:
            self.__dict__["_codes_cache"] = (key, codes)
        return codes

    def _codes_key(self) -> Optional[tuple]:
        """What the eval codes depend on, as ``(tensor, _version, data_ptr)`` triples;
        ``None`` where no cache is kept (training, compiling, inference tensors)."""
        if self.training or torch.compiler.is_compiling():
            return None
        tensors = [self.query, self.keys]
        if self.running_mean is not None:
            tensors += [self.running_mean, self.running_var]
        if any(t.is_inference() for t in tensors):
            return None
        return tuple((t, t._version, t.data_ptr()) for t in tensors)

    def clear_codes_cache(self) -> None:
        """Drop the cached eval codes (:meth:`codes`); done by ``train()`` and
        ``load_state_dict``, and needed by hand only after a change that bypasses
        autograd's version counters (writing through ``.data`` or another framework)."""
        self.__dict__.pop("_codes_cache", None)

    def train(self, mode: bool = True) -> "DPQEmbedding":
        self.clear_codes_cache()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(), .cuda() ...
        self.clear_codes_cache()
        return super()._apply(fn, recurse)

    def _compute_codes(self, chunk: int) -> Tensor:
        out = []
        for start in range(0, self.num_embeddings, chunk):
            ids = torch.arange(start, min(start + chunk, self.num_embeddings),
                               device=self.query.device)
            q = self.query[ids].view(ids.numel(), self.num_groups, -1)
            with torch.autocast(ids.device.type, enabled=False):
                out.append(self._codes_of(q.float().transpose(0, 1), None, False).t())
        return torch.cat(out)

    def export(self) -> CodebookEmbedding:
        """The inference form: packed codes and a copy of the values; its forward equals
        this layer's eval forward exactly."""
        return CodebookEmbedding(self.codes(), self.values.detach().clone(),
                                 padding_idx=self.padding_idx)

    def materialize(self) -> Tensor:
        """The ``[V, d]`` table the eval forward reads from (rows of the codebooks).

        In training with autograd on (the table of a softmax being trained, e.g. by
        :meth:`logits` or an adaptive softmax) the same rows come from the training path:
        the codes are those of eval (distance normalisation by the running statistics,
        which this leaves as they are), and the gradient reaches the queries and keys as
        in :meth:`forward` (SX straight-through; VQ: straight-through to the queries and
        the codebook loss over the ``V`` rows to the values), not only the values."""
        ids = torch.arange(self.num_embeddings, device=self.query.device)
        keep = (ids != self.padding_idx) if self.padding_idx is not None else None
        if self.training and torch.is_grad_enabled():
            weights = keep.float() if keep is not None else torch.ones(ids.shape, device=ids.device)
            out = self._rows(ids, weights, training=True, batch_stats=False)
        else:
            out = self._gather(self.codes()).reshape(self.num_embeddings, self.embedding_dim)
        return out if keep is None else out * keep.unsqueeze(1).to(out.dtype)

    def logits(self, hidden: Tensor) -> Tensor:
        """``hidden [..., d] -> [..., V]``: scores against every symbol's row.

        In training with autograd on: ``hidden @ materialize().T``, one GEMM with the
        training-path table (see :meth:`materialize`: the gradient reaches the queries and
        keys too). Otherwise (eval, ``torch.no_grad``): per-group products gathered by
        code (see :meth:`CodebookEmbedding.logits`), never building ``V x d``. Both in
        float32 at least (also under autocast), with the same values."""
        _refuse_export(self)
        if not (self.training and torch.is_grad_enabled()):
            return table_logits(hidden, self.values, self.codes(), self.padding_idx)
        if hidden.shape[-1] != self.embedding_dim:
            raise ValueError(f"hidden has last dimension {hidden.shape[-1]}, expected "
                             f"embedding_dim={self.embedding_dim}")
        table = self.materialize()
        dtype = torch.promote_types(torch.promote_types(hidden.dtype, table.dtype), torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            return F.linear(hidden.to(dtype), table.to(dtype))

    def storage(self) -> LayerStorage:
        """What the exported inference form stores (codes at ``ceil(log2(Kc))`` bits,
        values at their dtype): ratio ``32*V*d / (V*D*log2(Kc) + 32*Kc*d)`` in float32."""
        size = self.values.element_size()
        code_bytes, value_bytes = codebook_storage_bytes(
            self.num_embeddings, self.embedding_dim, self.num_codes, self.num_groups,
            self.shared_subspace, size)
        shape = f"K={self.num_codes} D={self.num_groups} bits={code_bits(self.num_codes)}"
        if self.shared_subspace:
            shape += " shared"
        return LayerStorage(
            method=f"dpq-{self.variant}", shape=shape, num_embeddings=self.num_embeddings,
            embedding_dim=self.embedding_dim, stored_parameters=self.values.numel(),
            stored_bytes=code_bytes + value_bytes,
            dense_bytes=self.num_embeddings * self.embedding_dim * size)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dense(cls, weight: Tensor, num_codes: int, num_groups: int, variant: str = "sx",
                   shared_subspace: bool = False, distance_norm: bool = True,
                   temperature: float = 1.0, commitment: float = 0.0,
                   padding_idx: Optional[int] = None, iters: int = 25, init: str = "kmeans++",
                   generator: Optional[torch.Generator] = None) -> "DPQEmbedding":
        """Start from a trained table ``weight [V, d]``: the query table is ``weight``;
        keys and values are k-means centroids of each group's sub-vectors (of all
        groups' sub-vectors pooled with ``shared_subspace``), padding row excluded.

        The running statistics are set so that the eval codes are the nearest centroids
        (the k-means assignment): for ``"sx"`` with ``distance_norm`` the running mean of
        code ``k`` is ``||K_k||^2 / 2``, which turns the dot-product argmax into the
        nearest-centroid one; ``"sx"`` without it picks the largest dot product.

        The layer is on ``weight``'s device, its parameters (query, keys, values) in
        ``weight``'s dtype (k-means runs in float32); the running statistics stay float32
        (scores are normalised in float32)."""
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a [num_embeddings, embedding_dim] tensor, got "
                             f"{getattr(weight, 'shape', type(weight).__name__)}")
        num_embeddings, embedding_dim = weight.shape
        layer = cls(num_embeddings, embedding_dim, num_codes, num_groups, variant=variant,
                    shared_subspace=shared_subspace, distance_norm=distance_norm,
                    temperature=temperature, commitment=commitment, padding_idx=padding_idx)
        layer = layer.to(weight.device)
        w = weight.detach().float()
        rows = w if layer.padding_idx is None else torch.cat(
            [w[:layer.padding_idx], w[layer.padding_idx + 1:]])
        sub = embedding_dim // num_groups
        points = rows.reshape(-1, num_groups, sub).transpose(0, 1)  # [D, V, s]
        if shared_subspace:
            points = points.reshape(1, -1, sub)
        centroids, _ = kmeans(points, num_codes, iters=iters, init=init, generator=generator)
        with torch.no_grad():
            layer.query.copy_(weight.detach())
            layer.values.copy_(centroids)
            if layer.key_weight is not None:
                layer.key_weight.copy_(centroids)
            if layer.running_mean is not None:
                layer.running_var.fill_(1)
                if variant == "sx":
                    layer.running_mean.copy_(0.5 * (centroids * centroids).sum(-1).expand(
                        num_groups, num_codes))
                else:
                    layer.running_mean.zero_()
        if weight.is_floating_point() and weight.dtype != layer.query.dtype:
            for param in layer.parameters():
                param.data = param.data.to(weight.dtype)
        return layer

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        expected = {name: t.shape for name, t in list(self.named_parameters(recurse=False))
                    + list(self.named_buffers(recurse=False))}
        before = len(error_msgs)
        check_state_shapes(type(self).__name__, expected, state_dict, prefix, error_msgs)
        if len(error_msgs) > before:
            return
        self.clear_codes_cache()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        c = self.config
        s = (f"{self.num_embeddings}, {self.embedding_dim}, num_codes={c.num_codes}, "
             f"num_groups={c.num_groups}, variant={c.variant!r}")
        if c.shared_subspace:
            s += ", shared_subspace=True"
        if not c.distance_norm:
            s += ", distance_norm=False"
        if c.variant == "sx" and c.temperature != 1.0:
            s += f", temperature={c.temperature}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s


class _GroupRef:
    """Holds a layer's process group: shared by deep copies (a group cannot be copied),
    ``None`` once pickled (a group belongs to one process)."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __deepcopy__(self, memo: dict) -> "_GroupRef":
        return self

    def __reduce__(self):
        return (_GroupRef, (None,))


def _same_key(a: tuple, b: tuple) -> bool:
    """Two :meth:`DPQEmbedding._codes_key` values name the same unchanged tensors."""
    return len(a) == len(b) and all(x[0] is y[0] and x[1:] == y[1:] for x, y in zip(a, b))


def _refuse_export(layer: "DPQEmbedding") -> None:
    """``ValueError`` under ``torch.export``: the training form computes its codes from the
    queries on every call; the inference form stores them."""
    if torch.compiler.is_exporting():
        raise ValueError(
            f"{type(layer).__name__} (the DPQ training form) cannot be exported: export its "
            f"inference form, layer.export() (a CodebookEmbedding), or for a transformers model "
            f"call compemb_hf.export_codebooks(model) or compress with form='codebook' first")




def _group_chunks(num_groups: int, rows: int, num_codes: int, sync: bool,
                  device: torch.device) -> list:
    """Slices of groups processed together, so that a ``[groups, rows, Kc]`` block of
    scores stays near ``_CHUNK_ELEMENTS`` (cache-sized) on CPU, or a larger block on
    accelerators (fewer kernel launches). One block when synchronised (every process
    must make the same collective calls, whatever its row count)."""
    if sync:
        return [slice(0, num_groups)]
    budget = _CHUNK_ELEMENTS if device.type == "cpu" else _CHUNK_ELEMENTS_GPU
    step = max(1, budget // max(1, rows * num_codes))
    return [slice(i, min(i + step, num_groups)) for i in range(0, num_groups, step)]


_CHUNK_ELEMENTS = 1 << 20
_CHUNK_ELEMENTS_GPU = 1 << 24


class _SXStraightThrough(torch.autograd.Function):
    """DPQ-SX codes with the softmax straight-through gradient, forward and backward
    written out, a few groups at a time (cache-sized blocks; the scores are recomputed
    in backward rather than kept: memory ``O(U*d)``, not ``O(U*D*Kc)``).

    ``(q [D, U, s], keys [G, Kc, s], values [G, Kc, s] (detached), weights [U], layer)
    -> (codes [D, U], zero [D, U, s])``. With ``x = q . keys`` and ``y`` its distance
    normalisation (batch statistics, weighted by ``weights``; all-reduced under
    torch.distributed), ``codes = argmax y``; ``zero`` is 0 in value, and its backward is
    that of ``softmax(y / tau) @ values``: given ``G`` (gradient of the output rows),
    ``gp = G @ values^T``, ``gy = p * (gp - sum_k p gp) / tau``,
    ``gx = r * (gy - (w/n) * (sum_u gy + y * sum_u gy*y))`` (batch-norm backward with
    ``r = 1/sqrt(var + eps)``, ``n`` the token count; sums all-reduced when synced),
    ``grad q = gx @ keys``, ``grad keys = gx^T @ q``."""

    @staticmethod
    def forward(ctx, q, keys, values, weights, layer, batch_stats=True):
        norm = layer.running_mean is not None
        fixed = norm and not batch_stats  # normalise by the running statistics, as eval does
        sync = layer._synced() and not fixed
        group = layer.process_group
        num_groups, rows = q.shape[0], q.shape[1]
        codes = q.new_empty(num_groups, rows, dtype=torch.long)
        means, rstds, variances = [], [], []
        count = weights.sum()
        if fixed:
            means = [layer.running_mean.float()]
            rstds = [torch.rsqrt(layer.running_var.float() + layer.eps)]
        for c in _group_chunks(num_groups, rows, keys.shape[1], sync, q.device):
            x = torch.matmul(q[c], _books(keys, c).transpose(1, 2))  # [Dc, U, Kc]
            if fixed:
                x.sub_(means[0][c].unsqueeze(1)).mul_(rstds[0][c].unsqueeze(1))
            elif norm:
                mean, var, count = batch_moments(x, weights, sync, group)
                rstd = torch.rsqrt(var + layer.eps)
                x.sub_(mean.unsqueeze(1)).mul_(rstd.unsqueeze(1))
                means.append(mean), variances.append(var), rstds.append(rstd)
            codes[c] = x.argmax(-1)
        if norm:
            mean, rstd = torch.cat(means), torch.cat(rstds)
            if not fixed:
                update_running_stats(layer.running_mean, layer.running_var, mean,
                                     torch.cat(variances), count, layer.momentum)
        else:
            mean = rstd = q.new_zeros(0)
        ctx.save_for_backward(q, keys, values, weights, mean, rstd, count)
        ctx.tau, ctx.sync, ctx.norm, ctx.fixed = layer.config.temperature, sync, norm, fixed
        ctx.group = group
        ctx.mark_non_differentiable(codes)
        return codes, q.new_zeros(num_groups, rows, values.shape[2])

    @staticmethod
    def backward(ctx, _grad_codes, grad):
        q, keys, values, weights, mean, rstd, count = ctx.saved_tensors
        grad = grad.float()
        grad_q = torch.empty_like(q)
        grad_keys = torch.zeros_like(keys)
        scale = (weights / count.clamp_min(1)).view(1, -1, 1)
        for c in _group_chunks(q.shape[0], q.shape[1], keys.shape[1], ctx.sync, q.device):
            k = _books(keys, c)
            y = torch.matmul(q[c], k.transpose(1, 2))  # [Dc, U, Kc], recomputed
            if ctx.norm:
                y.sub_(mean[c].unsqueeze(1)).mul_(rstd[c].unsqueeze(1))
            g = torch.matmul(grad[c], _books(values, c).transpose(1, 2))  # [Dc, U, Kc]
            p = torch.softmax(y if ctx.tau == 1 else y / ctx.tau, dim=-1)
            gy = g.sub_((p * g).sum(-1, keepdim=True)).mul_(p)
            if ctx.tau != 1:
                gy.mul_(1.0 / ctx.tau)
            if ctx.fixed:  # constant statistics: only the scale
                gx = gy.mul_(rstd[c].unsqueeze(1))
            elif ctx.norm:
                sums = torch.stack([gy.sum(1), (gy * y).sum(1)])  # [2, Dc, Kc]
                if ctx.sync:
                    all_reduce_(sums, ctx.group)
                y.mul_(sums[1].unsqueeze(1)).add_(sums[0].unsqueeze(1)).mul_(scale)
                gx = gy.sub_(y).mul_(rstd[c].unsqueeze(1))
            else:
                gx = gy
            grad_q[c] = torch.matmul(gx, k)  # [Dc, U, s]
            gk = torch.matmul(gx.transpose(1, 2), q[c])  # [Dc, Kc, s]
            if keys.shape[0] == 1:
                grad_keys += gk.sum(0, keepdim=True)
            else:
                grad_keys[c] = gk
        return grad_q, grad_keys, None, None, None, None


def _books(books: Tensor, groups: slice) -> Tensor:
    """The codebooks ``[G, Kc, s]`` of a slice of groups (the single one when shared)."""
    return books if books.shape[0] == 1 else books[groups]


class _VQStraightThrough(torch.autograd.Function):
    """``(q [U, D, s], vc [U, D, s], weights [U]) -> (vc, loss)``: the value is the
    codebook rows ``vc``; backward passes the output gradient to ``q`` unchanged
    (straight-through) and adds the gradient of the codebook loss
    ``alpha * sum_u w_u ||vc_u - stopgrad(q_u)||^2 / (n*d) + beta * sum_u w_u ||q_u -
    stopgrad(vc_u)||^2 / (n*d)`` to ``vc`` (hence to the values) and ``q``; ``n`` =
    ``count``, the tokens of the batch (per process, on average, under DDP, whose
    gradient averaging then gives the mean over the global batch)."""

    @staticmethod
    def forward(ctx, q, vc, weights, count, alpha, beta):
        diff = vc.float() - q.float()  # [U, D, s]
        w = weights.float().view(-1, 1, 1)
        scale = 1.0 / (count.float().clamp_min(1) * diff.shape[1] * diff.shape[2])
        ctx.save_for_backward(diff, w, scale)
        ctx.alpha, ctx.beta = alpha, beta
        ctx.dtypes = (q.dtype, vc.dtype)
        loss = (alpha + beta) * (diff * diff * w).sum() * scale
        ctx.mark_non_differentiable(loss)
        return vc.clone(), loss.detach()

    @staticmethod
    def backward(ctx, grad_out, _grad_loss):
        diff, w, scale = ctx.saved_tensors
        g = 2 * diff * w * scale
        grad_q = grad_out.float() - ctx.beta * g
        grad_vc = ctx.alpha * g
        return grad_q.to(ctx.dtypes[0]), grad_vc.to(ctx.dtypes[1]), None, None, None, None
