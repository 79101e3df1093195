"""Safe loading of fairseq checkpoints under torch >= 2.6.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``: it unpickles tensors,
primitive containers and an allowlist of classes only, and refuses anything else (a
pickle can otherwise run arbitrary code). fairseq 0.12 calls ``torch.load(f)`` without
arguments in ``checkpoint_utils.load_checkpoint_to_cpu``, which every resume,
``fairseq-generate``, ``fairseq-eval-lm``, ``fairseq-validate`` and
``fairseq-interactive`` go through, so its checkpoints fail to load.

A fairseq checkpoint written by ``Trainer.state_dict`` holds tensors, dicts, lists,
strings and numbers, plus:

- ``argparse.Namespace``: ``cfg["model"]`` of the argparse-configured models
  (``transformer``, ``roberta`` and the plugin's models built on them);
- numpy arrays, dtypes (and the dtype classes of ``numpy.dtypes``) and scalars in the
  saved training meters
  (``extra_state["metrics"]``), e.g. the n-gram counts that ``--eval-bleu`` logs.

Allowlisting exactly these (attribute bags and numpy's array/scalar reconstructors,
whose unpickling runs no code of the checkpoint's choosing: an object array's items go
through the same restricted unpickler) makes fairseq checkpoints load, while a
checkpoint carrying any other pickled object is still refused. Setting
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` would also work but turns safe loading off for
every ``torch.load`` in the process: this module never does that.
"""
import argparse
from typing import Any, List

import numpy as np
import torch

__all__ = ["FAIRSEQ_CHECKPOINT_GLOBALS", "allow_fairseq_checkpoints"]


def _numpy_globals() -> List[Any]:
    """numpy's array and scalar reconstructors under both module names pickles use
    (``numpy._core.multiarray`` since numpy 2, ``numpy.core.multiarray`` before)."""
    core = getattr(np, "_core", None) or np.core
    out: List[Any] = [np.ndarray, np.dtype]
    for name in ("_reconstruct", "scalar"):
        fn = getattr(core.multiarray, name)
        out += [(fn, f"numpy._core.multiarray.{name}"), (fn, f"numpy.core.multiarray.{name}")]
    # numpy >= 1.25 builds each dtype as an instance of its class (numpy.dtypes.Int64DType ...)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += sorted((getattr(dtypes, n) for n in dir(dtypes)
                       if n.endswith("DType") and isinstance(getattr(dtypes, n), type)),
                      key=lambda t: t.__name__)
    return out


#: What a fairseq checkpoint holds beyond what ``weights_only`` loading allows.
FAIRSEQ_CHECKPOINT_GLOBALS: List[Any] = [argparse.Namespace, *_numpy_globals()]


def allow_fairseq_checkpoints() -> None:
    """Add :data:`FAIRSEQ_CHECKPOINT_GLOBALS` to torch's safe-loading allowlist
    (process-wide; adding them twice is harmless)."""
    torch.serialization.add_safe_globals(FAIRSEQ_CHECKPOINT_GLOBALS)
