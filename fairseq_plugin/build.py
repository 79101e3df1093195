"""Building the compressed layers of a fairseq model from its flags, and the record of
those settings that a checkpoint carries.

Shared by every model of the plugin (translation, language model, RoBERTa): each model
only decides where the layers go.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import torch
from torch import nn

import compemb

from .flags import FLAG_TO_OPTION, LEGACY_RECORD_KEYS, describe_layer_error, spec_from_args

logger = logging.getLogger("fairseq_plugin")

__all__ = ["build_token_embedding", "build_output_layer", "CompressionRecord",
           "compression_record", "log_report"]


def build_token_embedding(args: Any, num_embeddings: int, embedding_dim: int,
                          padding_idx: Optional[int], what: str = "embedding",
                          init_std: Optional[float] = None) -> nn.Module:
    """The token embedding the flags describe, for a ``num_embeddings x embedding_dim``
    table, started by the core's init rule (:mod:`compemb.init`) at the std the fairseq
    model gives its own token embeddings: ``init_std``, default ``dim**-0.5`` (the
    Transformer's; RoBERTa passes BERT's 0.02), zero padding row. ``--emb-method dense``
    trains like the stock model, and TT/TR/DPQ tables start at the same scale.

    Raises ``ValueError`` naming the flags when the method cannot compress this table.
    """
    spec = spec_from_args(args)
    try:
        if getattr(args, "emb_codebook", False):
            return _empty_codebook(spec, num_embeddings, embedding_dim, padding_idx)
        layer = compemb.build_embedding(spec, num_embeddings, embedding_dim, padding_idx,
                                        init_std=init_std or embedding_dim ** -0.5)
    except ValueError as err:
        raise describe_layer_error(err, args, what, num_embeddings, embedding_dim) from None
    return layer


def _empty_codebook(spec: compemb.EmbeddingSpec, num_embeddings: int, embedding_dim: int,
                    padding_idx: Optional[int]) -> nn.Module:
    """A :class:`compemb.dpq.CodebookEmbedding` of the spec's shape, all codes and values
    zero, to load an exported checkpoint into."""
    from compemb.dpq import CodebookEmbedding
    from compemb.dpq.math import check_groups

    c = spec.config
    check_groups(embedding_dim, c.num_groups)
    books = 1 if c.shared_subspace else c.num_groups
    return CodebookEmbedding(
        torch.zeros(num_embeddings, c.num_groups, dtype=torch.long),
        torch.zeros(books, c.num_codes, embedding_dim // c.num_groups), padding_idx=padding_idx)


def build_output_layer(args: Any, mode: str, embed_tokens: nn.Module, num_embeddings: int,
                       output_dim: int, bias: bool = False,
                       init_std: Optional[float] = None) -> nn.Module:
    """The output (softmax) layer: ``hidden [..., output_dim] -> logits [..., V]``.

    ``mode`` (see :func:`fairseq_plugin.flags.resolve_softmax`): ``"tied"`` reuses
    ``embed_tokens`` (its parameters stay registered there only), ``"untied"`` builds a
    second table of the same method and shape, ``"dense"`` a plain matrix initialised
    as fairseq does. ``init_std``: as for :func:`build_token_embedding`.
    """
    if mode == "tied":
        if embed_tokens.embedding_dim != output_dim:
            raise ValueError(
                f"--softmax tied needs the output dimension ({output_dim}) to equal the "
                f"embedding dimension ({embed_tokens.embedding_dim}); use --softmax untied "
                f"or make the two dimensions equal")
        return compemb.OutputLayer(embed_tokens, bias=bias, tied=True)
    if mode == "untied":
        table = build_token_embedding(args, num_embeddings, output_dim, None,
                                      what="output (softmax) table", init_std=init_std)
        return compemb.OutputLayer(table, bias=bias, tied=False)
    if mode == "dense":
        linear = nn.Linear(output_dim, num_embeddings, bias=bias)
        nn.init.normal_(linear.weight, mean=0.0, std=output_dim ** -0.5)
        if bias:
            nn.init.zeros_(linear.bias)
        return linear
    raise ValueError(f"--softmax {mode!r} is not a mode; use tied, untied or dense")


def compression_record(args: Any, softmax: str) -> Dict[str, Any]:
    """The settings that decide the compressed parameters' shapes, in flag form
    (``{"--emb-method": "tt", "--emb-rank": 16, ..., "--softmax": "untied"}``), every
    option of the method included with its default."""
    spec = spec_from_args(args)
    flag_of = {o: "--" + n.replace("_", "-") for n, o in FLAG_TO_OPTION.items()}
    record: Dict[str, Any] = {"--emb-method": spec.method}
    for key, value in spec.to_dict().items():
        if key == "method":
            continue
        flag = flag_of.get(key, f"({key})")
        if flag == "--emb-no-distance-norm":
            value = not value
        record[flag] = value
    if getattr(args, "emb_codebook", False):
        record["--emb-codebook"] = True
    record["--softmax"] = softmax
    return record


def _as_text(record: Dict[str, Any]) -> str:
    return " ".join(f"{k} {v}" for k, v in record.items() if v is not None)


class CompressionRecord:
    """Mixin for the plugin's models: the checkpoint records the compression settings
    (``state_dict()["_extra_state"]``, plain strings and numbers), and loading a
    checkpoint made with other settings fails with a message naming the flags, before
    any tensor is copied.

    The model sets ``self.compemb_record = compression_record(args, softmax)``.
    """

    compemb_record: Dict[str, Any] = {}

    def get_extra_state(self) -> Dict[str, Any]:
        return {"compemb": dict(self.compemb_record)}

    def set_extra_state(self, state: Any) -> None:
        saved = state.get("compemb") if isinstance(state, dict) else None
        if saved is None:
            raise ValueError("the checkpoint was not written by a fairseq_plugin (compemb) "
                             "model; it has no record of its compression flags")
        saved = _upgrade_record(saved)
        if _normalise(saved) != _normalise(self.compemb_record):
            differ = [k for k in sorted(set(saved) | set(self.compemb_record))
                      if _normalise(saved.get(k)) != _normalise(self.compemb_record.get(k))]
            raise ValueError(
                f"the checkpoint was trained with other compression flags ({', '.join(differ)} "
                f"differ): it has {_as_text(saved)}; this run has "
                f"{_as_text(self.compemb_record)}. Pass the checkpoint's flags to load it "
                f"(or train into a fresh --save-dir)")


def _upgrade_record(saved: Dict[str, Any]) -> Dict[str, Any]:
    """A record written before ``temperature``, ``commitment`` and ``distance_norm`` had
    flags named them ``(temperature)`` ...: the same settings under today's flags."""
    out = {}
    for key, value in saved.items():
        flag = LEGACY_RECORD_KEYS.get(key, key)
        out[flag] = (not value) if key == "(distance_norm)" else value
    return out


def _normalise(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def log_report(model: nn.Module) -> None:
    """Log the model's compression report (printed once, when the model is built)."""
    logger.info("compemb compression report:\n%s", compemb.compression_report(model))
