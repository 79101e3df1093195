"""Transformer-XL language model for fairseq, with compressed embedding and softmax.

``--arch compemb_transformer_xl`` (and ``compemb_transformer_xl_wt103_base``,
``compemb_transformer_xl_tiny``) wraps :class:`compemb_hf.transfo_xl.TransfoXLLMHeadModel`
for the task ``truncated_bptt_lm`` (fairseq's ``examples/truncated_bptt``, registered
when this module is imported), which feeds each stream's segments in order so that the
memories carry over from one batch to the next::

    fairseq-train data-bin/wikitext-103 --user-dir fairseq_plugin \\
        --task truncated_bptt_lm --tokens-per-sample 150 --batch-size 15 \\
        --arch compemb_transformer_xl_wt103_base --mem-len 150 \\
        --emb-method tt --emb-rank 16 --softmax tied --cutoffs "" ...

Without ``--emb-method`` the model is the plain Transformer-XL (adaptive input and
softmax with ``--cutoffs`` / ``--div-val``). With it, the tables are compressed as
``compressed_embedding`` of :class:`compemb_hf.transfo_xl.TransfoXLConfig` describes
(``--softmax tied`` by default: the softmax shares the compressed tables); with
``--cutoffs`` each adaptive cluster's table is compressed.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from fairseq.models import FairseqIncrementalDecoder, FairseqLanguageModel, register_model, \
    register_model_architecture
from fairseq.utils import safe_getattr
from omegaconf import II

import fairseq.examples.truncated_bptt  # noqa: F401  (registers the truncated_bptt_lm task)

from ..build import CompressionRecord, compression_record, log_report
from ..flags import CompembFlags, resolve_softmax, spec_from_args


@dataclass
class CompembTransformerXLConfig(CompembFlags):
    """Transformer-XL settings (the names of the original code) and the compression flags."""

    cutoffs: str = field(default="20000,40000,200000", metadata={
        "help": "adaptive input/softmax cluster boundaries, comma-separated; those not "
                "below the dictionary size are dropped; '' for a full softmax"})
    div_val: int = field(default=1, metadata={"help": "width divisor between clusters"})
    d_model: int = field(default=500, metadata={"help": "hidden size"})
    d_embed: Optional[int] = field(default=None, metadata={
        "help": "width of the head cluster's table (default: d_model)"})
    n_head: int = field(default=10, metadata={"help": "attention heads"})
    d_head: int = field(default=50, metadata={"help": "width of each head"})
    d_inner: int = field(default=1000, metadata={"help": "feed-forward width"})
    n_layer: int = field(default=12, metadata={"help": "layers"})
    mem_len: int = field(default=0, metadata={"help": "memory length (past positions kept)"})
    clamp_len: int = field(default=-1, metadata={
        "help": "relative distances beyond this share an encoding (<= 0: no clamp)"})
    same_length: bool = field(default=False, metadata={
        "help": "every query attends to the same number of keys"})
    pre_lnorm: bool = field(default=False, metadata={"help": "LayerNorm before each sub-layer"})
    untie_r: bool = field(default=True, metadata={
        "help": "relative-position biases per layer (True) or shared"})
    dropout: float = field(default=0.0, metadata={"help": "dropout"})
    dropatt: float = field(default=0.0, metadata={"help": "attention dropout"})
    max_target_positions: int = II("task.max_target_positions")


def _cutoffs(text: Any, vocab_size: int) -> List[int]:
    if isinstance(text, (list, tuple)):
        values = list(text)
    else:
        text = str(text or "").strip()
        try:
            values = [int(v) for v in text.split(",")] if text else []
        except ValueError:
            raise ValueError(f"--cutoffs must be comma-separated integers like '20000,40000', "
                             f"got {text!r}") from None
    return [c for c in values if c < vocab_size]


def transfo_xl_config(cfg: Any, vocab_size: int):
    """The :class:`compemb_hf.transfo_xl.TransfoXLConfig` of a fairseq config."""
    from compemb_hf.transfo_xl import TransfoXLConfig

    compressed = None
    if safe_getattr(cfg, "emb_method", None) is not None:
        spec = spec_from_args(cfg)
        softmax = resolve_softmax(cfg, {}, default="tied")
        compressed = {**spec.to_dict(), "output": softmax}
    return TransfoXLConfig(
        vocab_size=vocab_size, cutoffs=_cutoffs(cfg.cutoffs, vocab_size), div_val=cfg.div_val,
        d_model=cfg.d_model, d_embed=cfg.d_embed or cfg.d_model, n_head=cfg.n_head,
        d_head=cfg.d_head, d_inner=cfg.d_inner, n_layer=cfg.n_layer, mem_len=cfg.mem_len,
        clamp_len=cfg.clamp_len, same_length=cfg.same_length, pre_lnorm=cfg.pre_lnorm,
        untie_r=cfg.untie_r, dropout=cfg.dropout, dropatt=cfg.dropatt,
        compressed_embedding=compressed, eos_token_id=None)


@register_model("compemb_transformer_xl", dataclass=CompembTransformerXLConfig)
class CompembTransformerXLLanguageModel(CompressionRecord, FairseqLanguageModel):
    """fairseq language model around the compemb_hf Transformer-XL."""

    @classmethod
    def build_model(cls, cfg, task):
        decoder = CompembTransformerXLDecoder(cfg, task)
        model = cls(decoder)
        if safe_getattr(cfg, "emb_method", None) is not None:
            output = decoder.model.config.compressed_embedding["output"]
            model.compemb_record = compression_record(cfg, output)
        else:
            model.compemb_record = {}
        log_report(model)
        return model


class CompembTransformerXLDecoder(FairseqIncrementalDecoder):
    """Training: the memories of the previous batch are used and replaced (the task
    feeds each stream in order); they are dropped when the batch size or the
    train/eval mode changes. Generation: the memories live in ``incremental_state``.
    The output is log-probabilities ``[batch, len, V]``."""

    def __init__(self, cfg, task):
        from compemb_hf.transfo_xl import TransfoXLLMHeadModel

        super().__init__(task.target_dictionary)
        self.cfg = cfg
        self.model = TransfoXLLMHeadModel(transfo_xl_config(cfg, len(task.target_dictionary)))
        self._mems: Optional[List[torch.Tensor]] = None
        self._mems_training: Optional[bool] = None

    def forward(self, src_tokens, src_lengths=None, incremental_state=None, encoder_out=None):
        if incremental_state is not None:
            mems = self.get_incremental_state(incremental_state, "mems")
            if mems is not None:
                src_tokens = src_tokens[:, -1:]  # the memories hold the rest
        else:
            mems = self._mems
            if mems is not None and (mems[0].shape[1] != src_tokens.shape[0]
                                     or self._mems_training != self.training):
                mems = None  # another stream of batches
        out = self.model(input_ids=src_tokens, mems=mems)
        if incremental_state is not None:
            if out.mems is not None:
                self.set_incremental_state(incremental_state, "mems", out.mems)
        else:
            self._mems, self._mems_training = out.mems, self.training
        return out.logits, {"mems": out.mems}

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        logp = net_output[0].float()  # already log-probabilities
        return logp if log_probs else logp.exp()

    def max_positions(self):
        return self.cfg.max_target_positions

    def reorder_incremental_state(self, incremental_state: Dict[str, Any], new_order: torch.Tensor):
        mems = self.get_incremental_state(incremental_state, "mems")
        if mems is not None:
            self.set_incremental_state(incremental_state, "mems",
                                       [m.index_select(1, new_order) for m in mems])


def _defaults(args, **values) -> None:
    """Set each of ``values`` on ``args`` unless the command line gave it."""
    for name, value in values.items():
        setattr(args, name, safe_getattr(args, name, value))


@register_model_architecture("compemb_transformer_xl", "compemb_transformer_xl_wt103_base")
def compemb_transformer_xl_wt103_base(args):
    """The base WikiText-103 model of the paper (16 layers, 410, 10 heads of 41, ffn 2100)."""
    _defaults(args, n_layer=16, d_model=410, n_head=10, d_head=41, d_inner=2100, dropout=0.1,
              mem_len=150)


@register_model_architecture("compemb_transformer_xl", "compemb_transformer_xl_tiny")
def compemb_transformer_xl_tiny(args):
    """2 layers of width 32, for tests and CPU runs."""
    _defaults(args, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, mem_len=16)
