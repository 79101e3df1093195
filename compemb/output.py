"""The output (softmax) layer over a vocabulary, from any embedding layer."""
from __future__ import annotations

import functools
import sys
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OutputLayer", "embedding_logits", "forward_method", "check_tied_heads"]


def forward_method(module: nn.Module, name: str):
    """``module.<name>`` (e.g. ``logits``, ``materialize``), made safe to call outside
    ``module.forward`` when ``module`` is an FSDP2 unit of its own (``fully_shard(module)``,
    as a size-based wrap policy does to a large table).

    FSDP2 gathers a unit's parameters only around its ``forward``; a tied softmax calls the
    input table's ``logits`` from another module, where the parameters would still be
    shards. The method is registered once with
    ``torch.distributed.fsdp.register_fsdp_forward_method``, so that FSDP gathers the
    parameters before it and reduce-scatters their gradients after the backward, as for
    ``forward``. Anything else (no FSDP, or the table inside a larger unit, whose forward
    is running) gets the method unchanged.
    """
    # a module can only be an FSDP unit once FSDP is imported: no import (0.7 s) otherwise
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and isinstance(module, fsdp.FSDPModule) and name not in vars(module):
        fsdp.register_fsdp_forward_method(module, name)
    return getattr(module, name)


def embedding_logits(embedding: nn.Module, hidden: Tensor) -> Tensor:
    """``hidden [..., J] @ table.T -> [..., V]`` for a compemb layer (its own ``logits``,
    which avoids building the table where that is cheaper) or a plain ``nn.Embedding``."""
    if hasattr(embedding, "logits"):
        return forward_method(embedding, "logits")(hidden)
    if isinstance(embedding, nn.Embedding):
        return F.linear(hidden, embedding.weight)
    raise TypeError(
        f"OutputLayer needs an embedding with a .logits(hidden) method or an nn.Embedding, "
        f"got {type(embedding).__name__}"
    )


class OutputLayer(nn.Module):
    """Logits over the vocabulary from an embedding table: ``hidden @ W.T (+ bias)``.

    Args:
        embedding: the table (``TTEmbedding``, ``TREmbedding``, ``DPQEmbedding``,
            ``CodebookEmbedding``, ``DenseEmbedding`` or ``nn.Embedding``).
        bias: add a learned bias of size ``num_embeddings``.
        tied: how the table is held; the parameters are never lost in any mode:

            * ``None`` (default, detect): the table is registered here as
              ``self.embedding``, so it is in ``parameters()``, ``state_dict()``,
              ``.to()``, ``train()`` of this module whatever else holds it. When the same
              module is also the model's input embedding (``OutputLayer(model.embed)``),
              PyTorch's module sharing ties them: ``model.parameters()`` lists the table
              once and both uses add to one gradient. ``state_dict`` then holds it once:
              the head's copy (``head.embedding.*``) is left out when the same tensors are
              already saved under another key of the model (its input embedding,
              registered before the head, as models usually are), and a state dict
              without ``head.embedding.*`` loads (also with ``strict=True``) when those
              tensors are loaded under the input embedding's keys in the same call. A
              table of the head's own is saved and loaded under ``head.embedding.*``.
            * ``True``: explicitly tied to a table that the model registers elsewhere
              (its input embedding): only referenced here, never registered, so neither
              this module's ``parameters()`` nor its ``state_dict()`` hold it. The
              caller guarantees it is registered elsewhere: a table held only by a head
              with ``tied=True`` is neither trained by an optimizer built from
              ``model.parameters()`` nor saved. (The fairseq and transformers
              integrations use this form, for their checkpoints' key layout.)
            * ``False``: an untied softmax: the table is registered here as
              ``self.embedding`` and always saved under ``head.embedding.*``.

    ``forward(hidden [..., J]) -> [..., V]``.
    """

    def __init__(self, embedding: nn.Module, bias: bool = False,
                 tied: Optional[bool] = None) -> None:
        super().__init__()
        if not isinstance(embedding, nn.Module):
            raise TypeError(f"embedding must be an nn.Module, got {type(embedding).__name__}")
        num_embeddings = getattr(embedding, "num_embeddings", None)
        if num_embeddings is None:
            raise TypeError(f"embedding {type(embedding).__name__} has no num_embeddings")
        if tied not in (None, True, False) or not isinstance(tied, (bool, type(None))):
            raise ValueError(f"tied must be None (detect: registered here, saved once when it "
                             f"is also the model's input embedding), True (a table registered "
                             f"elsewhere in the model) or False (the head's own table), got "
                             f"{tied!r}")
        self.tied = tied
        if tied is True:
            self._tied = [embedding]  # a plain list: not a sub-module, not in state_dict
        else:
            self.embedding = embedding
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding.embedding_dim
        self.bias = nn.Parameter(torch.zeros(num_embeddings)) if bias else None
        if tied is None:
            self._load_call: Optional[list] = None  # the missing_keys list of the load running
            self._load_prefix: Optional[str] = None
            self._loaded_elsewhere = False
            self._pending: List[str] = []
            self.register_state_dict_post_hook(_drop_shared_table)
            self.register_load_state_dict_pre_hook(_note_prefix)
            self.register_load_state_dict_post_hook(_forgive_shared_table)
            embedding.register_load_state_dict_pre_hook(
                functools.partial(_table_loaded, self))

    @property
    def table(self) -> nn.Module:
        """The embedding layer whose table gives the logits."""
        return self._tied[0] if self.tied is True else self.embedding

    def forward(self, hidden: Tensor) -> Tensor:
        if hidden.shape[-1] != self.embedding_dim:
            raise ValueError(f"hidden has last dimension {hidden.shape[-1]}, the output layer "
                             f"expects embedding_dim={self.embedding_dim}")
        out = embedding_logits(self.table, hidden)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (f"{self.embedding_dim} -> {self.num_embeddings}, tied={self.tied}, "
                f"bias={self.bias is not None}")


