"""The compression report: what each compressed layer stores, and the model's totals."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Set

from torch import Tensor, nn

__all__ = ["LayerStorage", "ReportRow", "CompressionReport", "compression_report"]


@dataclass(frozen=True)
class LayerStorage:
    """What one compressed layer stores, as returned by its ``storage()`` method.

    Attributes:
        method: method name (``"tt"``, ``"tr"``, ``"dpq-sx"``, ``"codebook"``, ...).
        shape: a short human-readable description of the structure
            (``"(25,30,40)x(4,8,8) r=16"``, ``"K=16 D=32 shared"``).
        num_embeddings, embedding_dim: the V x J table it stands for.
        stored_parameters: floating-point numbers kept (cores, or codebook values).
        stored_bytes: bytes as stored, floating-point values at their dtype plus any
            integer codes at their packed bit width (rounded up to whole bytes).
        dense_bytes: bytes of the V x J table in the same floating-point dtype.
    """

    method: str
    shape: str
    num_embeddings: int
    embedding_dim: int
    stored_parameters: int
    stored_bytes: int
    dense_bytes: int

    @property
    def dense_parameters(self) -> int:
        return self.num_embeddings * self.embedding_dim

    @property
    def ratio(self) -> float:
        """Compression ratio, as in METHODS.md: dense bytes / bytes as stored.

        For TT/TR this is V*J / parameters; for DPQ 32*V*d / (V*D*bits + 32*K*d) with
        float32 values (codes rounded up to whole bytes)."""
        return self.dense_bytes / max(self.stored_bytes, 1)


@dataclass(frozen=True)
class ReportRow:
    name: str
    storage: LayerStorage

    def to_dict(self) -> Dict[str, Any]:
        s = self.storage
        return {
            "name": self.name, "method": s.method, "shape": s.shape,
            "num_embeddings": s.num_embeddings, "embedding_dim": s.embedding_dim,
            "dense_parameters": s.dense_parameters, "stored_parameters": s.stored_parameters,
            "dense_bytes": s.dense_bytes, "stored_bytes": s.stored_bytes, "ratio": s.ratio,
        }


@dataclass(frozen=True)
class CompressionReport:
    """One row per compressed layer and the model's totals.

    ``model_dense_bytes`` is the model as it would be with every compressed layer dense,
    ``model_stored_bytes`` the model as stored: the compressed layers' bytes plus every
    other tensor of the ``state_dict`` (parameters and persistent buffers, a shared tensor
    once, at its dtype)."""

    rows: List[ReportRow]
    other_parameters: int
    other_bytes: int

    @property
    def embedding_dense_bytes(self) -> int:
        return sum(r.storage.dense_bytes for r in self.rows)

    @property
    def embedding_stored_bytes(self) -> int:
        return sum(r.storage.stored_bytes for r in self.rows)

    @property
    def embedding_ratio(self) -> float:
        """Dense / stored bytes over the compressed layers (1.0 when there are none)."""
        if not self.rows:
            return 1.0
        return self.embedding_dense_bytes / max(self.embedding_stored_bytes, 1)

    @property
    def model_dense_bytes(self) -> int:
        return self.other_bytes + self.embedding_dense_bytes

    @property
    def model_stored_bytes(self) -> int:
        return self.other_bytes + self.embedding_stored_bytes

    @property
    def model_ratio(self) -> float:
        return self.model_dense_bytes / max(self.model_stored_bytes, 1)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "layers": [r.to_dict() for r in self.rows],
            "totals": {
                "embedding_dense_parameters": sum(r.storage.dense_parameters for r in self.rows),
                "embedding_stored_parameters": sum(r.storage.stored_parameters for r in self.rows),
                "embedding_dense_bytes": self.embedding_dense_bytes,
                "embedding_stored_bytes": self.embedding_stored_bytes,
                "embedding_ratio": self.embedding_ratio,
                "other_parameters": self.other_parameters,
                "model_dense_bytes": self.model_dense_bytes,
                "model_stored_bytes": self.model_stored_bytes,
                "model_ratio": self.model_ratio,
            },
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        head = ("layer", "method", "structure", "V x J", "dense params", "stored params",
                "stored bytes", "ratio")
        lines = [head]
        for r in self.rows:
            s = r.storage
            lines.append((r.name or "(root)", s.method, s.shape,
                          f"{s.num_embeddings} x {s.embedding_dim}", f"{s.dense_parameters:,}",
                          f"{s.stored_parameters:,}", _human(s.stored_bytes), f"{s.ratio:.1f}x"))
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
        out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
        out.insert(1, "  ".join("-" * w for w in widths))
        out.append("")
        out.append(f"compressed layers: {_human(self.embedding_dense_bytes)} dense -> "
                   f"{_human(self.embedding_stored_bytes)} stored ({self.embedding_ratio:.1f}x)")
        out.append(f"whole model:       {_human(self.model_dense_bytes)} dense -> "
                   f"{_human(self.model_stored_bytes)} stored ({self.model_ratio:.2f}x)")
        return "\n".join(out)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def compression_report(module: nn.Module) -> CompressionReport:
    """Report every compressed layer in ``module`` (any sub-module with a ``storage()``
    method returning :class:`LayerStorage`) and the model's totals. Tensors shared
    between modules (tied weights) are counted once. ``ValueError`` for a tied softmax
    head whose table is not in ``module`` (:func:`compemb.output.check_tied_heads`)."""
    from .output import check_tied_heads

    check_tied_heads(module)
    rows: List[ReportRow] = []
    inner: Set[int] = set()  # ids of the tensors held by compressed layers
    skip: List[str] = []  # name prefixes of compressed layers (their children are theirs)
    for name, sub in module.named_modules():
        if any(name.startswith(p) for p in skip):
            continue
        storage_fn = getattr(sub, "storage", None)
        storage = storage_fn() if callable(storage_fn) else None
        if isinstance(storage, LayerStorage):
            rows.append(ReportRow(name, storage))
            skip.append(name + ".")
            inner.update(id(t) for t in list(sub.parameters()) + list(sub.buffers()))
    # what a checkpoint holds: parameters and persistent buffers (state_dict), each
    # shared tensor once; non-persistent buffers (position tables ...) are not stored
    params = {id(p) for p in module.parameters()}
    seen: Set[int] = set(inner)
    other_params = other_bytes = 0
    for t in module.state_dict(keep_vars=True).values():
        if not isinstance(t, Tensor) or id(t) in seen:  # (extra states are not tensors)
            continue
        seen.add(id(t))
        other_bytes += t.numel() * t.element_size()
        if id(t) in params:
            other_params += t.numel()
    return CompressionReport(rows=rows, other_parameters=other_params, other_bytes=other_bytes)
