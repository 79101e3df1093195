"""Residual rows: more bits for the rows that matter most (graded mixed allocation).

A compressed base (DPQ codes, TT cores) gives every row the same number of bits. The
error a row costs the model grows with its token weight ``w_i`` (how often it is used),
so at a fixed byte budget the weighted error ``sum_i w_i ||e_i||^2`` is smallest when a
row's bits grow with ``log2(w_i)`` (reverse water-filling: each extra bit per dimension
divides a row's error by about 4). On SmolLM2's table the weights' arithmetic / geometric
mean is 1.8-2.1, the most such an allocation can gain at high rate.

So a fitted table can carry, for some rows, the base's residual ``r_i = x_i - base_i``
rounded to ``b_i`` bits per dimension (symmetric uniform levels, one scale per row):
:func:`allocate_bits` picks every ``b_i`` (0 = none) from the measured errors to minimise
the weighted error within a byte budget (a Lagrangian over the allowed widths), and
:class:`ResidualRows` stores them bit-packed, one group of rows per width. Exact rows
(``compemb.fit.layer``) are the 32-bit end of the same idea, at 4-16x the bytes of a
residual row.

Shapes: ``V`` rows, ``d`` = embedding dim, ``N`` rows with a residual.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..dpq.kernels import int8_row_dots
from ..dpq.math import pack_codes, packed_num_bytes, unpack_codes
from .slots import cached_per_state, slot_map

__all__ = ["RESIDUAL_BITS", "quantize_rows", "dequantize_rows", "residual_row_bytes",
           "allocate_bits", "ResidualRows"]

#: Widths (bits per dimension) a residual row may have.
RESIDUAL_BITS: Tuple[int, ...] = (2, 3, 4, 5, 6, 8)
#: Scales tried for a row, as fractions of ``max |r| / (2**(b-1) - 0.5)`` (the best is kept:
#: clipping the few largest entries lowers the error of a near-Gaussian residual).
_SCALE_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: Bytes of one residual row's id.
_ID_BYTES = 4


def _check_bits(bits: int) -> None:
    if not (isinstance(bits, int) and not isinstance(bits, bool) and 1 <= bits <= 8):
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def quantize_rows(rows: Tensor, bits: int) -> Tuple[Tensor, Tensor]:
    """``rows [N, d]`` -> ``(codes int64 [N, d] in [0, 2**bits), scales float32 [N])``
    such that :func:`dequantize_rows` gives ``(codes - 2**(bits-1) + 0.5) * scale``: the
    ``2**bits`` levels are symmetric about 0, and each row's scale is the one of
    :data:`_SCALE_GRID` (times its largest entry's) with the lowest squared error."""
    _check_bits(bits)
    if rows.dim() != 2:
        raise ValueError(f"rows must be [N, d], got {tuple(rows.shape)}")
    r = rows.detach().float()
    half = 2 ** (bits - 1)
    amax = r.abs().amax(1, keepdim=True).clamp_min(1e-12)
    best_err = best_codes = best_scale = None
    for f in _SCALE_GRID:
        scale = amax * (f / (half - 0.5))
        codes = torch.floor(r / scale).clamp(-half, half - 1) + half
        err = ((codes - half + 0.5) * scale - r).pow(2).sum(1)
        if best_err is None:
            best_err, best_codes, best_scale = err, codes, scale
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_codes = torch.where(better.unsqueeze(1), codes, best_codes)
            best_scale = torch.where(better.unsqueeze(1), scale, best_scale)
    return best_codes.long(), best_scale.squeeze(1)


def dequantize_rows(codes: Tensor, scales: Tensor, bits: int) -> Tensor:
    """``codes [N, d]`` (from :func:`quantize_rows`), ``scales [N]`` -> ``[N, d]`` in
    ``scales``' dtype."""
    _check_bits(bits)
    return (codes.to(scales.dtype) - (2 ** (bits - 1) - 0.5)) * scales.unsqueeze(-1)


def residual_row_bytes(dim: int, bits: int, element_size: int = 4) -> int:
    """Bytes of one residual row of ``bits`` per dimension: its packed codes, its scale
    (``element_size``) and its int32 id."""
    return math.ceil(dim * bits / 8) + element_size + _ID_BYTES


def allocate_bits(residual: Tensor, weights: Tensor, budget: int, element_size: int = 4,
                  widths: Sequence[int] = RESIDUAL_BITS) -> Tensor:
    """``int64 [V]`` bits per dimension for each row's residual (0: none) minimising
    ``sum_i weights_i * ||r_i - q_b(r_i)||^2`` with the bytes
    (:func:`residual_row_bytes`) at most ``budget``.

    ``residual [V, d]``, ``weights [V]`` (>= 0; weight 0 never gets bits). The errors are
    measured for every width; a Lagrange multiplier ``lam`` (bisected) picks for each row
    the width minimising ``weights_i * err_i(b) + lam * bytes(b)``, the cheapest ``lam``
    whose total fits."""
    if residual.dim() != 2 or weights.shape != (residual.shape[0],):
        raise ValueError(f"residual must be [V, d] and weights [V], got {tuple(residual.shape)} "
                         f"and {tuple(weights.shape)}")
    if not (isinstance(budget, int) and budget >= 0):
        raise ValueError(f"budget must be an int >= 0 (bytes), got {budget!r}")
    v, d = residual.shape
    widths = [0] + sorted(set(int(b) for b in widths))
    for b in widths[1:]:
        _check_bits(b)
    r = residual.detach().float()
    w = weights.detach().float().clamp_min(0).to(r.device)
    errors = [r.pow(2).sum(1)]
    for b in widths[1:]:
        codes, scales = quantize_rows(r, b)
        errors.append((dequantize_rows(codes, scales, b) - r).pow(2).sum(1))
    cost = torch.tensor([0.0] + [float(residual_row_bytes(d, b, element_size)) for b in widths[1:]],
                        device=r.device)
    weighted = w.unsqueeze(1) * torch.stack(errors, 1)  # [V, widths]

    def pick(lam: float) -> Tensor:
        return (weighted + lam * cost).argmin(1)

    if budget < cost[1:].min() or not bool((w > 0).any()):
        return torch.zeros(v, dtype=torch.long)
    scale = float(weighted.max()) / float(cost[1:].min()) + 1.0
    lo, hi = 0.0, scale  # at hi every row's gain per byte is below lam: no bits at all
    if float(cost[pick(lo)].sum()) <= budget:
        hi = lo
    for _ in range(64):
        if hi - lo <= 1e-9 * scale:
            break
        mid = (lo + hi) / 2
        if float(cost[pick(mid)].sum()) > budget:
            lo = mid
        else:
            hi = mid
    chosen = pick(hi)
    table = torch.tensor(widths, device=r.device)
    return table[chosen].cpu()


class ResidualRows(nn.Module):
    """Residuals of some rows of a ``dim``-wide table, ``b`` bits per dimension each, added
    to the base's rows (in the base's space, before a fitted table's transform).

    Rows are grouped by width (ascending); three tensors hold them all: buffers ``ids``
    (int32 ``[N]``, table rows) and ``codes`` (uint8: each width's ``[n_b, dim]`` codes
    packed at ``b`` bits by :func:`compemb.dpq.math.pack_codes`, one stream after the
    other), parameter ``scales [N]`` (trainable, e.g. by the head fit). :attr:`counts`
    (``{bits: rows}``) is the layout; build with :meth:`from_rows` or, to load a checkpoint
    into, the constructor with the same counts (placeholder values).
    """

    def __init__(self, dim: int, counts: Mapping[int, int], dtype: torch.dtype = torch.float32,
                 device=None) -> None:
        super().__init__()
        self.dim = int(dim)
        layout = {int(b): int(n) for b, n in counts.items() if int(n) > 0}
        for b in layout:
            _check_bits(b)
        self.widths = tuple(sorted(layout))
        self._counts = tuple(layout[b] for b in self.widths)
        rows = sum(self._counts)
        nbytes = sum(packed_num_bytes(n * self.dim, b) for b, n in zip(self.widths, self._counts))
        self.register_buffer("ids", torch.zeros(rows, dtype=torch.int32, device=device))
        self.register_buffer("codes", torch.zeros(nbytes, dtype=torch.uint8, device=device))
        self.scales = nn.Parameter(torch.zeros(rows, dtype=dtype, device=device))

    @classmethod
    def from_rows(cls, residual: Tensor, bits: Tensor, dtype: Optional[torch.dtype] = None
                  ) -> "ResidualRows":
        """Quantise ``residual [V, d]`` row ``i`` at ``bits[i]`` bits (0: left out)."""
        v, d = residual.shape
        bits = bits.reshape(-1).long().cpu()
        if bits.numel() != v:
            raise ValueError(f"bits must have one entry per row ({v}), got {bits.numel()}")
        dtype = dtype or residual.dtype
        counts = {int(b): int((bits == b).sum()) for b in bits.unique().tolist() if b > 0}
        out = cls(d, counts, dtype, residual.device)
        ids, codes, scales = [], [], []
        for b in out.widths:
            rows = (bits == b).nonzero().squeeze(1)
            c, s = quantize_rows(residual[rows.to(residual.device)], b)
            ids.append(rows)
            codes.append(pack_codes(c, b))
            scales.append(s)
        if ids:
            with torch.no_grad():
                out.ids.copy_(torch.cat(ids).to(torch.int32))
                out.codes.copy_(torch.cat(codes))
                out.scales.copy_(torch.cat(scales).to(dtype))
        return out

    @property
    def counts(self) -> Dict[int, int]:
        """Rows per width ``{bits: n}``."""
        return dict(zip(self.widths, self._counts))

    def _centred(self) -> Tensor:
        """``int8 [N, dim]``: every row's codes minus ``2**(b-1)`` (its level is that plus
        0.5, times its scale); unpacked once per state of ``codes`` (in the graph when
        tracing)."""
        def unpack() -> Tensor:
            parts, byte = [], 0
            for b, n in zip(self.widths, self._counts):
                size = packed_num_bytes(n * self.dim, b)
                stream = self.codes[byte:byte + size]
                byte += size
                c = unpack_codes(stream, b, torch.arange(n * self.dim, device=stream.device))
                parts.append((c.reshape(n, self.dim) - 2 ** (b - 1)).to(torch.int8))
            if not parts:
                return torch.zeros(0, self.dim, dtype=torch.int8, device=self.codes.device)
            return torch.cat(parts)

        return cached_per_state(self, "_unpacked", [self.codes], unpack)

    def rows(self) -> Tuple[Tensor, Tensor]:
        """``(ids long [N], residual rows [N, d])``."""
        return self.ids.long(), (self._centred().to(self.scales.dtype) + 0.5) * self.scales.unsqueeze(-1)

    def add_to_table(self, table: Tensor) -> Tensor:
        """``table [V, d]`` with each residual added to its row (out of place)."""
        if not self.ids.numel():
            return table
        ids, rows = self.rows()
        return table.index_add(0, ids, rows.to(table.dtype))

    def add_to_lookup(self, ids: Tensor, out: Tensor, num_embeddings: int) -> Tensor:
        """``out [..., d]`` (the base's rows of ``ids [...]``) with the residuals added;
        only the looked-up rows are dequantised (the ``[V]`` slot map is built once per
        state of ``ids``)."""
        if not self.ids.numel():
            return out
        slot = cached_per_state(self, "_slots", [self.ids],
                                lambda: slot_map(self.ids, num_embeddings, ids.device),
                                ids.device, num_embeddings)[ids]
        keep = slot.clamp_min(0)
        add = (self._centred()[keep].to(out.dtype) + 0.5) * self.scales.to(out.dtype)[keep].unsqueeze(-1)
        return out + add * (slot >= 0).unsqueeze(-1).to(out.dtype)

    def add_to_logits(self, hidden: Tensor, logits: Tensor) -> Tensor:
        """``logits [..., V]`` (the base's, for ``hidden [..., d]`` in the base's space)
        plus ``hidden . residual_i`` in each residual row's column: one ``[..., d] x
        [d, N]`` product with the codes, then the scales (no ``[N, d]`` float table kept;
        at inference the int8 codes are read as they are: :func:`compemb.dpq.kernels.int8_row_dots`)."""
        if not self.ids.numel():
            return logits
        h = hidden.to(logits.dtype)
        flat = h.reshape(-1, self.dim)
        dots = int8_row_dots(flat, self._centred()).reshape(*h.shape[:-1], -1)
        dots = (dots + 0.5 * h.sum(-1, keepdim=True)) * self.scales.to(h.dtype)
        return logits.index_add(logits.dim() - 1, self.ids.long(), dots)

    def storage_bytes(self) -> int:
        """Packed codes, scales and ids."""
        return sum(t.numel() * t.element_size() for t in (self.ids, self.codes, self.scales))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, rows per bits={self.counts}"
