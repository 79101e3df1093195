"""Tensor-Ring embeddings (method ``"tr"``)."""
from ..registry import register_method
from ..tt.plan import plan_tr
from .config import TRConfig
from .layer import TREmbedding

register_method("tr", config_cls=TRConfig, layer_cls=TREmbedding, plan=plan_tr)

__all__ = ["TRConfig", "TREmbedding", "plan_tr"]
