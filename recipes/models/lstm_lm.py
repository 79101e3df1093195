"""An LSTM language model whose input embedding and softmax come from compemb."""
from __future__ import annotations

from typing import Optional, Tuple

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
        init_std: std of the dense table's rows at the start (the usual small PTB init);
            every method's table starts at it through the core's init rule
            (``build_embedding(..., init_std=...)``, :mod:`compemb.init`): at the Glorot
            std (0.014 here) a tied TT softmax stayed near the unigram perplexity after an
            epoch (648), at 0.05 it reached 420.
    """

    def __init__(self, vocab_size: int, embedding_dim: int, hidden_size: int, num_layers: int,
                 spec: compemb.EmbeddingSpec, output: str = "tied", dropout: float = 0.3,
                 init_std: float = 0.05) -> None:
        super().__init__()
        if output not in ("tied", "untied", "dense"):
            raise ValueError(f"output must be 'tied', 'untied' or 'dense', got {output!r}")
        self.embedding = _table(spec, vocab_size, embedding_dim, init_std)
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
                _table(spec, vocab_size, embedding_dim, init_std), bias=True, tied=False)

    def forward(self, ids: Tensor, state: Optional[Tuple[Tensor, Tensor]] = None
                ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """``ids [B, T] -> (logits [B, T, V], new LSTM state)``."""
        x = self.drop(self.embedding(ids))
        h, state = self.lstm(x, state)
        return self.output(self.proj(self.drop(h))), state


def _table(spec: compemb.EmbeddingSpec, num_embeddings: int, embedding_dim: int,
           init_std: float) -> nn.Module:
    # the core's one init rule (compemb.init): every method starts at the dense table's std
    return compemb.build_embedding(spec, num_embeddings, embedding_dim, init_std=init_std)
