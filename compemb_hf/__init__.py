"""compemb for Hugging Face transformers.

``import compemb_hf`` registers the ``"compemb"`` quantization method with transformers;
after it, any model compresses its embeddings (and softmax) on load::

    import compemb_hf
    cfg = compemb_hf.CompressedEmbeddingConfig(method="tt", rank=16)
    model = AutoModelForMaskedLM.from_pretrained(path, compressed_embedding=cfg)
    # or: from_pretrained(path, quantization_config=cfg)
    # or, in memory: compemb_hf.compress(model, cfg)
    model.save_pretrained(out)           # only the compressed parameters
    AutoModelForMaskedLM.from_pretrained(out)   # rebuilds them (needs `import compemb_hf`)

A compressed checkpoint does not load without ``import compemb_hf``: transformers raises
``ValueError: The model's quantization config ... has no `quant_method` attribute``.
"""
from .calibration import CalibrationResult, calibrate
from .config import CompressedEmbeddingConfig
from .hooks import install as _install, register_from_pretrained_kwarg
from .quantizer import CompressedEmbeddingQuantizer
from .surgery import (ScaledEmbedding, compress, compressed_layers, decompress,
                      export_codebooks, is_compressed)

_install()

from . import transfo_xl  # noqa: E402,F401  (registers the Transformer-XL model types)
from .pretrained import PretrainedCompression, compress_pretrained  # noqa: E402

__all__ = ["CompressedEmbeddingConfig", "CompressedEmbeddingQuantizer", "compress",
           "compressed_layers", "decompress", "export_codebooks", "is_compressed", "ScaledEmbedding",
           "register_from_pretrained_kwarg", "calibrate", "CalibrationResult",
           "compress_pretrained", "PretrainedCompression"]
