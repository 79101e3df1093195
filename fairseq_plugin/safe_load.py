"""Safe loading of fairseq checkpoints under torch >= 2.6.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``: it unpickles tensors,
primitive containers and an allowlist of classes only, and refuses anything else (a
pickle can otherwise run arbitrary code). fairseq 0.12 calls ``torch.load(f)`` without
arguments in ``checkpoint_utils.load_checkpoint_to_cpu``, which every resume,
``fairseq-generate``, ``fairseq-eval-lm``, ``fairseq-validate`` and
``fairseq-interactive`` go through, so its checkpoints fail to load.

A fairseq checkpoint written by ``Trainer.state_dict`` holds tensors, dicts, lists,
strings and numbers, plus one class: ``argparse.Namespace`` (``cfg["model"]`` of the
argparse-configured models: ``transformer``, ``roberta``). Allowlisting exactly that
class (a plain attribute bag whose unpickling sets attributes and runs no code) makes
them load, while a checkpoint carrying any other pickled object is still refused.
Setting ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` would also work but turns safe loading off
for every ``torch.load`` in the process: this module never does that.
"""
import argparse
from typing import List

import torch

__all__ = ["FAIRSEQ_CHECKPOINT_GLOBALS", "allow_fairseq_checkpoints"]

#: The classes a fairseq checkpoint holds beyond what ``weights_only`` loading allows.
FAIRSEQ_CHECKPOINT_GLOBALS: List[type] = [argparse.Namespace]


def allow_fairseq_checkpoints() -> None:
    """Add :data:`FAIRSEQ_CHECKPOINT_GLOBALS` to torch's safe-loading allowlist
    (process-wide; adding them twice is harmless)."""
    torch.serialization.add_safe_globals(FAIRSEQ_CHECKPOINT_GLOBALS)
