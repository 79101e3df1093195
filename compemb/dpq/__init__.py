"""Differentiable Product Quantization (``"dpq"``): :class:`DPQEmbedding` for training,
:class:`CodebookEmbedding` (packed codes + values) for inference."""
from ..registry import register_method
from .codebook import CodebookEmbedding
from .config import DPQConfig
from .layer import CODEBOOK_LOSS_WEIGHT, DPQEmbedding
from .plan import plan_dpq

register_method("dpq", config_cls=DPQConfig, layer_cls=DPQEmbedding, plan=plan_dpq)

__all__ = ["CODEBOOK_LOSS_WEIGHT", "CodebookEmbedding", "DPQConfig", "DPQEmbedding", "plan_dpq"]
