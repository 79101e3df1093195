"""An MLP click-through-rate model over hashed categorical features whose embedding table
comes from compemb (TT paper, Table 4: per-feature embeddings, concatenated, then fully
connected ReLU layers)."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

import compemb

__all__ = ["CTRMLP"]


class CTRMLP(nn.Module):
    """One shared ``buckets x embedding_dim`` table for all fields (the hashing trick) ->
    concatenation of the ``num_fields`` embeddings -> Linear+ReLU+Dropout per entry of
    ``hidden`` -> one logit.

    Args:
        num_fields: features per row, ``F``.
        buckets, embedding_dim: the table, ``V x J``.
        spec: how the table is stored (``compemb.EmbeddingSpec``).
        hidden: sizes of the fully connected layers.
        dropout: after every hidden layer.
    """

    def __init__(self, num_fields: int, buckets: int, embedding_dim: int, spec: compemb.EmbeddingSpec,
                 hidden: Sequence[int] = (256, 128), dropout: float = 0.1) -> None:
        super().__init__()
        # every method starts at nn.Embedding's N(0, 1), the dense table's (compemb.init)
        self.embedding = compemb.build_embedding(spec, buckets, embedding_dim, init_std=1.0)
        layers = []
        width = num_fields * embedding_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, ids: Tensor) -> Tensor:
        """``ids [B, F]`` (bucket ids) -> ``logits [B]``."""
        return self.mlp(self.embedding(ids).flatten(1)).squeeze(-1)
