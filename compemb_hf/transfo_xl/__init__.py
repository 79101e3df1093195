"""Transformer-XL (Dai et al., 2019) for transformers 5, with compressed embeddings and softmax.

Importing this package registers ``model_type="compemb-transfo-xl"`` with ``AutoConfig``,
``AutoModel`` and ``AutoModelForCausalLM``. Checkpoints of transformers 4.x
``TransfoXLLMHeadModel`` load with ``TransfoXLLMHeadModel.from_pretrained(path)``.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .adaptive import AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax
from .configuration import TransfoXLConfig
from .evaluation import evaluate_perplexity, segment_nll
from .modeling import (
    TransfoXLLMHeadModel,
    TransfoXLLMHeadModelOutput,
    TransfoXLModel,
    TransfoXLModelOutput,
    TransfoXLPreTrainedModel,
)

AutoConfig.register(TransfoXLConfig.model_type, TransfoXLConfig, exist_ok=True)
AutoModel.register(TransfoXLConfig, TransfoXLModel, exist_ok=True)
AutoModelForCausalLM.register(TransfoXLConfig, TransfoXLLMHeadModel, exist_ok=True)

__all__ = [
    "TransfoXLConfig", "TransfoXLModel", "TransfoXLLMHeadModel", "TransfoXLPreTrainedModel",
    "TransfoXLModelOutput", "TransfoXLLMHeadModelOutput", "AdaptiveEmbedding",
    "ProjectedAdaptiveLogSoftmax", "evaluate_perplexity", "segment_nll",
]
