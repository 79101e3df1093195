"""An LSTM language model whose input embedding and softmax come from compemb."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

import compemb

__all__ = ["LSTMLanguageModel"]


class LSTMLanguageModel(nn.Module):
    """Embedding -> LSTM -> (projection) -> softmax over the vocabulary.

    Args:
        vocab_size, embedding_dim, hidden_size, num_layers, dropout: the usual.
        spec: how the input embedding is stored (``EmbeddingSpec``; ``"dense"`` for the
            baseline).
        output: ``"tied"`` (the softmax uses the input embedding's table), ``"untied"``
            (a second table built from the same spec), ``"dense"`` (a plain Linear).
    """

    def __init__(self, vocab_size: int, embedding_dim: int, hidden_size: int, num_layers: int,
                 spec: compemb.EmbeddingSpec, output: str = "tied", dropout: float = 0.3) -> None:
        super().__init__()
        if output not in ("tied", "untied", "dense"):
            raise ValueError(f"output must be 'tied', 'untied' or 'dense', got {output!r}")
        self.embedding = compemb.build_embedding(spec, vocab_size, embedding_dim)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.proj = (nn.Linear(hidden_size, embedding_dim, bias=False)
                     if hidden_size != embedding_dim and output != "dense" else nn.Identity())
        if output == "dense":
            self.output: nn.Module = nn.Linear(hidden_size, vocab_size)
        elif output == "tied":
            self.output = compemb.OutputLayer(self.embedding, bias=True)
        else:
            self.output = compemb.OutputLayer(
                compemb.build_embedding(spec, vocab_size, embedding_dim), bias=True, tied=False)

    def forward(self, ids: Tensor, state: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """``ids [B, T] -> (logits [B, T, V], new LSTM state)``."""
        x = self.drop(self.embedding(ids))
        h, state = self.lstm(x, state)
        return self.output(self.proj(self.drop(h))), state
