"""The uncompressed baseline as a method (``"dense"``), so that specs, configs and
command lines can name it like any other."""
from ..registry import register_method
from .layer import DenseConfig, DenseEmbedding

register_method("dense", config_cls=DenseConfig, layer_cls=DenseEmbedding)

__all__ = ["DenseConfig", "DenseEmbedding"]
