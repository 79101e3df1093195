"""Masked LM: fairseq's RoBERTa with compressed embedding and LM head.

``--arch compemb_roberta_{base,tiny}`` (``--task masked_lm``). The LM head's projection
to the vocabulary is tied to the input embedding unless ``--untie-weights-roberta``, as
in fairseq; ``--softmax`` chooses between the tied table, a second compressed table and
a dense matrix.
"""
from torch import nn

from fairseq import utils
from fairseq.utils import safe_getattr
from fairseq.models import FairseqEncoder, register_model, register_model_architecture
from fairseq.models.roberta import RobertaEncoder, RobertaModel
from fairseq.models.roberta.model import base_architecture
from fairseq.modules import LayerNorm

from ..build import (CompressionRecord, build_output_layer, build_token_embedding,
                     compression_record, log_report)
from ..flags import add_flags, resolve_softmax, spec_from_args

#: the std RoBERTa (fairseq's init_bert_params) gives its dense token embedding: every
#: method's table starts at it (the core's init rule, compemb.init)
BERT_INIT_STD = 0.02


def _softmax_mode(args) -> str:
    untie = bool(getattr(args, "untie_weights_roberta", False))
    return resolve_softmax(args, {}, {"--untie-weights-roberta": untie}, default="tied")


class CompembLMHead(nn.Module):
    """RoBERTa's masked-LM head (dense, activation, layer norm) ending in a compemb
    output layer with a bias: ``features [..., J] -> logits [..., V]``."""

    def __init__(self, embed_dim: int, activation_fn: str, output: nn.Module) -> None:
        super().__init__()
        self.dense = nn.Linear(embed_dim, embed_dim)
        self.activation_fn = utils.get_activation_fn(activation_fn)
        self.layer_norm = LayerNorm(embed_dim)
        self.output = output

    def forward(self, features, masked_tokens=None, **kwargs):
        if masked_tokens is not None:  # project only the masked positions, as fairseq does
            features = features[masked_tokens, :]
        return self.output(self.layer_norm(self.activation_fn(self.dense(features))))


class CompembRobertaEncoder(RobertaEncoder):
    """``RobertaEncoder`` with a compressed token embedding and :class:`CompembLMHead`."""

    def __init__(self, args, dictionary, softmax: str):
        FairseqEncoder.__init__(self, dictionary)
        base_architecture(args)
        self.args = args
        if args.encoder_layers_to_keep:
            args.encoder_layers = len(args.encoder_layers_to_keep.split(","))
        embed_tokens = self.build_embedding(len(dictionary), args.encoder_embed_dim,
                                            dictionary.pad())
        self.sentence_encoder = self.build_encoder(args, dictionary, embed_tokens)
        output = build_output_layer(args, softmax, embed_tokens, len(dictionary),
                                    args.encoder_embed_dim, bias=True, init_std=BERT_INIT_STD)
        self.lm_head = CompembLMHead(args.encoder_embed_dim, args.activation_fn, output)

    def build_embedding(self, vocab_size, embedding_dim, padding_idx):
        return build_token_embedding(self.args, vocab_size, embedding_dim, padding_idx,
                                     what=f"embedding of the {vocab_size}-symbol dictionary",
                                     init_std=BERT_INIT_STD)


@register_model("compemb_roberta")
class CompembRobertaModel(CompressionRecord, RobertaModel):
    """RoBERTa with compressed token embedding and LM head (``--emb-method``,
    ``--emb-*``, ``--softmax``)."""

    def __init__(self, args, encoder):
        # RobertaModel.__init__ re-initialises every nn.Linear / nn.Embedding BERT-style
        # (std 0.02, what a dense token table gets); the compressed layers, started at that
        # std by the core's init rule, keep their own structure (TT cores, DPQ codebooks)
        compressed = {name: {k: v.clone() for k, v in m.state_dict().items()}
                      for name, m in encoder.named_modules()
                      if hasattr(m, "materialize") and not isinstance(m, nn.Embedding)}
        super().__init__(args, encoder)
        for name, state in compressed.items():
            encoder.get_submodule(name).load_state_dict(state)

    @staticmethod
    def add_args(parser):
        RobertaModel.add_args(parser)
        add_flags(parser)

    @classmethod
    def build_model(cls, args, task):
        base_architecture(args)
        spec_from_args(args)  # flag errors first, before anything is built
        if getattr(args, "adaptive_input", False):
            raise ValueError("--adaptive-input is not supported by compemb_roberta: drop it")
        softmax = _softmax_mode(args)
        args.untie_weights_roberta = softmax != "tied"
        if not hasattr(args, "max_positions"):
            if not hasattr(args, "tokens_per_sample"):
                args.tokens_per_sample = task.max_positions()
            args.max_positions = args.tokens_per_sample
        model = cls(args, CompembRobertaEncoder(args, task.source_dictionary, softmax))
        model.compemb_record = compression_record(args, softmax)
        log_report(model)
        return model


@register_model_architecture("compemb_roberta", "compemb_roberta_base")
def compemb_roberta_base(args):
    """RoBERTa-base: 12 layers, 768, ffn 3072, 12 heads."""
    base_architecture(args)


@register_model_architecture("compemb_roberta", "compemb_roberta_tiny")
def compemb_roberta_tiny(args):
    """2 layers of width 64, ffn 128, 2 heads: for tests and CPU runs."""
    args.encoder_layers = safe_getattr(args, "encoder_layers", 2)
    args.encoder_embed_dim = safe_getattr(args, "encoder_embed_dim", 64)
    args.encoder_ffn_embed_dim = safe_getattr(args, "encoder_ffn_embed_dim", 128)
    args.encoder_attention_heads = safe_getattr(args, "encoder_attention_heads", 2)
    base_architecture(args)
