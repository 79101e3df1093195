"""Tensor math of DPQ as pure functions (no parameters, no modules).

Shapes: ``V`` symbols, ``d`` embedding dim, ``D`` groups, ``s = d // D`` sub-vector size,
``Kc`` codes per group, ``G`` = number of codebooks (``D``, or 1 with a shared subspace).
"""
from __future__ import annotations

import sys
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "code_bits", "packed_num_bytes", "pack_codes", "unpack_codes", "unpack_rows",
    "byte_table", "byte_lookup", "byte_lookup_applies",
    "codebook_storage_bytes", "dpq_ratio", "divisors", "check_groups", "kmeans",
    "batch_moments", "update_running_stats", "normalize_scores", "all_reduce_",
    "distributed_world_size", "codebook_index", "codebook_logits",
]


# --------------------------------------------------------------------------- sizes

def code_bits(num_codes: int) -> int:
    """Bits per stored code: ``ceil(log2(num_codes))`` (2 codes -> 1, 16 -> 4, 17 -> 5)."""
    if num_codes < 2:
        raise ValueError(f"num_codes must be >= 2, got {num_codes}")
    return (num_codes - 1).bit_length()


def packed_num_bytes(num_codes_stored: int, bits: int) -> int:
    """Bytes holding ``num_codes_stored`` codes of ``bits`` bits (rounded up)."""
    return (num_codes_stored * bits + 7) // 8


