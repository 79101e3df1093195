"""The inference form of a DPQ table: packed codes and the value codebooks."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_indices, check_state_shapes
from ..report import LayerStorage
from .kernels import (block_codes, block_codes_traceable, blocked_rows, check_codes_dtype,
                      logits_from_blocked, logits_from_codes)
from .math import (byte_lookup, byte_lookup_applies, byte_table, check_groups, code_bits,
                   codebook_index, pack_codes, unpack_rows)

__all__ = ["CodebookEmbedding", "table_logits"]


class CodebookEmbedding(nn.Module):
    """A ``V x d`` embedding table stored as DPQ codes and values (the exported,
    inference form of :class:`compemb.dpq.DPQEmbedding`).

    Row ``i`` is ``concat_g values[g, codes[i, g]]`` (``values[0, ...]`` for every group
    with a shared subspace).

    Args:
        codes: ``LongTensor [V, D]`` (any integer dtype), each in ``[0, Kc)``.
        values: ``[D, Kc, d/D]`` (one codebook per group) or ``[1, Kc, d/D]`` /
            ``[Kc, d/D]`` (one shared by all groups, when ``D > 1``).
        padding_idx: a row returned as zeros (as in ``nn.Embedding``).
        num_codes: ``Kc`` when it is larger than ``values.shape[-2]`` would say; default
            ``values.shape[-2]``.

    State: ``packed_codes`` (``uint8 [ceil(V*D*bits/8)]`` buffer, ``bits =
    ceil(log2(Kc))``, codes row-major, see :func:`compemb.dpq.math.pack_codes`) and
    ``values`` (a parameter). Packed is the stored format; at first use the codes are
    unpacked once (outside ``torch.compile`` / ``torch.export``) into the blocked layout of
    :mod:`compemb.dpq.kernels` (``uint8`` for ``Kc <= 256``, a plain attribute, not in
    ``state_dict``; rebuilt when ``packed_codes`` changes), from which lookups and logits
    read; codes out of range there (a checkpoint loaded by other means than
    ``load_state_dict``) raise ``ValueError``.
    """

    def __init__(self, codes: Tensor, values: Tensor, padding_idx: Optional[int] = None) -> None:
        super().__init__()
        if not isinstance(codes, Tensor) or codes.dim() != 2:
            raise ValueError(f"codes must be an integer tensor [num_embeddings, num_groups], "
                             f"got {getattr(codes, 'shape', type(codes).__name__)}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor (torch.long), got {codes.dtype}")
        if not isinstance(values, Tensor) or not values.dtype.is_floating_point:
            raise ValueError(f"values must be a floating-point tensor [num_groups, num_codes, "
                             f"embedding_dim // num_groups], got "
                             f"{getattr(values, 'dtype', type(values).__name__)}")
        if values.dim() == 2:
            values = values.unsqueeze(0)
        num_embeddings, num_groups = codes.shape
        if values.dim() != 3 or values.shape[0] not in (1, num_groups):
            raise ValueError(f"values must have shape [num_groups={num_groups}, num_codes, "
                             f"sub_dim] or [1, num_codes, sub_dim] (shared subspace), got "
                             f"{tuple(values.shape)}")
        num_codes = values.shape[1]
        if num_codes < 2:
            raise ValueError(f"values must hold num_codes >= 2 codebook rows, got {num_codes}")
        check_codes_dtype(codes.dtype, num_codes)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= num_codes):
            raise ValueError(f"codes must lie in [0, num_codes={num_codes}) (values has "
                             f"{num_codes} rows per group), got range "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        self._setup(num_embeddings, values.shape[2] * num_groups, num_codes, num_groups,
                    values.shape[0] == 1 and num_groups > 1, padding_idx)
        self.register_buffer("packed_codes", pack_codes(codes.to(values.device), self.bits))
        self.values = nn.Parameter(values.detach().clone())

    def _setup(self, num_embeddings: int, embedding_dim: int, num_codes: int, num_groups: int,
               shared_subspace: bool, padding_idx: Optional[int]) -> None:
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_codes = num_codes
        self.num_groups = num_groups
        self.shared_subspace = shared_subspace
        self.bits = code_bits(num_codes)
        self.padding_idx = _check_padding(padding_idx, num_embeddings)

    @classmethod
    def empty(cls, num_embeddings: int, embedding_dim: int, num_codes: int, num_groups: int,
              shared_subspace: bool = False, padding_idx: Optional[int] = None,
              dtype: torch.dtype = torch.float32, device=None) -> "CodebookEmbedding":
        """A zero table of the given shapes, to ``load_state_dict`` a checkpoint into."""
        if num_codes < 2:
            raise ValueError(f"num_codes must be >= 2, got {num_codes}")
        check_groups(embedding_dim, num_groups)
        groups = 1 if shared_subspace else num_groups
        values = torch.zeros(groups, num_codes, embedding_dim // num_groups, dtype=dtype,
                             device=device)
        codes = torch.zeros(num_embeddings, num_groups, dtype=torch.long, device=device)
        return cls(codes, values, padding_idx=padding_idx)

    # ------------------------------------------------------------------ table access

    def codes(self) -> Tensor:
        """``LongTensor [V, D]``: the unpacked codes."""
        rows = torch.arange(self.num_embeddings, device=self.packed_codes.device)
        return unpack_rows(self.packed_codes, self.bits, self.num_groups, rows).long()

    def blocked_codes(self) -> Optional[Tensor]:
        """The codes unpacked in the blocked layout (:func:`compemb.dpq.kernels.block_codes`,
        ``[ceil(V/16), D, 16]``), built at first use and kept (not in ``state_dict``) while
        ``packed_codes`` is unchanged; ``None`` inside ``torch.compile`` / ``torch.export``
        (the traced graph unpacks from ``packed_codes``)."""
        if torch.compiler.is_compiling():
            return None
        packed = self.packed_codes
        key = (packed, packed._version, packed.data_ptr(), packed.device)
        cached = self.__dict__.get("_blocked_cache")
        if cached is None or cached[0][0] is not packed or cached[0][1:] != key[1:]:
            blocked = block_codes(self.codes_unchecked(), self.num_codes)
            cached = (key, blocked)
            self.__dict__["_blocked_cache"] = cached  # a plain attribute: not in state_dict
        return cached[1]

    def codes_unchecked(self) -> Tensor:
        """``[V, D]`` codes straight from ``packed_codes`` (``uint8`` for 8-bit codes, a
        view; else ``int64``)."""
        rows = torch.arange(self.num_embeddings, device=self.packed_codes.device)
        return unpack_rows(self.packed_codes, self.bits, self.num_groups, rows)

    def forward(self, indices: Tensor) -> Tensor:
        """``LongTensor [...] -> [..., embedding_dim]`` (values' dtype)."""
        check_indices(indices, self.num_embeddings)
        if byte_lookup_applies(self.num_groups, self.bits):  # 1, 2, 4 bits: a row per byte
            table = self._byte_table()
            out = byte_lookup(self.packed_codes, table, self.num_groups, self.bits, indices)
            return self._mask_padding(out, indices)
        blocked = self.blocked_codes()
        if blocked is not None:  # unpacked once: no shifts per lookup
            return self._lookup(blocked_rows(blocked, indices), indices)
        codes = unpack_rows(self.packed_codes, self.bits, self.num_groups, indices)
        return self._lookup(codes, indices)

    def _byte_table(self) -> Tensor:
        """:func:`compemb.dpq.math.byte_table` of the values, kept between calls while
        no gradient is wanted (inference) and the values are unchanged (same tensor, no
        in-place change since: its version counter); rebuilt, differentiably, otherwise."""
        values = self.values
        if ((torch.is_grad_enabled() and values.requires_grad) or values.is_inference()
                or torch.compiler.is_compiling()):
            return byte_table(values, self.num_groups, self.bits)
        key = (values, values._version, values.data_ptr())
        cached = self.__dict__.get("_byte_table_cache")
        if cached is None or cached[0][0] is not values or cached[0][1:] != key[1:]:
            with torch.no_grad():
                cached = (key, byte_table(values, self.num_groups, self.bits))
            self.__dict__["_byte_table_cache"] = cached  # a plain attribute: not in state_dict
        return cached[1]

    def _lookup(self, codes: Tensor, indices: Tensor) -> Tensor:
        table = self.values.reshape(-1, self.values.shape[-1])
        rows = F.embedding(codebook_index(codes, self.num_codes, self.shared_subspace), table)
        return self._mask_padding(rows.reshape(*indices.shape, self.embedding_dim), indices)

    def _mask_padding(self, out: Tensor, indices: Tensor) -> Tensor:
        if self.padding_idx is not None:
            out = out.masked_fill((indices == self.padding_idx).unsqueeze(-1), 0)
        return out

    def materialize(self) -> Tensor:
        """The ``[V, d]`` table."""
        return self._lookup(self.codes(), torch.arange(self.num_embeddings,
                                                       device=self.packed_codes.device))

    def logits(self, hidden: Tensor) -> Tensor:
        """``hidden [..., d] -> [..., V]`` = ``hidden @ materialize().T``, by per-group
        products gathered by code (:func:`compemb.dpq.kernels.logits_from_blocked`; the
        ``V x d`` table is built only for many tokens at few dimensions per group).
        Computed in float32 under autocast.

        Eager on CPU at decode sizes the gather-sum runs in the native kernel of
        :mod:`compemb.dpq.kernels` over the blocked codes; for many tokens (or inside
        ``torch.compile``) a pure-PyTorch path gives the same numbers."""
        blocked = self.blocked_codes()
        if blocked is None:
            codes = block_codes_traceable(self.codes_unchecked(), self.num_codes)
        else:
            codes = blocked
        return _promoted_logits(hidden, self.values, self.padding_idx, self.embedding_dim,
                                lambda h, v: logits_from_blocked(h, v, codes,
                                                                 self.num_embeddings))

    # ------------------------------------------------------------------ bookkeeping

    def storage(self) -> LayerStorage:
        """Bytes as stored: packed codes plus values (ratio as in METHODS.md)."""
        value_bytes = self.values.numel() * self.values.element_size()
        shape = f"K={self.num_codes} D={self.num_groups} bits={self.bits}"
        if self.shared_subspace:
            shape += " shared"
        return LayerStorage(
            method="codebook", shape=shape, num_embeddings=self.num_embeddings,
            embedding_dim=self.embedding_dim, stored_parameters=self.values.numel(),
            stored_bytes=self.packed_codes.numel() + value_bytes,
            dense_bytes=self.num_embeddings * self.embedding_dim * self.values.element_size())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        expected = {"packed_codes": self.packed_codes.shape, "values": self.values.shape}
        before = len(error_msgs)
        check_state_shapes(type(self).__name__, expected, state_dict, prefix, error_msgs)
        packed = state_dict.get(prefix + "packed_codes")
        if packed is not None and len(error_msgs) == before:
            if packed.dtype != torch.uint8:
                error_msgs.append(f"{type(self).__name__}: {prefix}packed_codes has dtype "
                                  f"{packed.dtype} in the checkpoint, expected torch.uint8")
            elif self.num_codes < (1 << self.bits):
                rows = torch.arange(self.num_embeddings, device=packed.device)
                codes = unpack_rows(packed, self.bits, self.num_groups, rows)
                top = int(codes.max()) if codes.numel() else 0
                if top >= self.num_codes:
                    error_msgs.append(f"{type(self).__name__}: {prefix}packed_codes holds code "
                                      f"{top}, out of range for num_codes={self.num_codes}")
        if len(error_msgs) > before:
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        s = (f"{self.num_embeddings}, {self.embedding_dim}, num_codes={self.num_codes}, "
             f"num_groups={self.num_groups}, bits={self.bits}")
        if self.shared_subspace:
            s += ", shared_subspace=True"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s


def table_logits(hidden: Tensor, values: Tensor, codes: Tensor,
                 padding_idx: Optional[int] = None) -> Tensor:
    """``hidden [..., d] -> [..., V]`` for the table of ``values [G, Kc, s]`` and
    ``codes [V, D]`` (padding column zero), in float32 at least (also under autocast),
    by :func:`compemb.dpq.kernels.logits_from_codes` (the codes' blocked layout is kept
    between calls with the same ``codes`` tensor)."""
    embedding_dim = codes.shape[1] * values.shape[-1]
    return _promoted_logits(hidden, values, padding_idx, embedding_dim,
                            lambda h, v: logits_from_codes(h, v, codes))


def _promoted_logits(hidden: Tensor, values: Tensor, padding_idx: Optional[int],
                     embedding_dim: int, compute) -> Tensor:
    """``compute(hidden [M, d], values)`` in at least float32 with autocast off, the
    padding column zeroed, reshaped to ``hidden``'s leading dims."""
    if hidden.shape[-1] != embedding_dim:
        raise ValueError(f"hidden has last dimension {hidden.shape[-1]}, expected "
                         f"embedding_dim={embedding_dim}")
    lead = hidden.shape[:-1]
    dtype = torch.promote_types(torch.promote_types(hidden.dtype, values.dtype), torch.float32)
    with torch.autocast(hidden.device.type, enabled=False):
        out = compute(hidden.reshape(-1, embedding_dim).to(dtype), values.to(dtype))
        if padding_idx is not None:
            out = out.index_fill(1, torch.tensor([padding_idx], device=out.device), 0.0)
    return out.reshape(*lead, out.shape[-1])


def _check_padding(padding_idx: Optional[int], num_embeddings: int) -> Optional[int]:
    """``padding_idx`` normalised to ``[0, V)`` as ``nn.Embedding`` does."""
    if padding_idx is None:
        return None
    if not isinstance(padding_idx, int) or isinstance(padding_idx, bool) or not (
            -num_embeddings <= padding_idx < num_embeddings):
        raise ValueError(f"padding_idx must be an integer in [-{num_embeddings}, "
                         f"{num_embeddings}) or None, got {padding_idx!r}")
    return padding_idx % num_embeddings
