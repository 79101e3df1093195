"""Argument checks shared by every layer (pure functions, no parameters)."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_indices", "check_state_shapes"]

_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_indices(indices: Tensor, num_embeddings: int, name: str = "input") -> None:
    """Validate an index tensor as ``nn.Embedding`` would.

    Raises ``ValueError`` for a non-integer tensor and ``IndexError`` for an index outside
    ``[0, num_embeddings)``. On CUDA the range check is an asynchronous device assert
    (no host sync); on other devices it is checked at once.
    """
    if not isinstance(indices, Tensor):
        raise ValueError(f"{name} must be a LongTensor of indices, got {type(indices).__name__}")
    if indices.dtype not in _INDEX_DTYPES:
        raise ValueError(
            f"{name} must be an integer tensor of indices (torch.long or torch.int), "
            f"got dtype {indices.dtype}; convert with {name}.long()"
        )
    if indices.numel() == 0:
        return
    if indices.is_cuda:
        torch._assert_async(
            ((indices >= 0) & (indices < num_embeddings)).all(),
            f"{name}: index out of range for an embedding of {num_embeddings} rows",
        )
        return
    if torch.compiler.is_compiling():
        return  # a data-dependent check would break the graph; the gather checks bounds
    lo, hi = torch.aminmax(indices)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= num_embeddings:
        bad = lo if lo < 0 else hi
        raise IndexError(
            f"index {bad} in {name} is out of range for an embedding of {num_embeddings} rows "
            f"(valid indices are 0..{num_embeddings - 1})"
        )


def check_state_shapes(module_name: str, expected: dict, state: dict, prefix: str,
                       error_msgs: list) -> None:
    """For ``_load_from_state_dict``: report every tensor whose shape differs from this
    module's, naming both shapes (called before torch's own copy)."""
    for key, shape in expected.items():
        value = state.get(prefix + key)
        if value is not None and tuple(value.shape) != tuple(shape):
            error_msgs.append(
                f"{module_name}: {prefix + key} has shape {tuple(value.shape)} in the checkpoint "
                f"but {tuple(shape)} in this module; build the module with the checkpoint's "
                f"settings (shape/rank/codes) to load it"
            )

