"""One declarative spec for every compressed layer, and the factory that builds it.

The Hugging Face config (``compemb_hf.CompressedEmbeddingConfig``) and the fairseq flags
(``--emb-method``, ``--emb-rank`` ...) both map onto :class:`EmbeddingSpec`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from torch import Tensor, nn

from .registry import get_method

__all__ = ["EmbeddingSpec", "build_embedding", "compress_embedding"]


@dataclass(frozen=True, eq=False)
class EmbeddingSpec:
    """Which method compresses a table, and with which settings.

    Attributes:
        method: a registered method name: ``"dense"``, ``"tt"``, ``"tr"``, ``"dpq"``
            (see :func:`compemb.available_methods`).
        options: the method's settings, named as the keywords of its layer
            (``{"rank": 16, "num_factors": 3}`` for ``"tt"``; ``{"num_codes": 32,
            "num_groups": 64, "variant": "vq"}`` for ``"dpq"``). Validated on creation by
            the method's config dataclass (``compemb.tt.TTConfig`` ...).

    ``EmbeddingSpec.from_dict({"method": "tt", "rank": 16})`` and ``spec.to_dict()`` use
    a flat dict, which is also the JSON form (``to_json`` / ``from_json``).
    """

    method: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.options, Mapping):
            raise ValueError(f"options must be a dict of the method's settings, got {self.options!r}")
        # builds and validates the method's config; raises ValueError with the details
        object.__setattr__(self, "options", dict(self.options))
        object.__setattr__(self, "_config", get_method(self.method).make_config(self.options))

    @property
    def config(self) -> Any:
        """The method's validated config dataclass (defaults filled in)."""
        return self._config  # type: ignore[attr-defined]

    def __eq__(self, other: object) -> bool:
        """Specs are equal when they build the same layers (defaults filled in)."""
        if not isinstance(other, EmbeddingSpec):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def to_dict(self) -> Dict[str, Any]:
        """Flat dict with every setting of the method, defaults included."""
        values = dataclasses.asdict(self.config)
        return {"method": self.method, **{k: _jsonable(v) for k, v in values.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EmbeddingSpec":
        data = dict(data)
        if "method" not in data:
            raise ValueError(f"an embedding spec needs a 'method' key, got keys {sorted(data)}")
        method = data.pop("method")
        return cls(method, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EmbeddingSpec":
        return cls.from_dict(json.loads(text))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def build_embedding(spec: EmbeddingSpec, num_embeddings: int, embedding_dim: int,
                    padding_idx: Optional[int] = None, init_std: Optional[float] = None
                    ) -> nn.Module:
    """A freshly initialised layer for a ``num_embeddings`` x ``embedding_dim`` table.

    ``init_std``: the row std the host model gives its own dense embedding table; the
    table then starts at that std whatever the method (the one init rule,
    :mod:`compemb.init`). ``None``: the method's own init (TT/TR Glorot, DPQ N(0, 1))."""
    if isinstance(spec, Mapping):
        spec = EmbeddingSpec.from_dict(spec)
    return get_method(spec.method).build(spec.config, num_embeddings, embedding_dim, padding_idx,
                                         init_std=init_std)


def compress_embedding(spec: EmbeddingSpec, weight: Tensor,
                       padding_idx: Optional[int] = None) -> nn.Module:
    """A layer of ``spec``'s method initialised from a trained ``[V, J]`` table
    (TT-SVD for TT/TR, k-means codebooks for DPQ, a copy for dense)."""
    if isinstance(spec, Mapping):
        spec = EmbeddingSpec.from_dict(spec)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a [num_embeddings, embedding_dim] tensor, got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    return get_method(spec.method).from_dense(spec.config, weight.detach(), padding_idx)
