"""Tensor-Train embeddings (method ``"tt"``)."""
from ..registry import register_method
from .config import TTConfig
from .layer import TensorNetworkEmbedding, TTEmbedding
from .plan import plan_tt

register_method("tt", config_cls=TTConfig, layer_cls=TTEmbedding, plan=plan_tt)

__all__ = ["TTConfig", "TTEmbedding", "TensorNetworkEmbedding", "plan_tt"]
