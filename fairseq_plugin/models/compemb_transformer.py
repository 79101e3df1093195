"""Translation: the fairseq Transformer with compressed embeddings and softmax.

``--arch compemb_transformer_{tiny,base,wmt_en_de_big}``: fairseq's ``transformer``
(the same flags, layers and defaults) whose token embeddings are built by
:func:`fairseq_plugin.build.build_token_embedding` and whose output layer by
:func:`fairseq_plugin.build.build_output_layer`.
"""
from __future__ import annotations

from fairseq.models import register_model, register_model_architecture
from fairseq.utils import safe_getattr
from fairseq.models.transformer import (
    TransformerConfig,
    TransformerModel,
    base_architecture,
    tiny_architecture,
    transformer_vaswani_wmt_en_de_big,
)

from ..build import CompressionRecord, build_token_embedding, compression_record, log_report
from ..decoder import CompembTransformerDecoder
from ..flags import add_flags, resolve_softmax, spec_from_args


def _softmax_mode(args) -> str:
    return resolve_softmax(args, {
        "--share-all-embeddings": bool(getattr(args, "share_all_embeddings", False)),
        "--share-decoder-input-output-embed":
            bool(getattr(args, "share_decoder_input_output_embed", False)),
    })


@register_model("compemb_transformer")
class CompembTransformerModel(CompressionRecord, TransformerModel):
    """fairseq's Transformer with compressed token embeddings and output layer
    (``--emb-method``, ``--emb-*``, ``--softmax``)."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        add_flags(parser)

    @classmethod
    def build_model(cls, args, task):
        base_architecture(args)
        spec_from_args(args)  # flag errors first, before anything is built
        if getattr(args, "adaptive_input", False):
            raise ValueError("--adaptive-input replaces the token embedding by fairseq's "
                             "AdaptiveInput; the compemb models compress it instead "
                             "(--emb-method): drop --adaptive-input")
        softmax = _softmax_mode(args)
        if softmax == "tied":
            args.share_decoder_input_output_embed = True
        model = super().build_model(args, task)
        model.compemb_record = compression_record(args, softmax)
        log_report(model)
        return model

    @classmethod
    def build_embedding(cls, args, dictionary, embed_dim, path=None):
        if path:
            raise ValueError("--encoder-embed-path/--decoder-embed-path load a dense table; "
                             "the compemb models build compressed ones: drop the flag")
        return build_token_embedding(args, len(dictionary), embed_dim, dictionary.pad(),
                                     what=f"embedding of the {len(dictionary)}-symbol dictionary")

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        # args: the TransformerConfig, with the --emb-* flags among its extra attributes
        cfg = TransformerConfig.from_namespace(args)
        return CompembTransformerDecoder(cfg, tgt_dict, embed_tokens, flags=cfg,
                                         softmax=_softmax_mode(cfg),
                                         no_encoder_attn=cfg.no_cross_attention)


@register_model_architecture("compemb_transformer", "compemb_transformer_tiny")
def compemb_transformer_tiny(args):
    """2+2 layers of width 64, 2 heads: for tests and CPU runs."""
    args.encoder_ffn_embed_dim = safe_getattr(args, "encoder_ffn_embed_dim", 128)
    tiny_architecture(args)


@register_model_architecture("compemb_transformer", "compemb_transformer_base")
def compemb_transformer_base(args):
    """Transformer-base (6+6 layers, 512, ffn 2048, 8 heads)."""
    base_architecture(args)


@register_model_architecture("compemb_transformer", "compemb_transformer_wmt_en_de_big")
def compemb_transformer_wmt_en_de_big(args):
    """Transformer-big of the TT paper (6+6 layers, 1024, ffn 4096, 16 heads, dropout 0.3)."""
    transformer_vaswani_wmt_en_de_big(args)
