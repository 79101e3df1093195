"""``evaluate`` metric modules shipped with compemb_hf (the Hub's cannot be fetched offline).

``compemb_hf.metrics.load("accuracy" | "perplexity" | "bleu")`` is
``evaluate.load(<this folder>/<name>)``."""
from __future__ import annotations

import os
from typing import Any, List

__all__ = ["NAMES", "path", "load"]

NAMES: List[str] = ["accuracy", "perplexity", "bleu"]


def path(name: str) -> str:
    """The local folder of metric ``name`` (for ``evaluate.load``)."""
    if name not in NAMES:
        raise ValueError(f"unknown metric {name!r}; compemb_hf ships {NAMES}")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)


def load(name: str, **kwargs: Any):
    import evaluate

    return evaluate.load(path(name), **kwargs)
