"""Transformer-XL (Dai et al., 2019) for transformers 5, with compressed embeddings and softmax.

Importing this package registers ``model_type="compemb-transfo-xl"`` with ``AutoConfig``,
``AutoModel`` and ``AutoModelForCausalLM``. Checkpoints of transformers 4.x
``TransfoXLLMHeadModel`` (``model_type="transfo-xl"``, registered too) load with
``AutoModelForCausalLM.from_pretrained(path)`` or ``TransfoXLLMHeadModel.from_pretrained(path)``.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .adaptive import AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax
from .configuration import TransfoXLConfig
from .legacy import TransfoXL4xConfig
from .evaluation import evaluate_perplexity, segment_nll
from .modeling import (
    TransfoXLLMHeadModel,
    TransfoXLLMHeadModelOutput,
    TransfoXLModel,
    TransfoXLModelOutput,
    TransfoXLPreTrainedModel,
)


def _register(config_cls) -> bool:
    try:
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    except ValueError:  # a transformers release that has the model type itself
        return False
    AutoModel.register(config_cls, TransfoXLModel, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, TransfoXLLMHeadModel, exist_ok=True)
    return True


_register(TransfoXLConfig)
_register(TransfoXL4xConfig)  # "transfo-xl": checkpoints of transformers 4.x

__all__ = [
    "TransfoXLConfig", "TransfoXL4xConfig", "TransfoXLModel", "TransfoXLLMHeadModel", "TransfoXLPreTrainedModel",
    "TransfoXLModelOutput", "TransfoXLLMHeadModelOutput", "AdaptiveEmbedding",
    "ProjectedAdaptiveLogSoftmax", "evaluate_perplexity", "segment_nll",
]
