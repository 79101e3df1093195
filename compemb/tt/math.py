"""Pure tensor math for Tensor-Train (TT) and Tensor-Ring (TR) embedding tables.

No parameters and no modules here: shape choice, the mixed-radix index split, the core
contractions (rows, whole table, logits), TT-SVD / TR-SVD and the init scale.

Conventions (used by every function below and by the layers):

* A table ``W [V, J]`` is a TT-matrix of shape ``(I1..IN) x (J1..JN)`` with
  ``prod(Ik) >= V`` (rows ``V..prod(Ik)-1`` are padding that is never returned) and
  ``prod(Jk) == J``.
* ``ranks`` is the full tuple ``(R0, R1, .., RN)``; core ``k`` (0-based) has shape
  ``(ranks[k], Ik, Jk, ranks[k+1])``. TT: ``R0 == RN == 1``. TR (ring): ``R0 == RN``,
  and an element is the trace of the product of the slices.
* Row index ``i`` is split row-major: ``i1`` is the most significant digit
  (``i = ((i1*I2 + i2)*I3 + i3)...``), so neighbouring ids, and the frequent small ids of
  a frequency-sorted vocabulary, share their leading digits ``(i1, i2, ..)``.
* Column index ``j`` is split column-major: ``j1`` is the least significant digit
  (``j = ((jN*J_{N-1} + j_{N-1})*...)*J1 + j1``). With this pairing the prefix product
  ``G1[i1]..Gk[ik]`` is a matrix ``(Rk, J_k..J_1)`` and each further core is one matrix
  product on the left, with no transposes, and the whole table comes out of the last
  product already in row order.

    W[i, j] = trace( G1[:, i1, j1, :] @ G2[:, i2, j2, :] @ ... @ GN[:, iN, jN, :] )
"""
from __future__ import annotations

import itertools
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "Shape", "factorizations", "choose_row_factors", "choose_col_factors",
    "choose_shape", "check_shape", "full_ranks", "core_shapes", "num_parameters",
    "init_std", "index_digits", "prefix_tree", "gather_rows", "full_table",
    "lookup", "rows_from_prefix", "logits_prefix", "logits_through_cores",
    "logits_through_table", "logits_costs", "to_modes", "tt_svd", "tr_svd", "shape_string",
    "suggest_dims",
]

Shape = Tuple[Tuple[int, ...], Tuple[int, ...]]

#: A middle level of a lookup is computed for every child of the present prefixes (one
#: GEMM with the whole core) when that is at most this many times the children present.
DENSE_LEVEL_FACTOR = 4