def codebook_storage_bytes(num_embeddings: int, embedding_dim: int, num_codes: int,
                           num_groups: int, shared_subspace: bool = False,
                           value_bytes: int = 4) -> Tuple[int, int]:
    """``(code_bytes, value_bytes)`` of the inference form: ``V*D`` packed codes of
    ``ceil(log2(Kc))`` bits, and ``G*Kc*(d/D)`` values of ``value_bytes`` each."""
    codes = packed_num_bytes(num_embeddings * num_groups, code_bits(num_codes))
    groups = 1 if shared_subspace else num_groups
    values = groups * num_codes * (embedding_dim // num_groups) * value_bytes
    return codes, values


def dpq_ratio(num_embeddings: int, embedding_dim: int, num_codes: int, num_groups: int,
              shared_subspace: bool = False) -> float:
    """Compression ratio of METHODS.md with float32 values,
    ``32*V*d / (V*D*log2(Kc) + 32*Kc*d)`` (``Kc*d/D`` values with a shared subspace),
    codes rounded up to ``ceil(log2(Kc))`` bits each and to whole bytes in all."""
    codes, values = codebook_storage_bytes(num_embeddings, embedding_dim, num_codes,
                                           num_groups, shared_subspace)
    return 4 * num_embeddings * embedding_dim / (codes + values)


def divisors(n: int) -> List[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def check_groups(embedding_dim: int, num_groups: int) -> None:
    """``ValueError`` suggesting the divisors of ``embedding_dim`` when ``num_groups``
    does not divide it."""
    if embedding_dim % num_groups != 0:
        raise ValueError(
            f"num_groups={num_groups} must divide embedding_dim={embedding_dim}; "
            f"divisors of {embedding_dim} that would work: {divisors(embedding_dim)}")


# --------------------------------------------------------------------------- bit packing

def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes (any shape, values in ``[0, 2**bits)``) row-major into a flat
    ``uint8`` tensor of ``ceil(n*bits/8)`` bytes. Code ``j`` occupies stream bits
    ``[j*bits, (j+1)*bits)``, low bit first; stream bit ``t`` is bit ``t % 8`` of byte
    ``t // 8``."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    flat = codes.reshape(-1).to(torch.int64)
    n = flat.numel()
    out = torch.empty(packed_num_bytes(n, bits), dtype=torch.uint8, device=flat.device)
    shifts = torch.arange(bits, device=flat.device)
    weights = (1 << torch.arange(8, device=flat.device, dtype=torch.int32))
    chunk = 1 << 20  # codes per step (a multiple of 8, so every chunk starts on a byte)
    for start in range(0, n, chunk):
        part = flat[start:start + chunk]
        stream = ((part.unsqueeze(1) >> shifts) & 1).to(torch.int32).reshape(-1)
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        packed = (stream.view(-1, 8) * weights).sum(1).to(torch.uint8)
        first = start * bits // 8
        out[first:first + packed.numel()] = packed
    return out


def unpack_codes(packed: Tensor, bits: int, positions: Tensor) -> Tensor:
    """The codes at flat ``positions`` (any shape, int64) of a stream packed by
    :func:`pack_codes`; returns int64 of the shape of ``positions``. Reads only the
    bytes those codes occupy."""
    offset = positions.to(torch.int64) * bits
    byte = offset >> 3
    shift = (offset & 7).to(torch.int32)
    last = packed.numel() - 1
    word = packed[byte].to(torch.int32)
    for k in range(1, (7 + bits + 7) // 8):  # further bytes a code can straddle
        word = word | (packed[(byte + k).clamp_max(last)].to(torch.int32) << (8 * k))
    return ((word >> shift) & ((1 << bits) - 1)).to(torch.int64)


def unpack_rows(packed: Tensor, bits: int, num_groups: int, rows: Tensor) -> Tensor:
    """Codes ``[..., D]`` of the given symbol ``rows [...]`` from the packed ``[V, D]``
    code table (integer dtype: ``uint8`` where the width allows, else ``int64``).

    When a row fills whole bytes (``D*bits % 8 == 0``) the rows' bytes are gathered
    first (one ``index_select`` of ``D*bits/8``-byte rows) and split with shifts common
    to all rows; otherwise each code is read at its bit offset (:func:`unpack_codes`)."""
    mask = (1 << bits) - 1
    row_bytes = num_groups * bits // 8
    if (num_groups * bits) % 8 == 0 and 8 % bits == 0:  # 1, 2, 4, 8 bits: no straddling
        data = _row_bytes(packed, row_bytes, rows)  # [N, R] uint8
        if bits == 8:
            return data.view(*rows.shape, num_groups)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = (data.unsqueeze(-1) >> shifts) & mask  # [N, R, 8/bits]
        return codes.view(*rows.shape, num_groups)
    if num_groups % 8 == 0 and bits <= 8:  # 8 codes fill ``bits`` bytes: 64-bit words
        data = _row_bytes(packed, row_bytes, rows).view(-1, num_groups // 8, bits)
        if sys.byteorder == "little":  # the 8 codes' bytes, zero-padded, read as one int64
            word = F.pad(data, (0, 8 - bits)).view(torch.int64)  # [N, D/8, 1]
        else:
            word = data[..., :1].to(torch.int64)
            for k in range(1, bits):
                word = word | (data[..., k:k + 1].to(torch.int64) << (8 * k))
        shifts = torch.arange(0, 8 * bits, bits, device=packed.device)
        codes = (word >> shifts) & mask  # [N, D/8, 8]
        return codes.view(*rows.shape, num_groups)
    groups = torch.arange(num_groups, device=rows.device)
    return unpack_codes(packed, bits, rows.to(torch.int64).unsqueeze(-1) * num_groups + groups)


def _row_bytes(packed: Tensor, row_bytes: int, rows: Tensor) -> Tensor:
    """The packed bytes of symbols ``rows [...]``: ``uint8 [N, row_bytes]`` (one
    ``index_select``, cheaper than advanced indexing)."""
    return packed.view(-1, row_bytes).index_select(0, rows.reshape(-1))


def byte_table(values: Tensor, num_groups: int, bits: int) -> Tensor:
    """For widths ``bits`` in 1, 2, 4 (several codes per byte, none straddling): the
    table ``[R*256, (8/bits)*s]`` whose row ``j*256 + b`` is the concatenation of the
    value rows that byte value ``b`` selects in the ``j``-th byte of a symbol's packed
    codes (``R = D*bits/8`` bytes per symbol). A lookup then reads one row per byte
    instead of one per code, without unpacking. Built from ``values [G, Kc, s]`` by one
    gather (``256*d`` numbers; differentiable); codes past ``Kc - 1`` (unused byte
    values) are clamped."""
    per = 8 // bits
    num_books, num_codes, sub = values.shape
    row_bytes = num_groups * bits // 8
    device = values.device
    byte = torch.arange(256, device=device)
    slot = torch.arange(per, device=device)
    codes = ((byte.unsqueeze(1) >> (slot * bits)) & ((1 << bits) - 1)).clamp_max(num_codes - 1)
    groups = torch.arange(row_bytes, device=device).unsqueeze(1) * per + slot  # [R, per]
    book = groups if num_books > 1 else torch.zeros_like(groups)
    index = book.unsqueeze(1) * num_codes + codes  # [R, 256, per]
    rows = F.embedding(index, values.reshape(-1, sub))  # [R, 256, per, s]
    return rows.reshape(row_bytes * 256, per * sub)


def byte_lookup(packed: Tensor, table: Tensor, num_groups: int, bits: int,
                rows: Tensor) -> Tensor:
    """Rows ``[..., d]`` of symbols ``rows [...]`` through :func:`byte_table`."""
    row_bytes = num_groups * bits // 8
    data = _row_bytes(packed, row_bytes, rows)  # [N, R] uint8
    offsets = torch.arange(row_bytes, device=packed.device, dtype=torch.int32) * 256
    out = F.embedding(torch.add(data, offsets), table)  # [N, R, per*s]; int32 indices
    return out.reshape(*rows.shape, -1)


def byte_lookup_applies(num_groups: int, bits: int) -> bool:
    return bits < 8 and 8 % bits == 0 and (num_groups * bits) % 8 == 0


# --------------------------------------------------------------------------- k-means

def kmeans(points: Tensor, num_clusters: int, iters: int = 25, init: str = "kmeans++",
           generator: Optional[torch.Generator] = None,
           weights: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Batched Lloyd k-means: ``points [G, N, s] -> (centroids [G, K, s], assign [G, N])``,
    one independent problem per leading index. ``init`` is ``"kmeans++"`` or ``"random"``
    (distinct points drawn uniformly); deterministic for a given ``generator`` (default:
    a fresh one seeded 0). An empty cluster keeps its previous centroid. Computed in
    float32.

    ``weights [N]`` (>= 0, shared by the ``G`` problems): weighted k-means, minimising
    ``sum_i w_i ||x_i - c(x_i)||^2``; centroids are weighted means and k-means++ draws
    seeds with probability ``w_i * D(x_i)^2``. A point of weight 0 takes no part in the
    fit but still gets its nearest centroid."""
    if init not in ("kmeans++", "random"):
        raise ValueError(f"init must be 'kmeans++' or 'random', got {init!r}")
    x = points.detach().to(torch.float32)
    g, n, _ = x.shape
    if n == 0:
        raise ValueError("kmeans needs at least one point")
    if weights is not None:
        if weights.shape != (n,) or not bool((weights >= 0).all()) or not float(weights.sum()) > 0:
            raise ValueError(f"weights must be a tensor [{n}] of non-negative numbers with a "
                             f"positive sum (one per point), got shape {tuple(weights.shape)}")
        weights = weights.detach().to(device=x.device, dtype=torch.float32)
    device = x.device
    rows = torch.arange(g, device=device)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    gen_device = generator.device

    def draw(weights: Tensor) -> Tensor:  # one index per problem, prob ~ weights [G, N]
        w = weights.to(gen_device, torch.float64)
        empty = w.sum(1, keepdim=True) <= 0
        w = torch.where(empty, torch.ones_like(w), w)
        return torch.multinomial(w, 1, generator=generator).squeeze(1).to(device)

    if init == "random":
        if weights is not None:  # distinct points, drawn with probability ~ weight
            w = weights.to(gen_device, torch.float64).unsqueeze(0).expand(g, n)
            idx = torch.multinomial(w, min(num_clusters, int((weights > 0).sum())),
                                    generator=generator).to(device)
            if idx.shape[1] < num_clusters:  # fewer weighted points than clusters
                idx = idx.repeat(1, -(-num_clusters // idx.shape[1]))[:, :num_clusters]
        elif n >= num_clusters:
            noise = torch.rand(g, n, generator=generator, device=gen_device).to(device)
            idx = noise.argsort(dim=1)[:, :num_clusters]
        else:
            idx = torch.randint(n, (g, num_clusters), generator=generator,
                                device=gen_device).to(device)
        centroids = x[rows.unsqueeze(1), idx]
    else:  # k-means++ seeding, on a random subset of the points when there are many
        seed = x
        seed_w = None if weights is None else weights.unsqueeze(0).expand(g, n)
        if n > max(4096, 16 * num_clusters):
            noise = torch.rand(g, n, generator=generator, device=gen_device).to(device)
            keep = noise.argsort(dim=1)[:, :max(4096, 16 * num_clusters)]
            seed = x[rows.unsqueeze(1), keep]
            seed_w = None if weights is None else weights[keep]
        norms = (seed * seed).sum(-1)  # [G, n']
        if seed_w is None:
            seed_w = torch.ones_like(norms)
        centroids = x.new_empty(g, num_clusters, x.shape[2])
        centroids[:, 0] = seed[rows, draw(seed_w)]

        def sqdist_to(c: Tensor) -> Tensor:  # [G, s] -> [G, n']
            dots = torch.matmul(seed, c.unsqueeze(2)).squeeze(2)
            return (norms - 2 * dots + (c * c).sum(-1, keepdim=True)).clamp_min_(0)

        best = sqdist_to(centroids[:, 0])
        for k in range(1, num_clusters):
            centroids[:, k] = seed[rows, draw(best * seed_w)]
            best = torch.minimum(best, sqdist_to(centroids[:, k]))
    assign = _nearest(x, centroids)
    for _ in range(iters):
        sums = torch.zeros_like(centroids).view(g * num_clusters, -1)
        flat = (assign + rows.unsqueeze(1) * num_clusters).reshape(-1)
        if weights is None:
            sums.index_add_(0, flat, x.reshape(g * n, -1))
            counts = torch.bincount(flat, minlength=g * num_clusters).to(x.dtype)
        else:
            w = weights.repeat(g)
            sums.index_add_(0, flat, x.reshape(g * n, -1) * w.unsqueeze(1))
            counts = torch.bincount(flat, weights=w, minlength=g * num_clusters).to(x.dtype)
        sums = sums.view_as(centroids)
        counts = counts.view(g, num_clusters, 1)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        new = _nearest(x, centroids)
        if torch.equal(new, assign):
            break
        assign = new
    return centroids, assign


def _nearest(x: Tensor, c: Tensor, block: int = 1 << 22) -> Tensor:
    """``[G, N, s], [G, K, s] -> [G, N]`` index of the nearest centroid (argmin of
    ``||c||^2 - 2 x.c``), over blocks of points so that no ``[G, N, K]`` table is built."""
    step = max(1, block // max(1, x.shape[0] * c.shape[1]))
    c_sq = (c * c).sum(-1).unsqueeze(1)  # [G, 1, K]
    ct = c.transpose(1, 2)
    return torch.cat([torch.baddbmm(c_sq, x[:, i:i + step], ct, alpha=-2).argmin(2)
                      for i in range(0, x.shape[1], step)], dim=1)


# --------------------------------------------------------------------------- distance norm

@torch.no_grad()
def batch_moments(scores: Tensor, weights: Tensor, sync: bool = False, group: Any = None
                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """Weighted mean and (biased) variance over rows, per (group, code):
    ``scores [D, U, Kc]``, ``weights [U]`` (tokens each row stands for; 0 leaves a row
    out) ``-> (mean [D, Kc], var [D, Kc], count [])``. Two passes (mean, then squared
    deviations) for accuracy. With ``sync`` the sums are all-reduced over ``group``
    (``None``: the default process group) first, so every process of the group gets the
    statistics of the group's batch (a collective: every process of it must call this)."""
    w = weights.to(scores.dtype)
    first = torch.cat([torch.matmul(w, scores).reshape(-1), w.sum().reshape(1)])
    if sync:
        all_reduce_(first, group)
    count = first[-1]
    mean = (first[:-1] / count.clamp_min(1)).view(scores.shape[0], scores.shape[2])
    dev = scores - mean.unsqueeze(1)
    sq = torch.matmul(w, dev.mul_(dev))
    if sync:
        all_reduce_(sq, group)
    return mean, sq / count.clamp_min(1), count


@torch.no_grad()
def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         count: Tensor, momentum: float) -> None:
    """``nn.BatchNorm``-style update in place (unbiased variance); no change when the batch
    had no tokens. No host sync."""
    seen = count > 0
    unbiased = var * (count / (count - 1).clamp_min(1))
    running_mean.copy_(torch.where(seen, running_mean.lerp(mean.to(running_mean.dtype), momentum),
                                   running_mean))
    running_var.copy_(torch.where(seen, running_var.lerp(unbiased.to(running_var.dtype), momentum),
                                  running_var))


@torch.no_grad()
def normalize_scores(scores: Tensor, weights: Optional[Tensor], running_mean: Tensor,
                     running_var: Tensor, training: bool, momentum: float = 0.1,
                     eps: float = 1e-5, sync: bool = False, group: Any = None) -> Tensor:
    """Distance normalisation: batch normalisation per (group, code), no scale or shift
    (not differentiable: for the argmax; the SX backward is written out in
    ``compemb.dpq.layer``).

    ``scores [D, U, Kc]`` for ``U`` rows, ``weights [U]`` how many tokens of the
    mini-batch each row stands for, running statistics ``[D, Kc]``. In training the
    batch statistics (:func:`batch_moments`, all-reduced with ``sync``) normalise and
    update the running ones in place (momentum as in ``nn.BatchNorm``); in eval the
    running statistics are used. Returns a new ``[D, U, Kc]`` tensor."""
    if training:
        mean, var, count = batch_moments(scores, weights, sync, group)
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
    else:
        mean, var = running_mean.to(scores.dtype), running_var.to(scores.dtype)
    return (scores - mean.unsqueeze(1)).mul_(torch.rsqrt(var + eps).unsqueeze(1))


def all_reduce_(t: Tensor, group: Any = None) -> Tensor:
    """Sum ``t`` in place over the processes of ``group`` (``None``: the default group);
    not differentiable."""
    import torch.distributed as dist
    dist.all_reduce(t, group=group)
    return t


def distributed_world_size(group: Any = None) -> int:
    """Processes in ``group`` (``None``: the default group); 1 when ``torch.distributed``
    is not in use, and when this process is not a member of ``group``."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return max(1, dist.get_world_size(group))


# --------------------------------------------------------------------------- lookups

def codebook_index(codes: Tensor, num_codes: int, shared: bool) -> Tensor:
    """Rows of the flattened ``[G*Kc, s]`` value table for codes ``[..., D]`` (int32 for
    ``uint8`` codes: half the bytes of int64, and an embedding takes either)."""
    if shared:
        return codes.long()
    offsets = torch.arange(codes.shape[-1], device=codes.device, dtype=torch.int32) * num_codes
    return torch.add(codes, offsets)  # promotes uint8 codes to int32 in the same pass


def codebook_logits(hidden: Tensor, values: Tensor, codes: Tensor, tile: int = 1024) -> Tensor:
    """``hidden [M, d] -> logits [M, V]`` of the table ``concat_g values[g, codes[:, g]]``
    without building it: per-group products ``P = hidden_g @ values_g^T [D, M, Kc]``,
    then ``logits[:, v] = sum_g P[g, :, codes[v, g]]``: an embedding bag (sum) over the
    rows of ``P`` laid out as ``[D*Kc, M]``, ``tile`` symbols at a time written into the
    ``[M, V]`` result. ``values [G, Kc, s]`` (``G`` = 1: shared by all groups),
    ``codes [V, D]``. Cost ``M*Kc*d`` multiply-adds plus ``M*V*D`` adds (a dense GEMM:
    ``M*V*d``)."""
    m = hidden.shape[0]
    num_codes, sub = values.shape[1], values.shape[2]
    num_symbols, num_groups = codes.shape
    h = hidden.reshape(m, num_groups, sub).transpose(0, 1)  # [D, M, s]
    prod = torch.matmul(h, values.transpose(1, 2))  # [D, M, Kc]
    table = prod.transpose(1, 2).reshape(num_groups * num_codes, m)  # [D*Kc, M]
    index = codes + torch.arange(num_groups, device=codes.device) * num_codes
    if num_symbols <= tile:
        return F.embedding_bag(index, table, mode="sum").t().contiguous()
    out = hidden.new_empty(m, num_symbols, dtype=table.dtype)
    for start in range(0, num_symbols, tile):
        out[:, start:start + tile] = F.embedding_bag(index[start:start + tile], table,
                                                     mode="sum").t()
    return out
