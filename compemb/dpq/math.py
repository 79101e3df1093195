"""Tensor math of DPQ as pure functions (no parameters, no modules).

Shapes: ``V`` symbols, ``d`` embedding dim, ``D`` groups, ``s = d // D`` sub-vector size,
``Kc`` codes per group, ``G`` = number of codebooks (``D``, or 1 with a shared subspace).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "code_bits", "packed_num_bytes", "pack_codes", "unpack_codes", "unpack_rows",
    "codebook_storage_bytes", "dpq_ratio", "divisors", "check_groups", "kmeans",
    "normalize_scores", "all_reduce_sum", "distributed_world_size", "codebook_index", "codebook_logits",
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
    code table."""
    groups = torch.arange(num_groups, device=rows.device)
    return unpack_codes(packed, bits, rows.to(torch.int64).unsqueeze(-1) * num_groups + groups)


# --------------------------------------------------------------------------- k-means

def kmeans(points: Tensor, num_clusters: int, iters: int = 25, init: str = "kmeans++",
           generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Batched Lloyd k-means: ``points [G, N, s] -> (centroids [G, K, s], assign [G, N])``,
    one independent problem per leading index. ``init`` is ``"kmeans++"`` or ``"random"``
    (distinct points drawn uniformly); deterministic for a given ``generator``. An empty
    cluster keeps its previous centroid. Computed in float32."""
    if init not in ("kmeans++", "random"):
        raise ValueError(f"init must be 'kmeans++' or 'random', got {init!r}")
    x = points.detach().to(torch.float32)
    g, n, _ = x.shape
    if n == 0:
        raise ValueError("kmeans needs at least one point")
    device = x.device
    rows = torch.arange(g, device=device)
    gen_device = generator.device if generator is not None else torch.device("cpu")

    def draw(weights: Tensor) -> Tensor:  # one index per problem, prob ~ weights [G, N]
        w = weights.to(gen_device, torch.float64)
        empty = w.sum(1, keepdim=True) <= 0
        w = torch.where(empty, torch.ones_like(w), w)
        return torch.multinomial(w, 1, generator=generator).squeeze(1).to(device)

    if init == "random":
        if n >= num_clusters:
            noise = torch.rand(g, n, generator=generator, device=gen_device).to(device)
            idx = noise.argsort(dim=1)[:, :num_clusters]
        else:
            idx = torch.randint(n, (g, num_clusters), generator=generator,
                                device=gen_device).to(device)
        centroids = x[rows.unsqueeze(1), idx]
    else:
        centroids = x.new_empty(g, num_clusters, x.shape[2])
        centroids[:, 0] = x[rows, draw(torch.ones(g, n, device=device))]
        best = _sqdist(x, centroids[:, :1]).squeeze(2)
        for k in range(1, num_clusters):
            centroids[:, k] = x[rows, draw(best)]
            best = torch.minimum(best, _sqdist(x, centroids[:, k:k + 1]).squeeze(2))
    assign = _sqdist(x, centroids).argmin(2)
    for _ in range(iters):
        sums = torch.zeros_like(centroids).view(g * num_clusters, -1)
        flat = (assign + rows.unsqueeze(1) * num_clusters).reshape(-1)
        sums.index_add_(0, flat, x.reshape(g * n, -1))
        counts = torch.bincount(flat, minlength=g * num_clusters).to(x.dtype)
        sums = sums.view_as(centroids)
        counts = counts.view(g, num_clusters, 1)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        new = _sqdist(x, centroids).argmin(2)
        if torch.equal(new, assign):
            break
        assign = new
    return centroids, assign


def _sqdist(x: Tensor, c: Tensor) -> Tensor:
    """``[G, N, s], [G, K, s] -> [G, N, K]`` squared distances (clamped at 0)."""
    d = (x * x).sum(-1, keepdim=True) - 2 * x @ c.transpose(1, 2) + (c * c).sum(-1).unsqueeze(1)
    return d.clamp_min_(0)


# --------------------------------------------------------------------------- distance norm

def normalize_scores(scores: Tensor, weights: Optional[Tensor], running_mean: Tensor,
                     running_var: Tensor, training: bool, momentum: float = 0.1,
                     eps: float = 1e-5, sync: bool = False) -> Tensor:
    """Batch normalisation per (group, code) with no scale or shift.

    ``scores [D, U, Kc]`` for ``U`` rows, ``weights [U]`` how many tokens of the
    mini-batch each row stands for (0 drops a row from the statistics), running
    statistics ``[D, Kc]`` (updated in place in training, momentum as in
    ``nn.BatchNorm``, unbiased running variance). In training the statistics are those of
    the weighted rows; with ``sync`` (``torch.distributed`` with several processes) they
    are all-reduced over the default process group, differentiably, as
    ``nn.SyncBatchNorm`` does, so every process normalises by the global batch. In eval
    the running statistics are used. Returns ``[D, U, Kc]`` in the scores' dtype."""
    if not training:
        return (scores - running_mean.unsqueeze(1)) * torch.rsqrt(running_var.unsqueeze(1) + eps)
    w = weights.to(scores.dtype).view(1, -1, 1)
    first = torch.cat([(scores * w).sum(1).reshape(-1), w.sum().reshape(1)])
    if sync:
        first = all_reduce_sum(first)
    count = first[-1]
    mean = (first[:-1] / count.clamp_min(1)).view_as(running_mean)
    dev = scores - mean.unsqueeze(1)
    sq = (dev * dev * w).sum(1)
    if sync:
        sq = all_reduce_sum(sq)
    var = sq / count.clamp_min(1)
    with torch.no_grad():
        seen = count > 0
        unbiased = var * (count / (count - 1).clamp_min(1))
        running_mean.copy_(torch.where(seen, running_mean.lerp(mean.to(running_mean.dtype),
                                                                momentum), running_mean))
        running_var.copy_(torch.where(seen, running_var.lerp(unbiased.to(running_var.dtype),
                                                              momentum), running_var))
    return dev * torch.rsqrt(var + eps).unsqueeze(1)


def all_reduce_sum(t: Tensor) -> Tensor:
    """Differentiable sum over the processes of the default group (the backward sums the
    gradients the same way, as ``nn.SyncBatchNorm`` does)."""
    import torch.distributed as dist
    try:
        import torch.distributed._functional_collectives as funcol
    except ImportError:  # older torch
        import torch.distributed.nn.functional as dist_fn
        return dist_fn.all_reduce(t)
    out = funcol.all_reduce(t, "sum", dist.group.WORLD)
    return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out


def distributed_world_size() -> int:
    """Processes in the default group (1 when ``torch.distributed`` is not in use)."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


# --------------------------------------------------------------------------- lookups

def codebook_index(codes: Tensor, num_codes: int, shared: bool) -> Tensor:
    """Rows of the flattened ``[G*Kc, s]`` value table for codes ``[..., D]``."""
    if shared:
        return codes
    offsets = torch.arange(codes.shape[-1], device=codes.device) * num_codes
    return codes + offsets


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