def check_tied_heads(model: nn.Module) -> None:
    """``ValueError`` naming every :class:`OutputLayer` built with ``tied=True`` in
    ``model`` whose table is not a sub-module of ``model``: its parameters would be in
    neither ``model.parameters()`` (never trained) nor ``model.state_dict()`` (never
    saved). :func:`compemb.compression_report` runs this check."""
    inside = {id(m) for m in model.modules()}
    lost = [name or type(model).__name__ for name, m in model.named_modules()
            if isinstance(m, OutputLayer) and m.tied is True and id(m.table) not in inside]
    if lost:
        raise ValueError(
            f"OutputLayer(tied=True) at {', '.join(lost)} references a table that is not a "
            f"sub-module of {type(model).__name__}: its parameters are neither trained (not in "
            f"model.parameters()) nor saved (not in state_dict()); build the head with "
            f"tied=None (the default: registered, saved once when it is the input embedding) "
            f"or tied=False, or register the table in the model")


# ---------------------------------------------------------------- tied=None: save the table once

def _table_tensors(head: OutputLayer) -> Dict[str, Tensor]:
    return dict(head.embedding.state_dict(keep_vars=True))


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` are views of the same memory with the same layout (state_dict
    entries are detached views of the parameters). Meta tensors have no memory: never."""
    if a is b:
        return True
    try:
        if a.device != b.device or a.device.type == "meta" or a.dtype != b.dtype:
            return False
        return (a.shape == b.shape and a.stride() == b.stride()
                and a.storage_offset() == b.storage_offset()
                and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() != 0)
    except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses without storage
        return False


def _drop_shared_table(head: OutputLayer, state: Dict[str, Any], prefix: str,
                       local_metadata: Any) -> None:
    """``state_dict`` post-hook: leave out ``prefix.embedding.*`` when every one of those
    tensors is already saved under another key (the input embedding, saved earlier)."""
    own = prefix + "embedding."
    mine = {k: v for k, v in state.items() if k.startswith(own)}
    if not mine:
        return
    others = [v for k, v in state.items() if not k.startswith(own) and isinstance(v, Tensor)]
    if all(isinstance(v, Tensor) and any(_same_tensor(v, o) for o in others)
           for v in mine.values()):
        for key in mine:
            del state[key]


def _start_call(head: OutputLayer, missing_keys: list) -> None:
    if head._load_call is not missing_keys:  # a new load_state_dict call
        head._load_call, head._loaded_elsewhere, head._pending = missing_keys, False, []
        head._load_prefix = None


def _note_prefix(head: OutputLayer, state_dict: Dict[str, Any], prefix: str, local_metadata: Any,
                 strict: bool, missing_keys: list, unexpected_keys: list,
                 error_msgs: list) -> None:
    _start_call(head, missing_keys)
    head._load_prefix = prefix


def _forgive_shared_table(head: OutputLayer, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook (after the head's own sub-tree): the table's keys
    under ``head.embedding.`` are not missing when the table is loaded under another
    key in the same call (before, or later: then :func:`_table_loaded` forgives them)."""
    missing = incompatible_keys.missing_keys
    _start_call(head, missing)
    own = head._load_prefix + "embedding."
    expected = [own + k for k in _table_tensors(head)]
    absent = [k for k in expected if k in missing]
    if len(absent) != len(expected):  # some keys were there: a table of its own
        return
    if head._loaded_elsewhere:
        for key in absent:
            missing.remove(key)
    else:
        head._pending = absent


def _table_loaded(head: OutputLayer, table: nn.Module, state_dict: Dict[str, Any],
                  prefix: str, local_metadata: Any, strict: bool, missing_keys: list,
                  unexpected_keys: list, error_msgs: list) -> None:
    """``load_state_dict`` pre-hook of the table: note a load under a key other than
    the head's own, and forgive the head's missing keys if it came first."""
    if head.tied is not None or head.__dict__.get("_modules", {}).get(
            "embedding") is not table:
        return
    _start_call(head, missing_keys)
    if head._load_prefix is not None and prefix == head._load_prefix + "embedding.":
        return  # the head's own path
    keys = [prefix + k for k in _table_tensors(head)]
    if keys and all(k in state_dict for k in keys):
        head._loaded_elsewhere = True
        for key in head._pending:
            if key in missing_keys:
                missing_keys.remove(key)
        head._pending = []
