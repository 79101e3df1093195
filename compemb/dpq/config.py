"""Settings of the DPQ method (Differentiable Product Quantization, METHODS.md)."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DPQConfig", "VARIANTS"]

VARIANTS = ("sx", "vq")
DEFAULT_TEMPERATURE = 1.0


@dataclass(frozen=True)
class DPQConfig:
    """Settings of a :class:`compemb.dpq.DPQEmbedding`.

    Attributes:
        num_codes: codes per group, ``Kc`` (>= 2). A code takes ``ceil(log2(Kc))`` bits in
            the exported :class:`compemb.dpq.CodebookEmbedding`; powers of two waste none.
        num_groups: groups ``D`` the ``embedding_dim`` is split into (must divide it);
            each symbol gets one code per group.
        variant: ``"sx"`` (dot-product scores, softmax straight-through, separate keys and
            values) or ``"vq"`` (negative squared distance, keys = values, codebook loss).
        shared_subspace: one key/value pair (``Kc x d/D``) for all groups instead of one
            per group.
        distance_norm: batch-normalise the scores per (group, code) over the mini-batch
            (no scale or shift) before the argmax/softmax; running statistics in eval.
        temperature: softmax temperature ``tau`` of ``"sx"`` (> 0); applied after the
            normalisation. It changes only the backward pass (the argmax ignores it).
            ``"vq"`` has no temperature: any value but the default is a ``ValueError``.
        commitment: weight ``beta`` of the ``"vq"`` commitment term
            ``beta * mean ||q - stopgrad(V[c])||^2`` (reference default 0). The codebook
            term ``mean ||stopgrad(q) - V[c]||^2`` always has weight 1. ``"sx"`` has no
            commitment term: any value but 0 is a ``ValueError``.
    """

    num_codes: int = 32
    num_groups: int = 16
    variant: str = "sx"
    shared_subspace: bool = False
    distance_norm: bool = True
    temperature: float = DEFAULT_TEMPERATURE
    commitment: float = 0.0

    def __post_init__(self) -> None:
        if not _is_int(self.num_codes) or self.num_codes < 2:
            raise ValueError(f"num_codes must be an integer >= 2 (codes per group, e.g. 16, 32 "
                             f"or 256), got {self.num_codes!r}")
        if self.num_codes > 2 ** 16:
            raise ValueError(f"num_codes must be at most 65536 (16-bit codes), got "
                             f"{self.num_codes}")
        if not _is_int(self.num_groups) or self.num_groups < 1:
            raise ValueError(f"num_groups must be a positive integer dividing embedding_dim, "
                             f"got {self.num_groups!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)} ('sx': softmax "
                             f"straight-through, 'vq': vector quantisation), got "
                             f"{self.variant!r}")
        if not isinstance(self.shared_subspace, bool):
            raise ValueError(f"shared_subspace must be True or False, got "
                             f"{self.shared_subspace!r}")
        if not isinstance(self.distance_norm, bool):
            raise ValueError(f"distance_norm must be True or False, got {self.distance_norm!r}")
        if not _is_number(self.temperature) or not self.temperature > 0:
            raise ValueError(f"temperature must be a number > 0 (e.g. 1.0), got "
                             f"{self.temperature!r}")
        if not _is_number(self.commitment) or not self.commitment >= 0:
            raise ValueError(f"commitment must be a number >= 0 (0 disables it), got "
                             f"{self.commitment!r}")
        # options the chosen variant would ignore: refused rather than dropped silently
        if self.variant == "vq" and self.temperature != DEFAULT_TEMPERATURE:
            raise ValueError(f"temperature={self.temperature!r} has no effect with variant='vq' "
                             f"(the softmax temperature is DPQ-SX's); use variant='sx' or leave "
                             f"temperature at {DEFAULT_TEMPERATURE}")
        if self.variant == "sx" and self.commitment != 0:
            raise ValueError(f"commitment={self.commitment!r} has no effect with variant='sx' "
                             f"(the commitment loss is DPQ-VQ's); use variant='vq' or leave "
                             f"commitment at 0")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
