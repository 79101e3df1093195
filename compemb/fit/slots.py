"""Per-state caches for the tables a fitted layer derives from its buffers (torch only).

A lookup must not rebuild a ``[V]`` map (or unpack codes) on every call: these are built
once per state of the tensors they come from (data pointer and version, so an in-place
load or a move to another device rebuilds them) and kept as a plain attribute, outside
``state_dict``. Under ``torch.compile`` / ``torch.export`` they are built in the graph.
"""
from __future__ import annotations

from typing import Callable, Hashable, Sequence, TypeVar

import torch
from torch import Tensor, nn

__all__ = ["cached_per_state", "slot_map"]

T = TypeVar("T")


def cached_per_state(owner: nn.Module, name: str, sources: Sequence[Tensor],
                     build: Callable[[], T], *extra: Hashable) -> T:
    """``build()``, computed once per state of ``sources`` (and of ``extra`` keys, e.g. a
    device) and kept in ``owner.__dict__[name]``; rebuilt each call while tracing."""
    if torch.compiler.is_compiling():
        return build()
    key = tuple((t.data_ptr(), t._version) for t in sources) + extra
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        cached = (key, build())
        owner.__dict__[name] = cached  # a plain attribute: not in state_dict
    return cached[1]


def slot_map(kept: Tensor, num_embeddings: int, device: torch.device) -> Tensor:
    """``long [V]``: the position of each id in ``kept [N]``, -1 for ids not in it (built
    out of place, so that tracing can take it)."""
    slot = torch.full((num_embeddings,), -1, dtype=torch.long, device=device)
    return slot.index_put((kept.long().to(device),), torch.arange(kept.numel(), device=device))
