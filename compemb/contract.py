"""The contract every compemb layer keeps, written down as a :class:`typing.Protocol`.

A new method (a sub-package registering a ``layer_cls``, see :mod:`compemb.registry`)
implements :class:`EmbeddingLayer`; ``tests/test_contract.py`` checks every registered
method against it, by behaviour, not only by the names. The transformers and fairseq
integrations, :class:`compemb.OutputLayer` and :func:`compemb.compression_report` rely on
nothing else.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

from torch import Tensor, nn

from .report import LayerStorage

__all__ = ["EmbeddingLayer"]


@runtime_checkable
class EmbeddingLayer(Protocol):
    """A ``V x J`` embedding table stored in some compressed form (an ``nn.Module``).

    Attributes:
        num_embeddings: ``V``, the rows (symbols).
        embedding_dim: ``J``, the columns.
        padding_idx: ``None`` or a row in ``[0, V)`` that is always zero (and gets no
            gradient), as in ``nn.Embedding``.

    Construction: ``layer_cls(V, J, **config_fields, padding_idx=..., init_std=...)``
    draws a fresh table (``init_std``: the init rule of :mod:`compemb.init`);
    :meth:`from_dense` starts from a trained one. ``isinstance(x, EmbeddingLayer)``
    checks only that the members exist.
    """

    num_embeddings: int
    embedding_dim: int
    padding_idx: Optional[int]

    def forward(self, input: Tensor) -> Tensor:
        """``LongTensor [...]`` (ids in ``[0, V)``; bad dtype ``ValueError``, out of range
        ``IndexError``) ``-> [..., J]``, the rows of the table (padding row zero), in the
        layer's parameter dtype, without building the ``V x J`` table where avoidable."""
        ...

    def logits(self, hidden: Tensor) -> Tensor:
        """``hidden [..., J] -> [..., V]`` equal to ``hidden @ materialize().T`` (the
        padding column zero); a wrong last dimension is a ``ValueError``. Differentiable
        with respect to the layer's parameters (a tied or untied softmax)."""
        ...

    def materialize(self) -> Tensor:
        """The ``[V, J]`` table the forward reads rows from (padding row zero)."""
        ...

    def storage(self) -> Optional[LayerStorage]:
        """What the layer's inference form stores (:class:`compemb.LayerStorage`, for
        :func:`compemb.compression_report`); ``None`` for the plain dense table, which
        is not reported as compressed."""
        ...

    def reset_parameters(self, std: Optional[float] = None) -> None:
        """A fresh draw: the method's own init (``std=None``), or the init rule of
        :mod:`compemb.init` (the table's rows at std ``std``, the host's dense table's);
        the constructor takes the same as ``init_std``."""
        ...

    def export(self) -> nn.Module:
        """The inference form: a module whose eval ``forward``, ``logits`` and
        ``materialize`` equal this layer's eval ones (DPQ: a ``CodebookEmbedding`` of
        packed codes); the layer itself where training and inference store the same
        tensors (dense, TT, TR)."""
        ...

    @classmethod
    def from_dense(cls, weight: Tensor, *args: Any, padding_idx: Optional[int] = None,
                   **options: Any) -> "EmbeddingLayer":
        """A layer approximating the trained table ``weight [V, J]`` (copy, TT-SVD,
        TR-SVD, k-means) with the method's settings as keywords, on ``weight``'s device
        and with its parameters in ``weight``'s dtype."""
        ...
