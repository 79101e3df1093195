"""The output (softmax) layer over a vocabulary, from any embedding layer."""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OutputLayer", "embedding_logits", "forward_method"]


def forward_method(module: nn.Module, name: str):
    """``module.<name>`` (e.g. ``logits``, ``materialize``), made safe to call outside
    ``module.forward`` when ``module`` is an FSDP2 unit of its own (``fully_shard(module)``,
    as a size-based wrap policy does to a large table).

    FSDP2 gathers a unit's parameters only around its ``forward``; a tied softmax calls the
    input table's ``logits`` from another module, where the parameters would still be
    shards. The method is registered once with
    ``torch.distributed.fsdp.register_fsdp_forward_method``, so that FSDP gathers the
    parameters before it and reduce-scatters their gradients after the backward, as for
    ``forward``. Anything else (no FSDP, or the table inside a larger unit, whose forward
    is running) gets the method unchanged.
    """
    # a module can only be an FSDP unit once FSDP is imported: no import (0.7 s) otherwise
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and isinstance(module, fsdp.FSDPModule) and name not in vars(module):
        fsdp.register_fsdp_forward_method(module, name)
    return getattr(module, name)


def embedding_logits(embedding: nn.Module, hidden: Tensor) -> Tensor:
    """``hidden [..., J] @ table.T -> [..., V]`` for a compemb layer (its own ``logits``,
    which avoids building the table where that is cheaper) or a plain ``nn.Embedding``."""
    if hasattr(embedding, "logits"):
        return forward_method(embedding, "logits")(hidden)
    if isinstance(embedding, nn.Embedding):
        return F.linear(hidden, embedding.weight)
    raise TypeError(
        f"OutputLayer needs an embedding with a .logits(hidden) method or an nn.Embedding, "
        f"got {type(embedding).__name__}"
    )


class OutputLayer(nn.Module):
    """Logits over the vocabulary from an embedding table: ``hidden @ W.T (+ bias)``.

    Args:
        embedding: the table (``TTEmbedding``, ``TREmbedding``, ``DPQEmbedding``,
            ``CodebookEmbedding`` or ``nn.Embedding``).
        bias: add a learned bias of size ``num_embeddings``.
        tied: ``True`` (default) when ``embedding`` is the model's input embedding,
            registered elsewhere in the model: it is only referenced here, so the model's
            ``state_dict`` holds its parameters once. ``False`` for a table of the head's
            own (untied softmax): it is registered here as ``self.embedding``.

    ``forward(hidden [..., J]) -> [..., V]``.
    """

    def __init__(self, embedding: nn.Module, bias: bool = False, tied: bool = True) -> None:
        super().__init__()
        if not isinstance(embedding, nn.Module):
            raise TypeError(f"embedding must be an nn.Module, got {type(embedding).__name__}")
        num_embeddings = getattr(embedding, "num_embeddings", None)
        if num_embeddings is None:
            raise TypeError(f"embedding {type(embedding).__name__} has no num_embeddings")
        self.tied = bool(tied)
        if self.tied:
            self._tied = [embedding]  # a plain list: not a sub-module, not in state_dict
        else:
            self.embedding = embedding
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding.embedding_dim
        self.bias = nn.Parameter(torch.zeros(num_embeddings)) if bias else None

    @property
    def table(self) -> nn.Module:
        """The embedding layer whose table gives the logits."""
        return self._tied[0] if self.tied else self.embedding

    def forward(self, hidden: Tensor) -> Tensor:
        if hidden.shape[-1] != self.embedding_dim:
            raise ValueError(f"hidden has last dimension {hidden.shape[-1]}, the output layer "
                             f"expects embedding_dim={self.embedding_dim}")
        out = embedding_logits(self.table, hidden)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (f"{self.embedding_dim} -> {self.num_embeddings}, tied={self.tied}, "
                f"bias={self.bias is not None}")
