"""Configuration of the compemb Transformer-XL (Dai et al., 2019)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from transformers import PreTrainedConfig

from .adaptive import check_cutoffs

__all__ = ["TransfoXLConfig", "OUTPUT_MODES", "split_compressed_embedding"]

#: how the softmax follows a compressed input embedding
OUTPUT_MODES = ("tied", "untied", "dense")


def split_compressed_embedding(value: Dict[str, Any]) -> tuple:
    """``(spec_dict, output, dense_below)`` from a ``compressed_embedding`` dict: the flat
    :class:`compemb.EmbeddingSpec` dict plus the keys ``"output"`` (``"tied"``,
    ``"untied"`` or ``"dense"``, default ``"tied"``) and ``"dense_below"`` (default 0);
    validated, ``ValueError`` naming the key otherwise."""
    from compemb import EmbeddingSpec

    if not isinstance(value, dict):
        raise ValueError(f"compressed_embedding must be a dict like {{'method': 'tt', 'rank': 8, "
                         f"'output': 'tied'}}, got {value!r}")
    spec = dict(value)
    output = spec.pop("output", "tied")
    dense_below = spec.pop("dense_below", 0)
    if output not in OUTPUT_MODES:
        raise ValueError(f"compressed_embedding['output'] must be one of {OUTPUT_MODES}, got {output!r}")
    if not isinstance(dense_below, int) or dense_below < 0:
        raise ValueError(f"compressed_embedding['dense_below'] must be an int >= 0, got {dense_below!r}")
    return EmbeddingSpec.from_dict(spec), output, dense_below


class TransfoXLConfig(PreTrainedConfig):
    r"""Configuration of :class:`TransfoXLModel` / :class:`TransfoXLLMHeadModel`.

    The fields and defaults are those of transformers 4.x ``TransfoXLConfig`` (the
    WikiText-103 model), so a 4.x ``config.json`` loads as it is.

    Args:
        vocab_size: ``V``.
        cutoffs: adaptive input/softmax cluster boundaries, strictly increasing in
            ``(0, V)``; ``[]`` (with ``div_val=1``) for a plain embedding and full softmax.
        d_model: hidden size. d_embed: width of the head cluster's table.
        n_head, d_head: attention heads and their width. d_inner: feed-forward width.
        div_val: each tail cluster's table is ``div_val`` times narrower than the previous.
        pre_lnorm: LayerNorm before (True) or after (False) each sub-layer.
        n_layer: number of layers.
        mem_len: number of past hidden states kept per layer as memory (0: none).
        clamp_len: relative distances beyond this use the same encoding (<= 0: no clamp).
        same_length: every query attends to the same number of keys.
        proj_share_all_but_first: the softmax shares the tail clusters' projections with
            the adaptive input (sets ``tie_projs`` when that is not given).
        tie_projs: per cluster, whether the softmax projection is the input's.
        attn_type: 0 (the Transformer-XL relative attention; the only one implemented).
        sample_softmax: must be <= 0 (sampled softmax is not implemented, as in 4.x).
        adaptive: kept for 4.x configs (the embedding is always the adaptive one).
        dropout, dropatt: dropout on activations / attention probabilities.
        untie_r: one pair of relative biases ``(r_w_bias, r_r_bias)`` per layer (True) or
            one pair shared by every layer (False).
        init, init_range, init_std, proj_init_std: initialisation ("normal" or "uniform").
        layer_norm_epsilon: LayerNorm epsilon.
        tgt_len: training segment length (used by the evaluation helpers and the fairseq
            route); ``None`` to leave it to the caller.
        compressed_embedding: optional dict, a flat :class:`compemb.EmbeddingSpec` dict
            (``{"method": "tt", "rank": 8, ...}``) plus ``"output"``: ``"tied"`` (the
            softmax uses the compressed input tables), ``"untied"`` (the softmax has
            compressed tables of its own) or ``"dense"`` (a dense softmax), and
            ``"dense_below"``: clusters whose table has fewer entries stay dense. With
            cutoffs, each cluster's table is compressed, except where the compressed
            layer would not be smaller or (tail clusters) the method cannot take the
            table's shape: those stay dense (the rule of
            ``TransfoXLLMHeadModel.apply_compressed_embedding``).
    """

    model_type = "compemb-transfo-xl"
    keys_to_ignore_at_inference = ["mems"]
    attribute_map = {
        "n_token": "vocab_size",
        "hidden_size": "d_model",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    vocab_size: int = 267735
    cutoffs: Optional[List[int]] = None
    d_model: int = 1024
    d_embed: int = 1024
    n_head: int = 16
    d_head: int = 64
    d_inner: int = 4096
    div_val: int = 4
    pre_lnorm: bool = False
    n_layer: int = 18
    mem_len: int = 1600
    clamp_len: int = 1000
    same_length: bool = True
    proj_share_all_but_first: bool = True
    tie_projs: Optional[List[bool]] = None
    attn_type: int = 0
    sample_softmax: int = -1
    adaptive: bool = True
    dropout: float = 0.1
    dropatt: float = 0.0
    untie_r: bool = True
    init: str = "normal"
    init_range: float = 0.01
    proj_init_std: float = 0.01
    init_std: float = 0.02
    layer_norm_epsilon: float = 1e-5
    tgt_len: Optional[int] = None
    compressed_embedding: Optional[Dict[str, Any]] = None
    eos_token_id: Optional[int] = 0
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.cutoffs is None:
            self.cutoffs = [20000, 40000, 200000]
        self.cutoffs = [int(c) for c in self.cutoffs]
        check_cutoffs(self.cutoffs, self.vocab_size, self.d_embed, self.div_val)
        for name in ("d_model", "d_embed", "n_head", "d_head", "d_inner", "n_layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.mem_len, int) or self.mem_len < 0:
            raise ValueError(f"mem_len must be an int >= 0 (0: no memory), got {self.mem_len!r}")
        if not isinstance(self.clamp_len, int):
            raise ValueError(f"clamp_len must be an int (<= 0: no clamping), got {self.clamp_len!r}")
        if self.tgt_len is not None and (not isinstance(self.tgt_len, int) or self.tgt_len < 1):
            raise ValueError(f"tgt_len must be a positive int or None, got {self.tgt_len!r}")
        if self.attn_type != 0:
            raise ValueError(f"attn_type must be 0 (relative attention of Transformer-XL); "
                             f"got {self.attn_type!r}")
        if self.sample_softmax > 0:
            raise ValueError(f"sample_softmax must be <= 0 (the sampled softmax is not "
                             f"implemented), got {self.sample_softmax!r}")
        if self.init not in ("normal", "uniform"):
            raise ValueError(f"init must be 'normal' or 'uniform', got {self.init!r}")
        if self.tie_projs is None:
            self.tie_projs = [False] + [bool(self.proj_share_all_but_first)] * len(self.cutoffs)
        self.tie_projs = [bool(t) for t in self.tie_projs]
        if len(self.tie_projs) != len(self.cutoffs) + 1:
            raise ValueError(f"tie_projs needs one entry per cluster ({len(self.cutoffs) + 1}), "
                             f"got {self.tie_projs}")
        if self.compressed_embedding is not None:
            split_compressed_embedding(self.compressed_embedding)
        super().__post_init__(**kwargs)
