"""Language model: fairseq's ``transformer_lm`` with compressed embedding and softmax.

``--arch compemb_transformer_lm{,_wiki103,_tiny}``. The compressed input embedding and
output layer take the place of fairseq's adaptive input / adaptive softmax, so those
flags are refused here (the stock ``transformer_lm_wiki103`` keeps them).
"""
from dataclasses import dataclass

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerConfig
from fairseq.models.transformer_lm import (
    DEFAULT_MAX_TARGET_POSITIONS,
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
    transformer_lm_big,
)
from fairseq.utils import safe_getattr

from ..build import CompressionRecord, build_token_embedding, compression_record, log_report
from ..decoder import CompembTransformerDecoder
from ..flags import CompembFlags, resolve_softmax, spec_from_args

# flags of transformer_lm that swap the token embedding or the softmax for another layer
_REPLACED = {
    "adaptive_input": "--adaptive-input (fairseq's AdaptiveInput)",
    "character_embeddings": "--character-embeddings (a character CNN)",
    "adaptive_softmax_cutoff": "--adaptive-softmax-cutoff (fairseq's AdaptiveSoftmax)",
    "tie_adaptive_weights": "--tie-adaptive-weights (adaptive input/softmax tying)",
}


@dataclass
class CompembTransformerLMConfig(TransformerLanguageModelConfig, CompembFlags):
    """``transformer_lm``'s settings plus the compression flags."""


@register_model("compemb_transformer_lm", dataclass=CompembTransformerLMConfig)
class CompembTransformerLanguageModel(CompressionRecord, TransformerLanguageModel):
    """fairseq's Transformer language model with compressed token embedding and output
    layer (``--emb-method``, ``--emb-*``, ``--softmax``)."""

    @classmethod
    def build_model(cls, args, task):
        spec_from_args(args)  # flag errors first, before anything is built
        for name, what in _REPLACED.items():
            if safe_getattr(args, name, None):
                raise ValueError(
                    f"{what} replaces the layer that the compemb models compress "
                    f"(--emb-method / --softmax): drop it, or train the stock transformer_lm "
                    f"architectures for adaptive input/softmax")
        if args.decoder_layers_to_keep:
            args.decoder_layers = len(args.decoder_layers_to_keep.split(","))
        if safe_getattr(args, "max_target_positions", None) is None:
            args.max_target_positions = safe_getattr(args, "tokens_per_sample",
                                                     DEFAULT_MAX_TARGET_POSITIONS)
        softmax = resolve_softmax(args, {"--share-decoder-input-output-embed":
                                         bool(args.share_decoder_input_output_embed)})
        if softmax == "tied":
            args.share_decoder_input_output_embed = True
        embed_tokens = cls.build_embedding(args, task.source_dictionary, args.decoder_input_dim)
        decoder = CompembTransformerDecoder(
            TransformerConfig.from_namespace(args), task.target_dictionary, embed_tokens,
            flags=args, softmax=softmax, no_encoder_attn=True)
        model = cls(decoder)
        model.compemb_record = compression_record(args, softmax)
        log_report(model)
        return model

    @classmethod
    def build_embedding(cls, args, dictionary, embed_dim, path=None):
        return build_token_embedding(args, len(dictionary), embed_dim, dictionary.pad(),
                                     what=f"embedding of the {len(dictionary)}-symbol dictionary")


# --arch compemb_transformer_lm: registered by register_model above with the dataclass
# defaults (6 layers, 512, ffn 2048, 8 heads), as the stock transformer_lm is.


@register_model_architecture("compemb_transformer_lm", "compemb_transformer_lm_wiki103")
def compemb_transformer_lm_wiki103(args):
    """The shape of fairseq's ``transformer_lm_wiki103`` (16 layers, 1024, ffn 4096,
    8 heads, dropout 0.3) with compressed embedding/softmax instead of adaptive ones."""
    args.decoder_layers = safe_getattr(args, "decoder_layers", 16)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 8)
    args.dropout = safe_getattr(args, "dropout", 0.3)
    args.attention_dropout = safe_getattr(args, "attention_dropout", 0.1)
    args.activation_dropout = safe_getattr(args, "activation_dropout", 0.1)
    args.no_decoder_final_norm = safe_getattr(args, "no_decoder_final_norm", True)
    transformer_lm_big(args)


@register_model_architecture("compemb_transformer_lm", "compemb_transformer_lm_tiny")
def compemb_transformer_lm_tiny(args):
    """2 layers of width 64, ffn 128, 2 heads: for tests and CPU runs."""
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 64)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 128)
    args.decoder_layers = safe_getattr(args, "decoder_layers", 2)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 2)
    base_lm_architecture(args)
