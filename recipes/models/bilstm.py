"""A bidirectional LSTM sentence classifier over a compemb embedding (TT paper, Table 1:
two layers, hidden size 128, dropout 0.5)."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

import compemb

__all__ = ["BiLSTMClassifier"]


class BiLSTMClassifier(nn.Module):
    """Embedding -> ``num_layers`` bidirectional LSTM -> [last forward state; last backward
    state] -> dropout -> linear over ``num_classes``.

    Args:
        vocab_size, embedding_dim: the embedding table, ``V x J``.
        spec: how the table is stored (``compemb.EmbeddingSpec``; ``"dense"`` for the
            baseline).
        hidden_size, num_layers, dropout: the LSTM's.
        num_classes: output classes.

    Padding positions never reach the LSTM (the batch is packed by length), so the
    embedding needs no padding row.
    """

    def __init__(self, vocab_size: int, embedding_dim: int, spec: compemb.EmbeddingSpec,
                 hidden_size: int = 128, num_layers: int = 2, num_classes: int = 2,
                 dropout: float = 0.5) -> None:
        super().__init__()
        # every method starts at nn.Embedding's N(0, 1), the dense table's (compemb.init)
        self.embedding = compemb.build_embedding(spec, vocab_size, embedding_dim, init_std=1.0)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers, batch_first=True,
                            bidirectional=True, dropout=dropout if num_layers > 1 else 0.0)
        self.classifier = nn.Linear(2 * hidden_size, num_classes)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """``ids [B, T]`` (padded), ``lengths [B]`` (>= 1) -> ``logits [B, num_classes]``."""
        x = self.drop(self.embedding(ids))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)  # h: [num_layers * 2, B, H]
        last = torch.cat([h[-2], h[-1]], dim=-1)  # forward and backward of the top layer
        return self.classifier(self.drop(last))
