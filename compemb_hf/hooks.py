"""What ``import compemb_hf`` registers with transformers.

1. The config and quantizer under the quant method ``"compemb"``
   (``register_quantization_config`` / ``register_quantizer``).
2. Reading of the ``config.json`` form of the config, which has no ``quant_method`` (see
   :meth:`CompressedEmbeddingConfig.to_dict`): without this import transformers raises
   ``ValueError: The model's quantization config ... has no `quant_method` attribute``
   for a compressed checkpoint instead of silently loading a random dense table.
3. The ``compressed_embedding=`` keyword of ``from_pretrained``, on every model class and
   Auto class: a registry of extra ``from_pretrained`` keywords
   (:func:`register_from_pretrained_kwarg`), consulted by a wrapper of
   ``PreTrainedModel.from_pretrained``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict

from transformers import PreTrainedModel
from transformers.quantizers import register_quantization_config, register_quantizer
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          AutoHfQuantizer, AutoQuantizationConfig)

from .config import QUANT_METHOD, SERIAL_MARKER, CompressedEmbeddingConfig
from .quantizer import CompressedEmbeddingQuantizer

__all__ = ["register_from_pretrained_kwarg", "install"]

#: keyword -> handler(value, kwargs) that rewrites the from_pretrained kwargs in place
FROM_PRETRAINED_KWARGS: Dict[str, Callable[[Any, Dict[str, Any]], None]] = {}


def register_from_pretrained_kwarg(name: str, handler: Callable[[Any, Dict[str, Any]], None]) -> None:
    """Accept ``name=value`` in every ``from_pretrained``; ``handler(value, kwargs)`` turns it
    into keywords transformers knows (it may set ``kwargs["quantization_config"]``)."""
    FROM_PRETRAINED_KWARGS[name] = handler


def _compressed_embedding_kwarg(value: Any, kwargs: Dict[str, Any]) -> None:
    if value is None:
        return
    if isinstance(value, dict):
        value = CompressedEmbeddingConfig.from_dict(value)
    if not isinstance(value, CompressedEmbeddingConfig):
        raise ValueError(f"compressed_embedding must be a compemb_hf.CompressedEmbeddingConfig "
                         f"or a dict of its fields, got {type(value).__name__}")
    if kwargs.get("quantization_config") is not None:
        raise ValueError("pass either compressed_embedding=... or quantization_config=..., not both")
    kwargs["quantization_config"] = value


def _normalise(config_dict: Any) -> Any:
    if (isinstance(config_dict, dict) and SERIAL_MARKER in config_dict
            and config_dict.get("quant_method") is None):
        return {**config_dict, "quant_method": QUANT_METHOD}
    return config_dict


_installed = False


def install() -> None:
    """Register everything (idempotent; called by ``import compemb_hf``)."""
    global _installed
    if _installed:
        return
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not CompressedEmbeddingConfig:
        register_quantization_config(QUANT_METHOD)(CompressedEmbeddingConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not CompressedEmbeddingQuantizer:
        register_quantizer(QUANT_METHOD)(CompressedEmbeddingQuantizer)

    original_supports = AutoHfQuantizer.supports_quant_method
    AutoHfQuantizer.supports_quant_method = staticmethod(
        lambda config_dict: original_supports(_normalise(config_dict)))
    original_from_dict = AutoQuantizationConfig.from_dict.__func__

    def from_dict(cls, quantization_config_dict):
        return original_from_dict(cls, _normalise(quantization_config_dict))

    AutoQuantizationConfig.from_dict = classmethod(from_dict)

    original = PreTrainedModel.from_pretrained.__func__

    @functools.wraps(original)
    def from_pretrained(cls, *args, **kwargs):
        for name, handler in FROM_PRETRAINED_KWARGS.items():
            if name in kwargs:
                handler(kwargs.pop(name), kwargs)
        return original(cls, *args, **kwargs)

    PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    register_from_pretrained_kwarg("compressed_embedding", _compressed_embedding_kwarg)
    _installed = True
