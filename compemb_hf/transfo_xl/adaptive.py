"""Adaptive input and adaptive softmax of Baevski & Auli (2019), as Transformer-XL uses them.

The vocabulary ``[0, V)`` is split by ``cutoffs = [c_1, ..., c_n]`` into a head
``[0, c_1)`` and tail clusters ``[c_i, c_{i+1})`` (``c_{n+1} = V``). With ``div_val > 1``
cluster ``i`` has its own table of width ``d_embed // div_val**i`` and a projection to
``d_proj``; with ``div_val == 1`` there is one ``V x d_embed`` table, sliced per cluster
(and one projection, or none when ``d_embed == d_proj``). ``cutoffs=[]`` and
``div_val=1`` is a plain embedding and a full softmax.

The parameter names (``emb_layers.i.weight``, ``emb_projs.i``, ``out_layers.i.weight`` /
``.bias``, ``out_projs.i``, ``cluster_weight``, ``cluster_bias``) are those of the
transformers 4.x ``TransfoXLLMHeadModel`` state_dict.

A cluster's table may be any compemb layer (``emb_layers[i]``: a module with
``forward(indices) -> [..., d_i]`` and ``num_embeddings``); a cluster's softmax weights
may be an ``nn.Linear`` or a :class:`compemb.OutputLayer` (tied to the input table, or a
compressed table of its own), see :func:`output_weight`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compemb.output import forward_method

__all__ = [
    "cluster_bounds", "cluster_dims", "check_cutoffs", "AdaptiveEmbedding",
    "ProjectedAdaptiveLogSoftmax", "output_weight",
]


def check_cutoffs(cutoffs: Sequence[int], vocab_size: int, d_embed: int, div_val: int) -> None:
    """``ValueError`` naming the argument when the clusters do not fit the vocabulary."""
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    cutoffs = list(cutoffs)
    if any(not isinstance(c, int) for c in cutoffs):
        raise ValueError(f"cutoffs must be a list of ints, got {cutoffs!r}")
    if any(c <= 0 or c >= vocab_size for c in cutoffs) or any(
            a >= b for a, b in zip(cutoffs, cutoffs[1:])):
        raise ValueError(
            f"cutoffs must be strictly increasing ints strictly between 0 and "
            f"vocab_size={vocab_size} (e.g. [{max(1, vocab_size // 4)}]), or [] for a full "
            f"softmax; got {cutoffs}")
    if not isinstance(div_val, int) or div_val < 1:
        raise ValueError(f"div_val must be an int >= 1, got {div_val!r}")
    if d_embed // (div_val ** len(cutoffs)) < 1:
        raise ValueError(
            f"div_val={div_val} with {len(cutoffs)} cutoffs leaves the last cluster a width of "
            f"d_embed // div_val**{len(cutoffs)} = 0 (d_embed={d_embed}); use a smaller div_val "
            f"or fewer cutoffs")


def cluster_bounds(cutoffs: Sequence[int], vocab_size: int) -> List[Tuple[int, int]]:
    """``[(start, end), ...]``: the token range of the head and of each tail cluster."""
    ends = [0] + list(cutoffs) + [vocab_size]
    return [(ends[i], ends[i + 1]) for i in range(len(ends) - 1)]


def cluster_dims(d_embed: int, div_val: int, num_clusters: int) -> List[int]:
    """Table width of each cluster: ``d_embed // div_val**i``."""
    return [d_embed // (div_val ** i) for i in range(num_clusters)]


def _set_clusters(module: nn.Module, vocab_size: int, d_embed: int, d_proj: int,
                  cutoffs: Sequence[int], div_val: int) -> None:
    """Checks the cluster settings and stores them on ``module``."""
    check_cutoffs(cutoffs, vocab_size, d_embed, div_val)
    module.n_token, module.d_embed, module.d_proj, module.div_val = vocab_size, d_embed, d_proj, div_val
    module.cutoffs = list(cutoffs)
    module.bounds = cluster_bounds(cutoffs, vocab_size)


def _project(x: Tensor, proj: Optional[Tensor]) -> Tensor:
    """``x [..., d_i] -> [..., d_proj]`` with ``proj [d_proj, d_i]`` (identity if None)."""
    return x if proj is None else F.linear(x, proj)


class AdaptiveEmbedding(nn.Module):
    """Adaptive input: ``forward(LongTensor[...]) -> [..., d_proj]``, scaled by
    ``sqrt(d_proj)``.

    Args:
        vocab_size: ``V``.
        d_embed: width of the head table.
        d_proj: model width.
        cutoffs: cluster boundaries (see the module docstring).
        div_val: width divisor from one cluster to the next.
    """

    def __init__(self, vocab_size: int, d_embed: int, d_proj: int, cutoffs: Sequence[int],
                 div_val: int = 1) -> None:
        super().__init__()
        _set_clusters(self, vocab_size, d_embed, d_proj, cutoffs, div_val)
        self.emb_scale = d_proj ** 0.5
        self.emb_layers = nn.ModuleList()
        self.emb_projs = nn.ParameterList()
        if div_val == 1:
            self.emb_layers.append(nn.Embedding(vocab_size, d_embed))
            if d_proj != d_embed:
                self.emb_projs.append(nn.Parameter(torch.empty(d_proj, d_embed)))
        else:
            for (start, end), d_i in zip(self.bounds, cluster_dims(d_embed, div_val, len(self.bounds))):
                self.emb_layers.append(nn.Embedding(end - start, d_i))
                self.emb_projs.append(nn.Parameter(torch.empty(d_proj, d_i)))

    def proj(self, i: int) -> Optional[Tensor]:
        return self.emb_projs[i] if i < len(self.emb_projs) else None

    def forward(self, input_ids: Tensor) -> Tensor:
        if self.div_val == 1:
            out = _project(self.emb_layers[0](input_ids), self.proj(0))
        else:
            flat = input_ids.reshape(-1)
            dtype = self.emb_projs[0].dtype
            out = flat.new_zeros((flat.numel(), self.d_proj), dtype=dtype)
            for i, (start, end) in enumerate(self.bounds):
                # every cluster computes on all positions (clamped indices) and a mask
                # keeps its own: no host sync, fixed shapes
                in_cluster = (flat >= start) & (flat < end)
                local = (flat - start).clamp(0, end - start - 1)
                emb_i = _project(self.emb_layers[i](local), self.emb_projs[i]).to(dtype)
                out = out + emb_i * in_cluster.unsqueeze(-1).to(dtype)
            out = out.view(*input_ids.shape, self.d_proj)
        return out * self.emb_scale


def output_weight(layer: nn.Module) -> Tuple[Tensor, Optional[Tensor]]:
    """``(weight [V_i, d_i], bias [V_i] | None)`` of a softmax layer: ``nn.Linear`` or
    :class:`compemb.OutputLayer` (whose table is materialised)."""
    if isinstance(layer, nn.Linear):
        return layer.weight, layer.bias
    table = getattr(layer, "table", None)
    if table is None or not hasattr(table, "materialize"):
        raise TypeError(f"a softmax layer must be nn.Linear or compemb.OutputLayer, got "
                        f"{type(layer).__name__}")
    weight = table.weight if isinstance(table, nn.Embedding) else forward_method(table, "materialize")()
    return weight, layer.bias


class ProjectedAdaptiveLogSoftmax(nn.Module):
    """Adaptive softmax with projections.

    ``forward(hidden [N, d_proj]) -> log-probabilities [N, V]``;
    ``forward(hidden [N, d_proj], target [N]) -> negative log-likelihood [N]`` (0 where
    ``target == -100``), in the order of the rows.
    """

    def __init__(self, vocab_size: int, d_embed: int, d_proj: int, cutoffs: Sequence[int],
                 div_val: int = 1) -> None:
        super().__init__()
        _set_clusters(self, vocab_size, d_embed, d_proj, cutoffs, div_val)
        self.n_clusters = len(self.cutoffs)
        self.shortlist_size = self.bounds[0][1]
        if self.n_clusters > 0:
            self.cluster_weight = nn.Parameter(torch.zeros(self.n_clusters, d_embed))
            self.cluster_bias = nn.Parameter(torch.zeros(self.n_clusters))
        self.out_layers = nn.ModuleList()
        self.out_projs = nn.ParameterList()
        if div_val == 1:
            for _ in self.bounds:
                self.out_projs.append(nn.Parameter(torch.empty(d_proj, d_embed))
                                      if d_proj != d_embed else None)
            self.out_layers.append(nn.Linear(d_embed, vocab_size))
        else:
            for (start, end), d_i in zip(self.bounds, cluster_dims(d_embed, div_val, len(self.bounds))):
                self.out_projs.append(nn.Parameter(torch.empty(d_proj, d_i)))
                self.out_layers.append(nn.Linear(d_i, end - start))

    def _cluster_logits(self, i: int, hidden: Tensor, shared: Optional[tuple] = None) -> Tensor:
        """Logits of cluster ``i``'s tokens: ``hidden [N, d_proj] -> [N, V_i]``.
        ``shared``: ``output_weight(out_layers[0])`` when ``div_val == 1`` with clusters
        (one table sliced per cluster; materialised once per forward)."""
        proj = self.out_projs[i]
        x = hidden if proj is None else hidden @ proj  # [N, d_i]
        if self.div_val == 1:
            if self.n_clusters == 0:
                return self.out_layers[0](x)
            start, end = self.bounds[i]
            weight, bias = shared if shared is not None else output_weight(self.out_layers[0])
            return F.linear(x, weight[start:end], None if bias is None else bias[start:end])
        return self.out_layers[i](x)

    def _shared_weight(self) -> Optional[tuple]:
        if self.div_val == 1 and self.n_clusters > 0:
            return output_weight(self.out_layers[0])
        return None

    def _head_logprob(self, hidden: Tensor, shared: Optional[tuple] = None) -> Tensor:
        """``[N, shortlist + n_clusters]``: head tokens, then one entry per tail cluster."""
        logits = self._cluster_logits(0, hidden, shared)
        if self.n_clusters > 0:
            proj = self.out_projs[0]
            x = hidden if proj is None else hidden @ proj
            logits = torch.cat([logits, F.linear(x, self.cluster_weight, self.cluster_bias)], -1)
        return F.log_softmax(logits.float(), dim=-1)

    def forward(self, hidden: Tensor, target: Optional[Tensor] = None) -> Tensor:
        if hidden.dim() != 2 or hidden.shape[-1] != self.d_proj:
            raise ValueError(f"hidden must be [N, d_proj={self.d_proj}], got {tuple(hidden.shape)}")
        shared = self._shared_weight()
        head = self._head_logprob(hidden, shared)
        if target is None:
            parts = [head[:, :self.shortlist_size]]
            for i in range(1, len(self.bounds)):
                tail = F.log_softmax(self._cluster_logits(i, hidden, shared).float(), dim=-1)
                parts.append(head[:, self.shortlist_size + i - 1, None] + tail)
            return torch.cat(parts, dim=-1)
        if target.shape != hidden.shape[:1]:
            raise ValueError(f"target must be [N={hidden.shape[0]}], got {tuple(target.shape)}")
        valid = target != -100
        safe = torch.where(valid, target, torch.zeros_like(target))
        start, end = self.bounds[0]
        in_head = safe < end
        nll = -head.gather(1, safe.clamp(max=end - 1).unsqueeze(1)).squeeze(1)
        nll = torch.where(in_head, nll, torch.zeros_like(nll))
        for i in range(1, len(self.bounds)):
            start, end = self.bounds[i]
            rows = ((safe >= start) & (safe < end)).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            tail = F.log_softmax(self._cluster_logits(i, hidden.index_select(0, rows), shared).float(), -1)
            lp = head.index_select(0, rows)[:, self.shortlist_size + i - 1] + tail.gather(
                1, (safe.index_select(0, rows) - start).unsqueeze(1)).squeeze(1)
            nll = nll.index_copy(0, rows, -lp)
        return torch.where(valid, nll, torch.zeros_like(nll))
