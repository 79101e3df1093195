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
import functools
import pickle
import zipfile
from typing import Any, Callable, List

import numpy as np
import torch

__all__ = ["FAIRSEQ_CHECKPOINT_GLOBALS", "allow_fairseq_checkpoints", "read_checkpoint",
           "clear_load_errors"]


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


# errors torch.load raises for a damaged file (zip reader, pickle stream, short read); not
# OSError: a missing or unreadable file (permissions) keeps its own error
_DAMAGE = (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError,
           IndexError, KeyError)


def _refused_by_safe_loading(err: BaseException) -> bool:
    """Safe loading refused a class outside the allowlist (not damage: torch's message,
    which says how to allow it, stands): its message names the GLOBAL; garbage bytes give
    "Unsupported operand"."""
    text = str(err)
    return (isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in text
            and "global" in text.lower())


def _damaged(path: str, err: BaseException) -> ValueError:
    return ValueError(f"{path} is not a readable fairseq checkpoint (corrupt or truncated?): "
                      f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


def read_checkpoint(path: str) -> Any:
    """``torch.load(path, map_location="cpu")`` with safe (``weights_only``) loading and
    the fairseq allowlist; a damaged file is a ``ValueError`` naming it. A file holding
    objects outside the allowlist keeps torch's ``UnpicklingError``, a missing or
    unreadable one its ``OSError``."""
    import torch

    allow_fairseq_checkpoints()
    try:
        return torch.load(path, map_location="cpu")
    except _DAMAGE as err:
        if _refused_by_safe_loading(err):
            raise
        raise _damaged(str(path), err) from err


def clear_load_errors(load: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap fairseq's ``checkpoint_utils.load_checkpoint_to_cpu(path, ...)`` so that a
    corrupt or truncated checkpoint (resume, generate, eval-lm ...) fails with the
    ``ValueError`` of :func:`read_checkpoint` instead of a zip-reader or pickle error.
    Only on failure is the file read again to tell damage from any other error, which is
    raised unchanged (as is safe loading's refusal of other objects)."""
    if getattr(load, "_compemb_clear_errors", False):
        return load

    @functools.wraps(load)
    def wrapped(path, *args, **kwargs):
        try:
            return load(path, *args, **kwargs)
        except _DAMAGE as err:
            if _refused_by_safe_loading(err):
                raise
            try:
                read_checkpoint(path)
            except ValueError as damage:
                raise damage from err
            except Exception:  # noqa: BLE001  (not damage: the original error stands)
                pass
            raise

    wrapped._compemb_clear_errors = True  # type: ignore[attr-defined]
    return wrapped


def install_clear_load_errors() -> None:
    """Apply :func:`clear_load_errors` to ``fairseq.checkpoint_utils`` (once)."""
    from fairseq import checkpoint_utils

    checkpoint_utils.load_checkpoint_to_cpu = clear_load_errors(
        checkpoint_utils.load_checkpoint_to_cpu)
