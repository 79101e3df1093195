"""Tiny random transformers models, one per supported family (for tests and examples).

``tiny_model(family)`` builds a model of a few thousand parameters from a config, with a
vocabulary of ``VOCAB`` symbols; ``dummy_inputs(family, model)`` gives matching inputs.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

__all__ = ["FAMILIES", "VOCAB", "tiny_model", "dummy_inputs"]

VOCAB = 60
FAMILIES = ("bert-mlm", "bert-cls", "roberta-mlm", "roberta-cls", "gpt2", "llama", "t5",
            "bart", "marian")
SEQ2SEQ = ("t5", "bart", "marian")


def tiny_model(family: str, **overrides) -> nn.Module:
    """A small randomly initialised model of ``family`` (one of :data:`FAMILIES`)."""
    import transformers as tf

    enc = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=40)
    s2s = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
               max_position_embeddings=40, pad_token_id=1, bos_token_id=0, eos_token_id=2,
               decoder_start_token_id=2)
    if family in ("bert-mlm", "bert-cls"):
        cfg = tf.BertConfig(vocab_size=VOCAB, num_labels=3, **enc, **overrides)
        cls = tf.BertForMaskedLM if family == "bert-mlm" else tf.BertForSequenceClassification
    elif family in ("roberta-mlm", "roberta-cls"):
        cfg = tf.RobertaConfig(vocab_size=VOCAB, num_labels=3, pad_token_id=1, **{
            **enc, "max_position_embeddings": 44}, **overrides)
        cls = tf.RobertaForMaskedLM if family == "roberta-mlm" else tf.RobertaForSequenceClassification
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=40,
                            bos_token_id=0, eos_token_id=0, **overrides)
        cls = tf.GPT2LMHeadModel
    elif family == "llama":
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=40, bos_token_id=0, eos_token_id=2,
                             pad_token_id=None, **{"tie_word_embeddings": True, **overrides})
        cls = tf.LlamaForCausalLM
    elif family == "t5":
        cfg = tf.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                          num_heads=2, decoder_start_token_id=0, **overrides)
        cls = tf.T5ForConditionalGeneration
    elif family == "bart":
        cfg = tf.BartConfig(vocab_size=VOCAB, scale_embedding=True, **s2s, **overrides)
        cls = tf.BartForConditionalGeneration
    elif family == "marian":
        cfg = tf.MarianConfig(vocab_size=VOCAB, **s2s, **overrides)
        cls = tf.MarianMTModel
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return cls(cfg)


def dummy_inputs(family: str, batch: int = 2, length: int = 7, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family in SEQ2SEQ:
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, length - 2), generator=g)
    return out