# ----------------------------------------------------------------------------- shapes
def factorizations(n: int, num_factors: int, min_factor: int = 2) -> List[Tuple[int, ...]]:
    """All non-decreasing tuples of ``num_factors`` integers >= ``min_factor`` whose
    product is exactly ``n``."""
    out: List[Tuple[int, ...]] = []

    def rec(rest: int, k: int, lo: int, acc: Tuple[int, ...]) -> None:
        if k == 1:
            if rest >= lo:
                out.append(acc + (rest,))
            return
        f = lo
        while f ** k <= rest:
            if rest % f == 0:
                rec(rest // f, k - 1, f, acc + (f,))
            f += 1

    if n >= 1 and num_factors >= 1:
        rec(n, num_factors, max(1, min_factor), ())
    return out


def choose_col_factors(embedding_dim: int, num_factors: int) -> Optional[Tuple[int, ...]]:
    """The most balanced exact split ``J = J1*..*JN`` with every ``Jk >= 2`` (ascending),
    or ``None`` when there is none (``J`` has fewer than ``N`` prime factors)."""
    cands = factorizations(embedding_dim, num_factors, min_factor=2)
    if not cands:
        return None
    return min(cands, key=lambda t: (t[-1] / t[0], t[-1]))


def choose_row_factors(num_embeddings: int, num_factors: int) -> Tuple[int, ...]:
    """Near-equal ``I1 <= .. <= IN`` with ``prod >= V`` and the least padding.

    "Near-equal": largest/smallest factor at most 1.5 (when some such tuple exists);
    among those the least padding ``prod - V`` wins, ties going to the more equal tuple.
    (Padding costs no parameters but near-equal factors minimise the core sizes.)
    """
    v, n = int(num_embeddings), int(num_factors)
    if n == 1:
        return (v,)
    base = v ** (1.0 / n)
    lo, hi = max(1, int(base / 1.6)), int(math.ceil(base * 1.6)) + 1
    best = None
    for head in itertools.combinations_with_replacement(range(lo, hi + 1), n - 1):
        p = math.prod(head)
        last = max(head[-1], -(-v // p))
        t = head + (last,)
        key = (t[-1] / t[0] > 1.5, math.prod(t), t[-1] / t[0])
        if best is None or key < best[0]:
            best = (key, t)
    assert best is not None
    return best[1]


def suggest_dims(embedding_dim: int, num_factors: int) -> Tuple[List[int], List[int]]:
    """Nearby embedding dims that split into ``num_factors`` factors >= 2, and the
    numbers of factors that ``embedding_dim`` itself allows (for error messages)."""
    near: List[int] = []
    for d in range(1, embedding_dim + 1):
        for c in (embedding_dim - d, embedding_dim + d):
            if c >= 2 ** num_factors and choose_col_factors(c, num_factors) is not None:
                near.append(c)
        if len(near) >= 2:
            break
    counts = [k for k in range(2, 7) if choose_col_factors(embedding_dim, k) is not None]
    return sorted(near), counts


def choose_shape(num_embeddings: int, embedding_dim: int, num_factors: int) -> Shape:
    """Automatic TT shape ``((I1..IN), (J1..JN))``; ``ValueError`` (naming
    ``embedding_dim`` and suggesting what works) when ``J`` cannot be split."""
    cols = choose_col_factors(embedding_dim, num_factors)
    if cols is None:
        near, counts = suggest_dims(embedding_dim, num_factors)
        alt = (f", or num_factors in {counts}" if counts else "")
        raise ValueError(
            f"embedding_dim={embedding_dim} cannot be split into num_factors={num_factors} "
            f"factors >= 2; use an embedding_dim that can (e.g. {' or '.join(map(str, near))})"
            f"{alt}, or give shape=((I1..IN), (J1..JN)) yourself")
    return choose_row_factors(num_embeddings, num_factors), cols


def check_shape(shape: object, num_embeddings: int, embedding_dim: int) -> Shape:
    """Validate a user shape ``((I1..IN), (J1..JN))`` against ``V x J``."""
    try:
        rows, cols = shape  # type: ignore[misc]
        rows, cols = tuple(rows), tuple(cols)
        ok = all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in rows + cols)
    except (TypeError, ValueError):
        ok = False
    if not ok or len(rows) != len(cols) or len(rows) < 2:
        raise ValueError(
            f"shape must be ((I1, .., IN), (J1, .., JN)): two tuples of N >= 2 positive ints, "
            f"got {shape!r}; e.g. ((25, 30, 40), (4, 8, 8)) for a 25000 x 256 table")
    if math.prod(rows) < num_embeddings:
        raise ValueError(
            f"shape rows {rows} multiply to {math.prod(rows)} < num_embeddings={num_embeddings}; "
            f"the row factors must cover the vocabulary, e.g. "
            f"{choose_row_factors(num_embeddings, len(rows))}")
    if math.prod(cols) != embedding_dim:
        good = choose_col_factors(embedding_dim, len(cols))
        raise ValueError(
            f"shape columns {cols} multiply to {math.prod(cols)} but embedding_dim={embedding_dim}; "
            f"their product must equal embedding_dim" + (f", e.g. {good}" if good else ""))
    return rows, cols


def full_ranks(rank: Union[int, Sequence[int]], num_factors: int, ring: bool) -> Tuple[int, ...]:
    """``(R0..RN)`` from a validated rank (see :class:`compemb.tt.TTConfig`).

    TT: ``rank`` is an int or the ``N-1`` inner ranks ``(R1..R_{N-1})``; ``R0 = RN = 1``.
    TR: an int or the ``N`` ranks ``(R0..R_{N-1})``; ``RN = R0``."""
    want = num_factors if ring else num_factors - 1
    inner = (int(rank),) * want if isinstance(rank, int) else tuple(int(r) for r in rank)
    assert len(inner) == want, (rank, num_factors, ring)
    return inner + (inner[0],) if ring else (1,) + inner + (1,)


def core_shapes(shape: Shape, ranks: Sequence[int]) -> List[Tuple[int, int, int, int]]:
    rows, cols = shape
    return [(ranks[k], rows[k], cols[k], ranks[k + 1]) for k in range(len(rows))]


def num_parameters(shape: Shape, ranks: Sequence[int]) -> int:
    return sum(math.prod(s) for s in core_shapes(shape, ranks))


def shape_string(shape: Shape, ranks: Sequence[int], ring: bool) -> str:
    """``"(25,30,40)x(4,8,8) r=16"`` (or ``r=(8,16)`` for unequal ranks)."""
    rows, cols = shape
    inner = ranks[:-1] if ring else ranks[1:-1]
    r = str(inner[0]) if len(set(inner)) == 1 else "(" + ",".join(map(str, inner)) + ")"
    return f"({','.join(map(str, rows))})x({','.join(map(str, cols))}) r={r}"


def init_std(num_embeddings: int, embedding_dim: int, ranks: Sequence[int], ring: bool,
             variance: Optional[float] = None) -> float:
    """Std of every core element so that the table has ``variance`` (Glorot,
    ``2/(V+J)``, by default): paper eq. (2) for any ranks.

    An element is a sum over ``prod(bond ranks)`` products of ``N`` independent zero-mean
    core elements, so its variance is ``prod(R) * s^(2N)``; hence
    ``s^2 = (variance / prod(R))^(1/N)``. The bonds are ``R1..R_{N-1}`` for TT and
    additionally ``R0`` for TR."""
    n = len(ranks) - 1
    var = 2.0 / (num_embeddings + embedding_dim) if variance is None else variance
    bonds = math.prod(ranks[:-1]) if ring else math.prod(ranks[1:-1])
    return (var / bonds) ** (1.0 / (2 * n))


# ----------------------------------------------------------------------------- indices
def index_digits(index: Tensor, row_factors: Sequence[int]) -> List[Tensor]:
    """Mixed-radix split of row ids (row-major, ``i1`` most significant):
    ``index [...] -> [d1, .., dN]``, each ``[...]`` with ``0 <= dk < Ik``."""
    digits = []
    rest = index
    for f in reversed(row_factors[1:]):
        digits.append(rest % f)
        rest = torch.div(rest, f, rounding_mode="floor")
    digits.append(rest)
    return digits[::-1]


def prefix_tree(ids: Tensor, row_factors: Sequence[int], share: bool = True
                ) -> Tuple[List[Tensor], List[Optional[Tensor]]]:
    """The prefix tree of a set of row ids, for sharing work between rows.

    ``ids [U]`` (sorted and distinct when ``share``). Returns ``digits`` and ``parents``,
    one entry per level ``k = 0..N-1``: level ``k`` holds the distinct prefixes
    ``(i1..i_{k+1})`` present, ``digits[k] [n_k]`` their last digit and
    ``parents[k] [n_k]`` the position of their own prefix in level ``k-1``
    (``parents[0]`` is ``None``). The last level is ``ids`` itself.

    With ``share=False`` every id keeps its own chain (no ``unique``: static shapes,
    for ``torch.compile``); ``parents[k]`` is then ``None`` (identity)."""
    n = len(row_factors)
    digits: List[Tensor] = [ids] * n
    parents: List[Optional[Tensor]] = [None] * n
    cur = ids
    for k in range(n - 1, 0, -1):
        f = row_factors[k]
        digits[k] = cur % f
        prefix = torch.div(cur, f, rounding_mode="floor")
        if share:
            cur, parents[k] = torch.unique_consecutive(prefix, return_inverse=True)
        else:
            cur = prefix
    digits[0] = cur
    return digits, parents


# ----------------------------------------------------------------------------- contractions
def _first_operand(core: Tensor) -> Tensor:
    """Core 0 ``(R0, I1, J1, R1)`` -> ``[I1, R1, J1*R0]`` (prefix of length 1)."""
    r0, i1, j1, r1 = core.shape
    return core.permute(1, 3, 2, 0).reshape(i1, r1, j1 * r0)


def _middle_operand(core: Tensor) -> Tensor:
    """Core k ``(Rk-1, Ik, Jk, Rk)`` -> ``[Ik, Rk*Jk, Rk-1]``: left factor of a prefix."""
    a, i, j, b = core.shape
    return core.permute(1, 3, 2, 0).reshape(i, b * j, a)


def _last_operand(core: Tensor, r0: int) -> Tensor:
    """Last core ``(R_{N-1}, IN, JN, R0)`` -> ``[IN, JN, R_{N-1}*R0]`` (the trace over
    ``R0`` is folded into the contraction; ``R0 == 1`` for TT)."""
    a, i, j, b = core.shape
    return core.permute(1, 2, 0, 3).reshape(i, j, a * b)


def _close_prefix(prefix: Tensor, r0: int) -> Tensor:
    """``[n, R, J'*R0] -> [n, R*R0, J']``: move the ring index next to the bond index."""
    n, r, x = prefix.shape
    if r0 == 1:
        return prefix
    return prefix.view(n, r, x // r0, r0).transpose(2, 3).reshape(n, r * r0, x // r0)


def _take(t: Tensor, index: Optional[Tensor]) -> Tensor:
    return t if index is None else t.index_select(0, index)


class _BroadcastBmm(torch.autograd.Function):
    """``out[b] = a @ x[b]``: ``a [M, K]``, ``x [n, K, N]`` -> ``[n, M, N]``.

    One batched product with ``a`` broadcast (no copy); the backward gives ``a``'s gradient
    as one contraction over ``(b, N)`` instead of autograd's ``[n, M, K]`` intermediate."""

    @staticmethod
    def forward(ctx, a: Tensor, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(a, x)
        return torch.bmm(a.unsqueeze(0).expand(x.shape[0], -1, -1), x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        a, x = ctx.saved_tensors
        grad_a = grad_x = None
        if ctx.needs_input_grad[0]:  # sum_b grad[b] @ x[b]^T, in chunks of ~4M floats
            step = max(1, (1 << 22) // a.numel())
            grad_a = torch.zeros_like(a)
            for s in range(0, x.shape[0], step):
                grad_a += torch.bmm(grad[s:s + step], x[s:s + step].transpose(1, 2)).sum(0)
        if ctx.needs_input_grad[1]:
            grad_x = torch.bmm(a.t().unsqueeze(0).expand(x.shape[0], -1, -1), grad)
        return grad_a, grad_x


def broadcast_bmm(a: Tensor, x: Tensor) -> Tensor:
    """``a [M, K]`` times every ``x[b] [K, N]`` -> ``[n, M, N]``."""
    return _BroadcastBmm.apply(a, x)


def _next_level(core: Tensor, prefix: Tensor, digits: Tensor, parents: Optional[Tensor],
                dense: bool) -> Tensor:
    """Prefixes one core longer. ``prefix [n, R_{k-1}, X]`` -> ``[m, R_k, J_k*X]``.

    ``dense``: every child ``(p, ik)`` of every prefix, ``m = n*Ik`` (child ``(p, ik)`` at
    row ``p*Ik + ik``), one broadcast product with the whole core. Otherwise only the
    ``m = len(digits)`` children asked for, each with its own core slice (a gather)."""
    r_prev, i_k, j_k, r_k = core.shape
    if dense:  # one GEMM core^T [Ik*Jk*Rk, Rk-1] @ [Rk-1, n*X] (the core is not copied)
        n, _, x = prefix.shape
        flat = prefix.transpose(0, 1).reshape(r_prev, n * x)
        out = (core.reshape(r_prev, i_k * j_k * r_k).t() @ flat).view(i_k, j_k, r_k, n, x)
        return out.permute(3, 0, 2, 1, 4).reshape(n * i_k, r_k, j_k * x)
    # the slices asked for, then their layout: a copy of m slices, not of the whole core
    left = _middle_operand(core.index_select(1, digits))  # [m, Rk*Jk, Rk-1]
    return torch.bmm(left, _take(prefix, parents)).view(-1, r_k, j_k * prefix.shape[2])


def _shared_prefixes(cores: Sequence[Tensor], digits: List[Tensor],
                     parents: List[Optional[Tensor]], row_factors: Sequence[int], share: bool
                     ) -> Tuple[Tensor, Optional[Tensor]]:
    """Prefix products of all but the last core for a prefix tree: ``[n, R*R0, J']`` and,
    for each last-level entry, its row there (``None``: the identity).

    A middle level where most children of the present prefixes are present anyway (at
    most 4x more) is computed for all children in one GEMM with the whole core (no gather
    of core slices)."""
    parents = list(parents)
    prefix = _first_operand(cores[0]).index_select(0, digits[0])  # [n0, R1, J1*R0]
    for k in range(1, len(cores) - 1):
        dense = share and prefix.shape[0] * row_factors[k] <= DENSE_LEVEL_FACTOR * digits[k].shape[0]
        prefix = _next_level(cores[k], prefix, digits[k], parents[k], dense)
        if dense:  # level-k entry e sits at row parents[k][e]*Ik + digits[k][e]
            slot = parents[k] * row_factors[k] + digits[k]
            parents[k + 1] = slot.index_select(0, parents[k + 1])
    return _close_prefix(prefix, cores[0].shape[0]), parents[-1]


def gather_rows(cores: Sequence[Tensor], ids: Tensor, row_factors: Sequence[int],
                share: bool = True) -> Tensor:
    """Rows ``ids [U] -> [U, J]`` of the table, computed from the cores, the last level as
    one batched product over the rows (the path used under ``torch.compile``).

    With ``share`` the ids must be sorted and distinct (``torch.unique``); each distinct
    prefix ``(i1..ik)`` is then contracted once and reused by every row below it."""
    digits, parents = prefix_tree(ids, row_factors, share)
    prefix, par = _shared_prefixes(cores, digits, parents, row_factors, share)  # [n, K, J']
    last = _last_operand(cores[-1], cores[0].shape[0]).index_select(0, digits[-1])  # [U, JN, K]
    rows = torch.bmm(last, _take(prefix, par))  # [U, JN, J']
    return rows.reshape(rows.shape[0], rows.shape[1] * rows.shape[2])


def lookup(cores: Sequence[Tensor], index: Tensor, row_factors: Sequence[int],
           padding_idx: Optional[int] = None) -> Tensor:
    """``index [n]`` (any order, repeats allowed) -> rows ``[n, J]``; the row
    ``padding_idx`` is zero and passes no gradient.

    Each distinct id is computed once, each distinct prefix once (:func:`prefix_tree`).
    The last level groups the rows by their prefix: a prefix with ``c`` rows gets a block
    of ``w`` slots (``w`` the power of two >= ``c``), and each block width is one batched
    GEMM ``[w*JN, K] @ [K, J']`` against the prefix itself, so per-row copies of the
    prefix matrices (``K*J'`` floats each) are never made, in forward or backward.
    (The sizes depend on the data: on CUDA, ``unique`` and the block widths cost a few
    host syncs per call.)"""
    ids, inverse = torch.unique(index, sorted=True, return_inverse=True)
    digits, parents = prefix_tree(ids, row_factors, True)
    prefix, par = _shared_prefixes(cores, digits, parents, row_factors, True)
    last = _last_operand(cores[-1], cores[0].shape[0])  # [IN, JN, K]
    layout = _block_layout(par, digits[-1], prefix.shape[0], last.shape[0])
    slot_digit, row_slot, blocks = layout
    if padding_idx is not None:  # the padding row reads the zero slot past the end
        row_slot = torch.where(ids == padding_idx, slot_digit.shape[0], row_slot)
    return _LastLevel.apply(last, prefix, slot_digit, row_slot.index_select(0, inverse), blocks)


def _block_layout(parents: Optional[Tensor], digits: Tensor, n_prefix: int, n_digits: int
                  ) -> Tuple[Tensor, Tensor, List[Tuple[int, int, int, Tensor]]]:
    """Slots for :func:`lookup`'s last level. ``parents [U]`` (non-decreasing) and
    ``digits [U]`` of the distinct rows. Returns ``slot_digit [T]`` (the last digit in each
    slot, ``n_digits`` for an empty one), ``row_slot [U]`` and the blocks
    ``(width, count, first slot, prefix rows [count])``, one per width."""
    u = digits.shape[0]
    if parents is None:
        parents = torch.arange(u, device=digits.device)
    counts = torch.bincount(parents, minlength=n_prefix)
    present = torch.nonzero(counts).squeeze(1)
    c = counts.index_select(0, present)
    width = torch.where(c > 1, torch.exp2(torch.ceil(torch.log2(c.double()))).long(), 1)
    order = torch.argsort(width, stable=True)
    width, present = width.index_select(0, order), present.index_select(0, order)
    first = torch.cumsum(width, 0) - width  # first slot of each present prefix
    block_of = torch.zeros(n_prefix, dtype=torch.long, device=digits.device)
    block_of[present] = first
    start = torch.cumsum(counts, 0) - counts  # first distinct row of each prefix
    row_slot = block_of.index_select(0, parents) + torch.arange(u, device=digits.device) \
        - start.index_select(0, parents)
    total = int(width.sum())
    slot_digit = torch.full((total,), n_digits, dtype=torch.long, device=digits.device)
    slot_digit[row_slot] = digits
    widths, sizes = torch.unique_consecutive(width, return_counts=True)
    blocks, slot, taken = [], 0, 0
    for w, size in zip(widths.tolist(), sizes.tolist()):
        blocks.append((w, size, slot, present[taken:taken + size]))
        slot += w * size
        taken += size
    return slot_digit, row_slot, blocks


class _LastLevel(torch.autograd.Function):
    """``out[p] = slot_matrix(row_slot[p]) @ prefix[block prefix]`` for the block layout of
    :func:`_block_layout`; see :func:`lookup`. ``last [IN, JN, K]``, ``prefix [n, K, J']``
    -> ``[len(out_slot), JN*J']``; slot ``T`` (past the end) reads a zero row."""

    @staticmethod
    def forward(ctx, last, prefix, slot_digit, out_slot, blocks):  # type: ignore[override]
        n_digits, j_n, k = last.shape
        j_rest = prefix.shape[2]
        total = slot_digit.shape[0]
        slots = torch.cat([last, last.new_zeros(1, j_n, k)]).index_select(0, slot_digit)
        table = last.new_empty(total + 1, j_n * j_rest)
        table[total] = 0
        for w, size, first, rows in blocks:
            torch.bmm(slots[first:first + w * size].view(size, w * j_n, k),
                      prefix.index_select(0, rows),
                      out=table[first:first + w * size].view(size, w * j_n, j_rest))
        ctx.blocks = blocks
        ctx.save_for_backward(last, prefix, slot_digit, out_slot, slots)
        return table.index_select(0, out_slot)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        last, prefix, slot_digit, out_slot, slots = ctx.saved_tensors
        n_digits, j_n, k = last.shape
        j_rest = prefix.shape[2]
        total = slot_digit.shape[0]
        grad_table = grad.new_zeros(total + 1, j_n * j_rest).index_add_(0, out_slot, grad.contiguous())
        grad_last = grad_prefix = None
        if ctx.needs_input_grad[1]:
            grad_prefix = torch.zeros_like(prefix)
        if ctx.needs_input_grad[0]:
            grad_slots = last.new_empty(total, j_n, k)
        for w, size, first, rows in ctx.blocks:
            g = grad_table[first:first + w * size].view(size, w * j_n, j_rest)
            if ctx.needs_input_grad[1]:
                a = slots[first:first + w * size].view(size, w * j_n, k)
                grad_prefix.index_copy_(0, rows, torch.bmm(a.transpose(1, 2), g))
            if ctx.needs_input_grad[0]:
                torch.bmm(g, prefix.index_select(0, rows).transpose(1, 2),
                          out=grad_slots[first:first + w * size].view(size, w * j_n, k))
        if ctx.needs_input_grad[0]:
            grad_last = last.new_zeros(n_digits + 1, j_n, k).index_add_(0, slot_digit, grad_slots)
            grad_last = grad_last[:n_digits]
        return grad_last, grad_prefix, None, None, None


def _all_prefixes(cores: Sequence[Tensor], upto: int) -> Tensor:
    """Every prefix product of cores ``0..upto-1``: ``[I1*..*I_upto, R_upto, J'*R0]``."""
    prefix = _first_operand(cores[0])
    for k in range(1, upto):
        prefix = _next_level(cores[k], prefix, prefix, None, dense=True)
    return prefix


def full_table(cores: Sequence[Tensor], num_embeddings: int,
               prefix: Optional[Tensor] = None) -> Tensor:
    """The whole ``[V, J]`` table (first ``V`` rows of the TT-matrix); ``prefix``: the
    :func:`logits_prefix` of the cores, when at hand."""
    r0 = cores[0].shape[0]
    if prefix is None:  # [P, K, J'] (no need for logits' layout here)
        prefix_kj = _close_prefix(_all_prefixes(cores, len(cores) - 1), r0)
    else:
        prefix_kj = prefix.transpose(1, 2)
    last = _last_operand(cores[-1], r0)  # [IN, JN, K]
    i_n, j_n, rr = last.shape
    out = broadcast_bmm(last.reshape(i_n * j_n, rr), prefix_kj)  # [P, IN*JN, J']
    table = out.view(-1, j_n * prefix_kj.shape[2])
    return table if table.shape[0] == num_embeddings else table[:num_embeddings]


def logits_prefix(cores: Sequence[Tensor]) -> Tensor:
    """The prefix products of all but the last core, closed over ``r0``:
    ``[I1*..*I_{N-1}, J1*..*J_{N-1}, R*R0]`` (what :func:`logits_through_cores` contracts the
    hidden states with; independent of them, so an inference caller can keep it). The bond
    index is last so that the hidden-first contraction is one batched GEMM with no copy."""
    prefix = _close_prefix(_all_prefixes(cores, len(cores) - 1), cores[0].shape[0])
    return prefix.transpose(1, 2).contiguous()


#: Numbers of one chunk of the table in :func:`logits_through_table` (8 MB in float32).
TABLE_CHUNK = 1 << 21


def logits_through_table(cores: Sequence[Tensor], hidden: Tensor, num_embeddings: int,
                         prefix: Optional[Tensor] = None,
                         dtype: Optional[torch.dtype] = None) -> Tensor:
    """``hidden [B, J] @ W.T -> [B, V]`` (``dtype``, default ``hidden``'s) by building the
    table ``W`` a chunk of rows at a time and multiplying each chunk at once (no gradient).

    ``prefix``: the :func:`logits_prefix` ``[P, J', K]`` of the cores (built if not given).
    With the last core as ``last [IN*JN, K]``, rows ``p*IN .. (p+c)*IN`` of the table are
    ``last @ prefix[p:p+c].T`` (one batched
    GEMM into a buffer that is reused, about :data:`TABLE_CHUNK` numbers, so it stays in the
    cache), then one GEMM writes ``hidden @ chunk.T`` into its columns of the output. Against
    building the whole ``V x J`` table first, this never allocates (and page-faults) a
    table-sized tensor: at V=32768, J=512, rank 64 the table costs 8 ms instead of 27-33 ms
    next to a 145 ms GEMM at 1,024 hidden states."""
    if prefix is None:
        prefix = logits_prefix(cores)
    last = _last_operand(cores[-1], cores[0].shape[0])  # [IN, JN, K]
    n_pre, j_rest, k_dim = prefix.shape
    i_n, j_n, _ = last.shape
    dtype = hidden.dtype if dtype is None else dtype
    b = hidden.shape[0]
    out = hidden.new_empty((b, num_embeddings), dtype=dtype)
    h = hidden.to(dtype)
    last2 = last.reshape(i_n * j_n, k_dim)
    step = max(1, TABLE_CHUNK // (i_n * j_n * j_rest))
    buf = prefix.new_empty((min(step, n_pre), i_n * j_n, j_rest))
    for s in range(0, n_pre, step):
        e = min(n_pre, s + step)
        lo, hi = s * i_n, min(e * i_n, num_embeddings)
        if lo >= hi:
            break
        rows = torch.matmul(last2, prefix[s:e].transpose(1, 2), out=buf[:e - s])
        chunk = rows.view((e - s) * i_n, j_n * j_rest)[:hi - lo].to(dtype)
        torch.mm(h, chunk.t(), out=out[:, lo:hi])
    return out


def rows_from_prefix(cores: Sequence[Tensor], prefix: Tensor, ids: Tensor) -> Tensor:
    """Rows ``ids [U] -> [U, J]`` from the :func:`logits_prefix` of the cores: row
    ``i = p*IN + iN`` is ``last[iN] @ prefix[p].T`` (``JN*K*J'`` multiply-adds, one gather of
    each operand), the cheapest lookup of a few rows when the prefixes are at hand."""
    last = _last_operand(cores[-1], cores[0].shape[0])  # [IN, JN, K]
    i_n = last.shape[0]
    rows = torch.bmm(last.index_select(0, ids % i_n),
                     prefix.index_select(0, ids // i_n).transpose(1, 2))
    return rows.reshape(ids.shape[0], -1)


def _through_costs(shape: Shape, ranks: Sequence[int]) -> Tuple[float, float]:
    """Multiply-adds per hidden state of the two orders of :func:`logits_through_cores`
    with the prefixes at hand: ``(last core first, hidden first)``."""
    rows, cols = shape
    v, j = math.prod(rows), math.prod(cols)
    k = ranks[-2] * ranks[0]
    return k * (rows[-1] * j + v * (j // cols[-1])), k * (v * (j // rows[-1]) + v * cols[-1])


#: Numbers of the hidden-first intermediate per chunk of hidden states in
#: :func:`logits_through_cores` (larger batches run in chunks).
HIDDEN_FIRST_CHUNK = 1 << 22


def logits_through_cores(cores: Sequence[Tensor], hidden: Tensor, num_embeddings: int,
                         prefix: Optional[Tensor] = None) -> Tensor:
    """``hidden [B, J] @ W.T -> [B, V]`` without building ``W``.

    Prefix products of all but the last core (``V/IN`` matrices ``[J', R*R0]``,
    :func:`logits_prefix`) are built once (or passed as ``prefix``). Two orders, the one
    with fewer multiply-adds is taken (:func:`_through_costs`):

    * hidden first: ``Q[p, b, jN, K] = sum_J' h[b, jN, J'] * P[p, J', K]`` (one batched
      GEMM reading the prefixes once), then ``logits[b, p, iN] = sum_(jN, K) Q * last[iN,
      jN, K]`` (one GEMM): ``K * (V*J/IN + V*JN)`` per hidden state;
    * last core first: ``T[b, iN, J', K] = sum_jN h[b, jN, J'] * last[iN, jN, K]``, then
      ``logits = sum_(J', K) P * T``: ``K * (IN*J + V*J/JN)``.

    SmolLM2's head (49152 x 576 as (32, 32, 48) x (8, 8, 9), rank 64): 2.3 and 7.2 times
    the dense product's multiply-adds."""
    r0 = cores[0].shape[0]
    if prefix is None:
        prefix = logits_prefix(cores)  # [P, J', K]
    n_pre, j_rest, k_dim = prefix.shape
    last = _last_operand(cores[-1], r0)  # [IN, JN, K]
    i_n, j_n, _ = last.shape
    b = hidden.shape[0]
    last_first, hidden_first = _through_costs(
        ((n_pre, i_n), (j_rest, j_n)), (r0, k_dim // r0, r0))
    if hidden_first <= last_first:
        # in chunks of hidden states that keep Q (P*JN*K numbers each) near the cache
        step = max(1, HIDDEN_FIRST_CHUNK // (n_pre * j_n * k_dim))
        outs = []
        for s in range(0, max(b, 1), step):  # an empty batch: one empty chunk
            hs = hidden[s:s + step]
            c = hs.shape[0]
            q = torch.matmul(hs.reshape(c * j_n, j_rest), prefix)  # [P, c*JN, K]
            out = q.view(n_pre * c, j_n * k_dim) @ last.reshape(i_n, j_n * k_dim).t()  # [P*c, IN]
            out = out.view(n_pre, c, i_n).transpose(0, 1).reshape(c, n_pre * i_n)
            outs.append(out[:, :num_embeddings])
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    h = hidden.reshape(b, j_n, j_rest)
    # t[b, iN, K, J'] = sum_jN last[iN, jN, K] * h[b, jN, J'], then laid out as [b, iN, J', K]
    t = torch.matmul(last.transpose(1, 2).reshape(1, i_n * k_dim, j_n), h)  # [B, IN*K, J']
    t = t.view(b, i_n, k_dim, j_rest).transpose(2, 3).reshape(b, i_n, j_rest * k_dim)
    if b == 1:
        out = broadcast_bmm(prefix.reshape(n_pre, j_rest * k_dim), t.transpose(1, 2))  # [B, P, IN]
        return out.reshape(b, n_pre * i_n)[:, :num_embeddings]
    # several hidden states: one GEMM [P, J'*K] @ [J'*K, B*IN] reads the prefix once
    out = prefix.reshape(n_pre, j_rest * k_dim) @ t.reshape(b * i_n, j_rest * k_dim).t()
    return out.view(n_pre, b, i_n).transpose(0, 1).reshape(b, n_pre * i_n)[:, :num_embeddings]


def logits_costs(shape: Shape, ranks: Sequence[int], batch: int,
                 cached_prefix: bool = False) -> Tuple[float, float]:
    """Multiply-adds of the two logits paths for ``batch`` hidden vectors:
    ``(materialize + GEMM, contraction through the cores)`` (the cheaper of its two orders,
    :func:`logits_through_cores`); with ``cached_prefix`` the prefix products of
    :func:`logits_prefix` are at hand (inference) and not counted for the contraction."""
    rows, cols = shape
    v, j = math.prod(rows), math.prod(cols)
    r0, r_last = ranks[0], ranks[-2]
    prefixes = 0.0
    count, jp = rows[0], cols[0]
    for k in range(1, len(rows) - 1):
        count *= rows[k]
        prefixes += count * ranks[k] * ranks[k + 1] * jp * cols[k] * r0
        jp *= cols[k]
    dense = prefixes + v * j * r_last * r0 + batch * v * j
    through = (0.0 if cached_prefix else prefixes) + batch * min(_through_costs(shape, ranks))
    return dense, through


# ----------------------------------------------------------------------------- decompositions
def to_modes(weight: Tensor, shape: Shape) -> Tensor:
    """``[V, J]`` (zero-padded to ``prod(Ik)`` rows) -> ``[I1*J1, .., IN*JN]`` in this
    module's index convention."""
    rows, cols = shape
    n = len(rows)
    v_pad = math.prod(rows)
    w = weight
    if w.shape[0] < v_pad:
        w = torch.cat([w, w.new_zeros(v_pad - w.shape[0], w.shape[1])])
    t = w.reshape(*rows, *cols[::-1])  # (i1..iN, jN..j1)
    perm = []
    for k in range(n):
        perm += [k, 2 * n - 1 - k]  # (i1, j1, i2, j2, ...)
    return t.permute(*perm).reshape([rows[k] * cols[k] for k in range(n)])


def _truncated_svd(mat: Tensor, rank: int) -> Tuple[Tensor, Tensor]:
    """``mat ~= left @ right`` with ``left`` having ``rank`` orthonormal columns
    (zero columns when ``mat`` has lower rank)."""
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    k = min(rank, s.shape[0])
    left, right = u[:, :k], s[:k, None] * vh[:k]
    if k < rank:
        left = torch.cat([left, left.new_zeros(left.shape[0], rank - k)], 1)
        right = torch.cat([right, right.new_zeros(rank - k, right.shape[1])], 0)
    return left, right


def tt_svd(weight: Tensor, shape: Shape, ranks: Sequence[int]) -> List[Tensor]:
    """TT-SVD (Oseledets 2011, Alg. 1) of a ``[V, J]`` table into cores of exactly
    ``ranks`` (``R0 = RN = 1``; ranks above what the data needs are zero-padded).

    A sweep of truncated SVDs of the unfoldings; the error obeys
    ``max_k e_k <= ||W - TT|| <= sqrt(sum_k e_k^2)``, ``e_k`` being the best rank-``R_k``
    error of the ``k``-th unfolding. Full ranks reproduce ``W`` to float error."""
    rows, cols = shape
    n = len(rows)
    x = to_modes(weight, shape)
    cores = []
    rest = x.reshape(1, -1)
    for k in range(n - 1):
        mat = rest.reshape(ranks[k] * rows[k] * cols[k], -1)
        left, rest = _truncated_svd(mat, ranks[k + 1])
        cores.append(left.reshape(ranks[k], rows[k], cols[k], ranks[k + 1]))
    cores.append(rest.reshape(ranks[n - 1], rows[-1], cols[-1], 1))
    return cores


def tr_svd(weight: Tensor, shape: Shape, ranks: Sequence[int]) -> List[Tensor]:
    """TR-SVD (Zhao et al. 2016, Alg. 1) of a ``[V, J]`` table into ring cores of
    ``ranks = (R0, .., R_{N-1}, R0)``.

    The first unfolding is truncated to rank ``R0*R1`` and its left factor split into
    ``(R0, R1)``; the ring index ``r0`` is then moved to the end and the remainder is
    decomposed by a TT-SVD sweep ending in ``(R_{N-1}, IN*JN, R0)``. Full ranks reproduce
    ``W`` exactly; the error of a truncation is at least the best rank-``R0*Rk`` error of
    each unfolding (a ring cut at two bonds has that rank)."""
    rows, cols = shape
    n = len(rows)
    x = to_modes(weight, shape)
    r0 = ranks[0]
    modes = [rows[k] * cols[k] for k in range(n)]
    left, rest = _truncated_svd(x.reshape(modes[0], -1), r0 * ranks[1])
    cores = [left.reshape(modes[0], r0, ranks[1]).permute(1, 0, 2)
             .reshape(r0, rows[0], cols[0], ranks[1])]
    # rest [(r0, r1), m2..mN] -> [r1, m2..mN, r0]
    rest = rest.reshape(r0, ranks[1], -1).permute(1, 2, 0).reshape(ranks[1], -1)
    for k in range(1, n - 1):
        mat = rest.reshape(ranks[k] * modes[k], -1)
        left, rest = _truncated_svd(mat, ranks[k + 1])
        cores.append(left.reshape(ranks[k], rows[k], cols[k], ranks[k + 1]))
    cores.append(rest.reshape(ranks[n - 1], rows[-1], cols[-1], r0))
    return [c.contiguous() for c in cores]
