"""compemb: compressed embedding and softmax layers (TT, TR, DPQ) for PyTorch.

torch only: this package never imports transformers or fairseq.
"""
from . import dense  # noqa: F401  (registers the "dense" method)
from .checks import check_indices
from .dense import DenseEmbedding
from .output import OutputLayer
from .plan import plan
from .registry import available_methods, get_method, register_method
from .report import CompressionReport, LayerStorage, compression_report
from .spec import EmbeddingSpec, build_embedding, compress_embedding

__version__ = "0.1.0"
