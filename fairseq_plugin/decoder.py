"""The Transformer decoder of the plugin's translation and language models: fairseq's
own, with a compemb output layer."""
from typing import Any

from fairseq.models.transformer import TransformerDecoderBase
from fairseq.modules import BaseLayer

from .build import build_output_layer

__all__ = ["CompembTransformerDecoder"]


class CompembTransformerDecoder(TransformerDecoderBase):
    """``TransformerDecoderBase`` whose output projection is built by
    :func:`fairseq_plugin.build.build_output_layer`.

    Args:
        cfg: the ``TransformerConfig``.
        flags: the parsed arguments holding the ``--emb-*`` flags.
        softmax: the resolved output mode (``"tied"``, ``"untied"``, ``"dense"``).
    """

    def __init__(self, cfg, dictionary, embed_tokens, *, flags: Any, softmax: str,
                 no_encoder_attn: bool = False) -> None:
        # read by build_output_projection, which the base constructor calls
        self.compemb_flags = flags
        self.compemb_softmax = softmax
        super().__init__(cfg, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn)

    def build_output_projection(self, cfg, dictionary, embed_tokens):
        if cfg.adaptive_softmax_cutoff is not None:
            raise ValueError("--adaptive-softmax-cutoff replaces the output layer by fairseq's "
                             "AdaptiveSoftmax; the compemb models compress it instead "
                             "(--softmax tied/untied): drop --adaptive-softmax-cutoff")
        self.output_projection = build_output_layer(
            self.compemb_flags, self.compemb_softmax, embed_tokens, len(dictionary),
            self.output_embed_dim)
        for i in range(cfg.base_layers):  # as the stock decoder does
            self.layers.insert(((i + 1) * cfg.decoder.layers) // (cfg.base_layers + 1),
                               BaseLayer(cfg))

    def upgrade_state_dict_named(self, state_dict, name):
        # the stock decoder copies embed_tokens.weight to output_projection.weight for
        # checkpoints without the latter: a compemb output layer has no such tensor
        key = f"{name}.output_projection.weight"
        had = key in state_dict
        state_dict = super().upgrade_state_dict_named(state_dict, name)
        if not had and key in state_dict and "weight" not in dict(
                self.output_projection.named_parameters(recurse=False)):
            del state_dict[key]
        return state_dict
