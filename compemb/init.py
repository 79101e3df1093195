"""The one initialisation rule of a fresh (random) compressed table.

**Rule**: a fresh table starts with rows of the std that the host model gives its own dense
embedding table: ``build_embedding(spec, V, J, init_std=s)`` (``layer_cls(...,
init_std=s)``) draws the method's own init and brings the table to std ``s``:

* dense: ``N(0, s^2)``, padding row zero;
* TT / TR: the paper's eq. (2) (its structure: every core element i.i.d.), then every core
  multiplied by one common factor so that the materialised table has std ``s``;
* DPQ: query, keys and values ``N(0, s^2)`` (output rows are rows of the values).

Every entry point passes its host's std: transformers (``compemb_hf``) the std of the
dense table being replaced, fairseq ``embedding_dim ** -0.5`` (what fairseq draws its
token embeddings at), the Transformer-XL its ``config.init_std``, the recipes the std they
give their dense tables. Without ``init_std`` a layer keeps its method's own init (TT/TR:
Glorot, variance ``2/(V+J)``; DPQ and dense: ``N(0, 1)``), which is far from any host's
scale: at the Glorot std a tied TT softmax of the PTB LSTM stayed near the unigram
perplexity after an epoch (RESULTS.md), and DPQ's ``N(0, 1)`` gave a tied BERT head
logits about 50 times too large. ``from_dense`` starts from the trained table and needs
no rule.
"""
from __future__ import annotations

from typing import Optional

__all__ = ["check_init_std"]


def check_init_std(std: Optional[float], name: str = "init_std") -> None:
    """``ValueError`` unless ``std`` is ``None`` or a number > 0."""
    if std is None:
        return
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not std > 0:
        raise ValueError(f"{name} must be > 0: a number (the row std the host model gives its "
                         f"dense table, e.g. 0.02) or None for the method's own init, got "
                         f"{std!r}")
