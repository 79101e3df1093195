"""Translation: the fairseq Transformer with compressed embeddings and softmax.

``--arch compemb_transformer_{tiny,base,wmt_en_de_big}``: fairseq's ``transformer``
(the same flags, layers and defaults) whose token embeddings are built by
:func:`fairseq_plugin.build.build_token_embedding` and whose output layer by
:func:`fairseq_plugin.build.build_output_layer`.
"""
from __future__ import annotations

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import (
    TransformerDecoderBase,
    TransformerModel,
    base_architecture,
    tiny_architecture,
    transformer_vaswani_wmt_en_de_big,
)
from fairseq.modules import BaseLayer

from ..build import (CompressionRecord, build_output_layer, build_token_embedding,
                     compression_record, log_report)
from ..flags import add_flags, resolve_softmax, spec_from_args


def _softmax_mode(args) -> str:
    return resolve_softmax(args, {
        "--share-all-embeddings": bool(getattr(args, "share_all_embeddings", False)),
        "--share-decoder-input-output-embed":
            bool(getattr(args, "share_decoder_input_output_embed", False)),
    })


class CompembTransformerDecoder(TransformerDecoderBase):
    """The Transformer decoder whose output projection is a compemb output layer."""

    def build_output_projection(self, cfg, dictionary, embed_tokens):
        if cfg.adaptive_softmax_cutoff is not None:
            raise ValueError("--adaptive-softmax-cutoff replaces the output layer by fairseq's "
                             "AdaptiveSoftmax; the compemb models compress it instead "
                             "(--softmax): drop --adaptive-softmax-cutoff")
        self.output_projection = build_output_layer(
            cfg, cfg.compemb_softmax, embed_tokens, len(dictionary), self.output_embed_dim)
        for i in range(cfg.base_layers):  # as the stock decoder does
            self.layers.insert(((i + 1) * cfg.decoder.layers) // (cfg.base_layers + 1),
                               BaseLayer(cfg))

    def upgrade_state_dict_named(self, state_dict, name):
        # the stock decoder copies embed_tokens.weight to output_projection.weight for
        # checkpoints without the latter: a tied compemb output layer has no such tensor
        key = f"{name}.output_projection.weight"
        had = key in state_dict
        state_dict = super().upgrade_state_dict_named(state_dict, name)
        if not had and key in state_dict and "weight" not in dict(
                self.output_projection.named_parameters(recurse=False)):
            del state_dict[key]
        return state_dict


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
        args.compemb_softmax = _softmax_mode(args)
        if args.compemb_softmax == "tied":
            args.share_decoder_input_output_embed = True
        model = super().build_model(args, task)
        model.compemb_record = compression_record(args, args.compemb_softmax)
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
        cfg = cls._config(args)
        return CompembTransformerDecoder(cfg, tgt_dict, embed_tokens,
                                         no_encoder_attn=cfg.no_cross_attention)

    @staticmethod
    def _config(args):
        from fairseq.models.transformer import TransformerConfig
        return TransformerConfig.from_namespace(args)


@register_model_architecture("compemb_transformer", "compemb_transformer_tiny")
def compemb_transformer_tiny(args):
    """2+2 layers of width 64, 2 heads: for tests and CPU runs."""
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 128)
    tiny_architecture(args)


@register_model_architecture("compemb_transformer", "compemb_transformer_base")
def compemb_transformer_base(args):
    """Transformer-base (6+6 layers, 512, ffn 2048, 8 heads)."""
    base_architecture(args)


@register_model_architecture("compemb_transformer", "compemb_transformer_wmt_en_de_big")
def compemb_transformer_wmt_en_de_big(args):
    """Transformer-big of the TT paper (6+6 layers, 1024, ffn 4096, 16 heads, dropout 0.3)."""
    transformer_vaswani_wmt_en_de_big(args)
