from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_indices
from ..init import check_init_std


@dataclass(frozen=True)
class DenseConfig:
    """The plain ``nn.Embedding`` table: no settings."""


class DenseEmbedding(nn.Embedding):
    """``nn.Embedding`` (same parameters, same state_dict) with the methods every
    compemb layer has: ``materialize``, ``logits``, ``from_dense``."""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 padding_idx: Optional[int] = None, device=None, dtype=None,
                 init_std: Optional[float] = None) -> None:
        check_init_std(init_std)
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, device=device,
                         dtype=dtype)
        if init_std is not None and init_std != 1.0:  # (N(0, 1): drawn already)
            self.reset_parameters(std=init_std)

    def reset_parameters(self, std: Optional[float] = None) -> None:
        """``N(0, 1)`` as ``nn.Embedding`` (``std=None``), or ``N(0, std^2)`` (the init rule
        of :mod:`compemb.init`); the padding row zero."""
        if std is None:
            super().reset_parameters()
            return
        check_init_std(std, "std")
        with torch.no_grad():
            nn.init.normal_(self.weight, mean=0.0, std=std)
            if self.padding_idx is not None:
                self.weight[self.padding_idx].zero_()

    def materialize(self) -> Tensor:
        """The ``[V, J]`` table."""
        return self.weight

    def forward(self, input: Tensor) -> Tensor:
        """``LongTensor [...] -> [..., J]``, with the indices checked as every compemb
        layer checks them (``ValueError`` for a non-integer tensor, ``IndexError`` naming
        an index out of range)."""
        check_indices(input, self.num_embeddings)
        return super().forward(input)

    def logits(self, hidden: Tensor) -> Tensor:
        """``hidden [..., J] -> [..., V]``; ``ValueError`` for another last dimension."""
        if hidden.shape[-1] != self.embedding_dim:
            raise ValueError(f"hidden has last dimension {hidden.shape[-1]}, expected "
                             f"embedding_dim={self.embedding_dim}")
        return F.linear(hidden, self.weight)

    def storage(self) -> None:
        """``None``: the plain table is not a compressed layer for
        :func:`compemb.compression_report` (its tensors count as the model's others)."""
        return None

    def export(self) -> "DenseEmbedding":
        """The inference form: the layer itself (it stores the table as it is)."""
        return self

    @classmethod
    def from_dense(cls, weight: Tensor, padding_idx: Optional[int] = None) -> "DenseEmbedding":
        """A copy of ``weight [V, J]``, on its device and in its dtype; the padding row
        is zeroed, as every compemb layer's is."""
        if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"weight must be a floating [num_embeddings, embedding_dim] tensor, "
                             f"got {getattr(weight, 'shape', type(weight).__name__)}")
        layer = cls(weight.shape[0], weight.shape[1], padding_idx=padding_idx,
                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if layer.padding_idx is not None:
                layer.weight[layer.padding_idx].zero_()
        return layer
