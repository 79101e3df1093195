"""The transformers quantizer that runs the compression inside ``from_pretrained``.

* dense checkpoint + ``quantization_config=CompressedEmbeddingConfig(...)``: the
  before-hook only checks the config against the model (nothing is loaded yet, the model
  is on the meta device); the after-hook compresses the loaded dense tables (TT-SVD /
  k-means for ``init="pretrained"``).
* compressed checkpoint (its ``config.json`` has the ``quantization_config``): the
  before-hook builds the compressed modules on the meta device, checks their shapes
  against the checkpoint's header, transformers loads the stored parameters into them,
  and the after-hook restores the non-persistent buffers.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.base import _assign_is_quantized

from compemb import build_embedding

from .config import QUANT_METHOD, CompressedEmbeddingConfig
from .surgery import (apply_surgery, compressed_layers, plan_surgery,
                      restore_nonpersistent_buffers)

__all__ = ["CompressedEmbeddingQuantizer", "mark_compressed", "check_checkpoint_shapes"]


class CompressedEmbeddingQuantizer(HfQuantizer):
    """``HfQuantizer`` for :class:`CompressedEmbeddingConfig` (quant method ``"compemb"``)."""

    requires_calibration = False

    def __init__(self, quantization_config: CompressedEmbeddingConfig, **kwargs: Any) -> None:
        if not isinstance(quantization_config, CompressedEmbeddingConfig):
            raise ValueError(f"quantization_config must be a CompressedEmbeddingConfig, got "
                             f"{type(quantization_config).__name__}")
        super().__init__(copy.deepcopy(quantization_config), **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return None

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        config = self.quantization_config
        if self.pre_quantized:
            apply_surgery(model, config, from_weights=False)
            if checkpoint_files:
                check_checkpoint_shapes(model, list(checkpoint_files), config)
        else:
            plan = plan_surgery(model, config)
            # settings the table cannot take fail now, before any weight is read
            with torch.device("meta"):
                for g in plan.groups:
                    build_embedding(config.spec, int(g.weight.shape[0]), int(g.weight.shape[1]))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        if self.pre_quantized:
            restore_nonpersistent_buffers(model, config)
        else:
            apply_surgery(model, config, from_weights=True)
            self.pre_quantized = True  # from now on the model holds compressed tables
        return model

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: dense tables again (see :func:`compemb_hf.decompress`)."""
        from .surgery import decompress

        return decompress(model)

    def is_serializable(self, safe_serialization: Optional[bool] = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def get_state_dict_and_metadata(self, model):
        return None, {"compemb": QUANT_METHOD}


def mark_compressed(model: nn.Module, config: CompressedEmbeddingConfig) -> None:
    """Make a model compressed in memory look to transformers as if ``from_pretrained`` had
    compressed it: ``save_pretrained`` then writes the config and a checkpoint that reloads."""
    quantizer = CompressedEmbeddingQuantizer(config, pre_quantized=True)
    model.hf_quantizer = quantizer
    model.config.quantization_config = config
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    _assign_is_quantized(model)


def _describe(config: CompressedEmbeddingConfig) -> str:
    opts = ", ".join(f"{k}={v!r}" for k, v in config.options.items())
    return f"method={config.method!r}, {opts}"


def check_checkpoint_shapes(model: nn.Module, files: List[str],
                            config: CompressedEmbeddingConfig) -> None:
    """Compare the compressed layers' tensors with the checkpoint files' tensors
    (``.safetensors``: their headers; ``.bin``: ``torch.load(weights_only=True)`` onto the
    meta device, no tensor data kept); ``ValueError`` naming the tensor, both shapes and
    the config for any disagreement, and for a file that cannot be read (corrupt,
    truncated, or a ``.bin`` holding objects that safe loading refuses)."""

    layers = compressed_layers(model)
    expected: Dict[str, tuple] = {}
    state = model.state_dict()
    for path in layers:
        for key, value in state.items():
            if key.startswith(path + "."):
                expected[key] = tuple(value.shape)
    found: Dict[str, tuple] = {}
    for file in files:
        found.update(_checkpoint_shapes(str(file)))
    problems = []
    for key, shape in expected.items():
        if key in found and found[key] != shape:
            problems.append(f"{key}: checkpoint {found[key]}, config builds {shape}")
    for key in found:
        if any(key.startswith(p + ".") for p in layers) and key not in expected:
            problems.append(f"{key}: in the checkpoint, not built by the config")
    if problems:
        raise ValueError(
            "the compressed checkpoint's tensors do not match its quantization_config "
            f"({_describe(config)}):\n  " + "\n  ".join(problems)
            + "\nThe config.json and the weights come from different compressions; save them "
              "together with save_pretrained.")


def _checkpoint_shapes(file: str) -> Dict[str, tuple]:
    """``{name: shape}`` of the tensors of one checkpoint file (``.safetensors`` or
    ``.bin``; other files: ``{}``); ``ValueError`` for a file that cannot be read."""
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(file, framework="pt") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except Exception as err:  # noqa: BLE001  (safetensors raises its own error types)
            raise ValueError(f"{file} is not a readable safetensors file (corrupt or "
                             f"truncated?): {err}") from None
    if file.endswith(".bin"):
        try:
            state = torch.load(file, map_location="meta", weights_only=True)
        except Exception as err:  # noqa: BLE001  (zip, pickle and safe-loading errors)
            raise ValueError(f"{file} is not a readable PyTorch .bin checkpoint (corrupt or "
                             f"truncated, or holding objects that torch.load(weights_only="
                             f"True) refuses?): {err}") from None
        if not isinstance(state, dict):
            raise ValueError(f"{file} is not a readable PyTorch .bin checkpoint: it holds a "
                             f"{type(state).__name__}, not a state dict")
        return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    return {}
