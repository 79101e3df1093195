"""compemb: compressed embedding and softmax layers (TT, TR, DPQ) for PyTorch.

torch only: this package never imports transformers or fairseq. Each method lives in its
own sub-package and registers itself (``compemb/registry.py``) on import.
"""
from . import dense, dpq, tr, tt  # noqa: F401  (each registers its method)
from .checks import check_indices
from .contract import EmbeddingLayer
from .dense import DenseConfig, DenseEmbedding
from .dpq import CodebookEmbedding, DPQConfig, DPQEmbedding
from .output import OutputLayer
from .plan import plan
from .registry import available_methods, get_method, register_method
from .report import CompressionReport, LayerStorage, compression_report
from .spec import EmbeddingSpec, build_embedding, compress_embedding
from .tr import TRConfig, TREmbedding
from .tt import TTConfig, TTEmbedding

__version__ = "0.1.0"

__all__ = [
    "TTEmbedding", "TREmbedding", "DPQEmbedding", "CodebookEmbedding", "DenseEmbedding",
    "TTConfig", "TRConfig", "DPQConfig", "DenseConfig",
    "OutputLayer", "EmbeddingSpec", "build_embedding", "compress_embedding", "plan",
    "compression_report", "CompressionReport", "LayerStorage",
    "register_method", "get_method", "available_methods", "check_indices", "EmbeddingLayer",
]
