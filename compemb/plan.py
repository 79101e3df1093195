"""Choosing a method's settings for a target compression ratio."""
from __future__ import annotations

import dataclasses

from .registry import available_methods, get_method
from .spec import EmbeddingSpec

__all__ = ["plan"]


def plan(num_embeddings: int, embedding_dim: int, method: str, target_ratio: float) -> EmbeddingSpec:
    """The settings of ``method`` that reach at least ``target_ratio`` compression of a
    ``num_embeddings x embedding_dim`` table with the most capacity (TT/TR: shape and
    largest rank; DPQ: groups and codes with the most code bits).

    Raises ``ValueError`` when the method has no planner or the ratio cannot be reached.
    """
    if not (isinstance(target_ratio, (int, float)) and target_ratio >= 1):
        raise ValueError(f"target_ratio must be a number >= 1, got {target_ratio!r}")
    if num_embeddings < 1 or embedding_dim < 1:
        raise ValueError(f"num_embeddings and embedding_dim must be >= 1, got "
                         f"{num_embeddings} x {embedding_dim}")
    entry = get_method(method)
    if entry.plan is None:
        raise ValueError(f"method {method!r} has no planner; methods with one: "
                         f"{[m for m in available_methods() if get_method(m).plan is not None]}")
    config = entry.plan(num_embeddings, embedding_dim, float(target_ratio))
    return EmbeddingSpec(method, {f.name: getattr(config, f.name)
                                  for f in dataclasses.fields(config)})

