"""Transformer-XL (Dai et al., 2019) for transformers 5, with compressed embeddings.

Relative positional attention with the two global biases (``r_w_bias`` for content,
``r_r_bias`` for position), segment-level recurrence (``mems`` in, ``mems`` out),
``mem_len`` / ``clamp_len`` / ``same_length``, adaptive input and adaptive softmax.
The state_dict layout is that of transformers 4.x ``TransfoXLLMHeadModel`` (so the
public WikiText-103 checkpoint layout loads); the code is written for this project.

Shapes: the public API is batch-first (``input_ids [batch, len]``); inside, as in the
original code, activations are ``[len, batch, d_model]`` and memories are a list of
``n_layer`` tensors ``[mem_len, batch, d_model]`` (the inputs of each layer for the last
``mem_len`` positions).

Differences from 4.x (on purpose):
* ``mems=None`` means *no* memory (the original paper code); 4.x started from
  ``mem_len`` zero vectors. ``init_mems(batch)`` gives those zero memories for
  bit-compatibility with 4.x outputs.
* ``losses`` are in token order (4.x grouped them by cluster unless ``keep_order``).
* The LM output's ``logits`` are log-probabilities (4.x called them
  ``prediction_scores``, still available as an alias).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .adaptive import AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax
from .configuration import OUTPUT_MODES, TransfoXLConfig, split_compressed_embedding

__all__ = [
    "TransfoXLModel", "TransfoXLLMHeadModel", "TransfoXLPreTrainedModel",
    "TransfoXLModelOutput", "TransfoXLLMHeadModelOutput",
    "rel_shift", "build_attention_mask", "update_mems", "relative_positions",
]


# ----------------------------------------------------------------------------- pure functions

def rel_shift(x: Tensor) -> Tensor:
    """Relative shift of the position scores ``x [qlen, klen, ...]``.

    Column ``j`` of the input holds the score for relative distance ``klen - 1 - j``;
    the output's entry ``[i, j]`` holds the score for distance ``i + (klen - qlen) - j``
    (the query at ``i`` is key position ``i + mlen``), for every ``j`` up to that key.
    Entries above that diagonal are junk and must be masked.
    """
    qlen, klen = x.shape[:2]
    pad = x.new_zeros((qlen, 1) + x.shape[2:])
    padded = torch.cat([pad, x], dim=1).view((klen + 1, qlen) + x.shape[2:])
    return padded[1:].view_as(x)


def build_attention_mask(qlen: int, mlen: int, mem_len: int, same_length: bool,
                   device: Optional[torch.device] = None) -> Tensor:
    """``BoolTensor [qlen, qlen + mlen]``, True where the query may NOT attend.

    Causal over ``mlen`` memory positions followed by the segment; with ``same_length``
    each query also drops keys ``mem_len`` or more positions back (so that every query
    sees the same number of keys, as in 4.x; ignored when ``mem_len == 0``)."""
    klen = mlen + qlen
    ones = torch.ones(qlen, klen, dtype=torch.bool, device=device)
    mask = torch.triu(ones, diagonal=1 + mlen)
    if same_length and mem_len > 0:
        mask_len = klen - mem_len
        shift = qlen - mask_len if mask_len > 0 else qlen
        mask = mask | torch.tril(ones, diagonal=-shift)
    return mask


def relative_positions(klen: int, clamp_len: int, device=None, dtype=torch.float32) -> Tensor:
    """Distances ``klen - 1, ..., 0`` (``[klen]``), clamped at ``clamp_len`` when > 0."""
    pos = torch.arange(klen - 1, -1, -1, device=device).to(dtype)
    if clamp_len > 0:
        pos = pos.clamp(max=clamp_len)
    return pos


def update_mems(hids: List[Tensor], mems: Optional[List[Tensor]], mem_len: int) -> Optional[List[Tensor]]:
    """New memories: the last ``mem_len`` positions of ``mems[i] ++ hids[i]``, detached.

    ``hids``: one ``[qlen, batch, d]`` per layer; ``mems``: ``[mlen, batch, d]`` per layer
    or None. Returns None when ``mem_len == 0``."""
    if mem_len <= 0:
        return None
    with torch.no_grad():
        out = []
        for i, h in enumerate(hids):
            cat = h if mems is None else torch.cat([mems[i], h], dim=0)
            out.append(cat[-mem_len:].detach())
    return out


# ----------------------------------------------------------------------------- modules

class PositionalEmbedding(nn.Module):
    """Sinusoid encodings of relative distances: ``pos [klen] -> [klen, 1, d]``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = d
        self.register_buffer("inv_freq", self.frequencies(d))  # persistent, as in 4.x

    @staticmethod
    def frequencies(d: int) -> Tensor:
        return 1.0 / (10000 ** (torch.arange(0.0, d, 2.0) / d))

    def forward(self, pos: Tensor) -> Tensor:
        angles = torch.outer(pos, self.inv_freq.to(pos.dtype))
        return torch.cat([angles.sin(), angles.cos()], dim=-1)[:, None, :]


class PositionwiseFF(nn.Module):
    def __init__(self, d_model: int, d_inner: int, dropout: float, pre_lnorm: bool, eps: float) -> None:
        super().__init__()
        # names (CoreNet.0 / CoreNet.3) as in the 4.x state_dict
        self.CoreNet = nn.Sequential(nn.Linear(d_model, d_inner), nn.ReLU(), nn.Dropout(dropout),
                                     nn.Linear(d_inner, d_model), nn.Dropout(dropout))
        self.layer_norm = nn.LayerNorm(d_model, eps=eps)
        self.pre_lnorm = pre_lnorm

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_lnorm:
            return x + self.CoreNet(self.layer_norm(x))
        return self.layer_norm(x + self.CoreNet(x))


class RelPartialLearnableMultiHeadAttn(nn.Module):
    """Relative multi-head attention of Transformer-XL (its eq. in section 3.3):
    ``score(i, j) = (q_i + u)^T k_j + (q_i + v)^T W_r R_{i-j}`` with ``u = r_w_bias``,
    ``v = r_r_bias`` of shape ``[n_head, d_head]``.

    ``forward(w [qlen, b, d], r [klen, 1, d], mask [qlen, klen], mems [mlen, b, d] | None)``.
    """

    def __init__(self, config: TransfoXLConfig, r_w_bias: Optional[nn.Parameter] = None,
                 r_r_bias: Optional[nn.Parameter] = None) -> None:
        super().__init__()
        self.n_head, self.d_head, self.d_model = config.n_head, config.d_head, config.d_model
        self.qkv_net = nn.Linear(config.d_model, 3 * config.n_head * config.d_head, bias=False)
        self.r_net = nn.Linear(config.d_model, config.n_head * config.d_head, bias=False)
        self.o_net = nn.Linear(config.n_head * config.d_head, config.d_model, bias=False)
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.drop = nn.Dropout(config.dropout)
        self.dropatt = nn.Dropout(config.dropatt)
        self.scale = 1.0 / math.sqrt(config.d_head)
        self.pre_lnorm = config.pre_lnorm
        if r_w_bias is None or r_r_bias is None:
            self.r_w_bias = nn.Parameter(torch.zeros(config.n_head, config.d_head))
            self.r_r_bias = nn.Parameter(torch.zeros(config.n_head, config.d_head))
        else:  # shared by every layer (untie_r=False); the 4.x state_dict lists them per layer too
            self.r_w_bias = r_w_bias
            self.r_r_bias = r_r_bias

    def forward(self, w: Tensor, r: Tensor, mask: Tensor, mems: Optional[Tensor] = None,
                head_mask: Optional[Tensor] = None, output_attentions: bool = False
                ) -> Tuple[Tensor, Optional[Tensor]]:
        qlen, bsz = w.shape[:2]
        cat = w if mems is None else torch.cat([mems, w], dim=0)
        heads = self.qkv_net(self.layer_norm(cat) if self.pre_lnorm else cat)
        q, k, v = heads.chunk(3, dim=-1)
        q = q[-qlen:]
        klen = k.shape[0]
        q = q.reshape(qlen, bsz, self.n_head, self.d_head)
        k = k.reshape(klen, bsz, self.n_head, self.d_head)
        v = v.reshape(klen, bsz, self.n_head, self.d_head)
        r_k = self.r_net(r).reshape(r.shape[0], self.n_head, self.d_head)

        content = torch.einsum("ibnd,jbnd->ijbn", q + self.r_w_bias, k)        # [q, k, b, n]
        position = rel_shift(torch.einsum("ibnd,jnd->ijbn", q + self.r_r_bias, r_k))
        score = (content + position) * self.scale
        score = score.masked_fill(mask[:, :, None, None], torch.finfo(score.dtype).min)
        prob = self.dropatt(torch.softmax(score, dim=1))
        if head_mask is not None:
            prob = prob * head_mask
        vec = torch.einsum("ijbn,jbnd->ibnd", prob, v).reshape(qlen, bsz, self.n_head * self.d_head)
        out = self.drop(self.o_net(vec))
        out = w + out if self.pre_lnorm else self.layer_norm(w + out)
        return out, (prob if output_attentions else None)


class RelPartialLearnableDecoderLayer(nn.Module):
    def __init__(self, config: TransfoXLConfig, r_w_bias=None, r_r_bias=None) -> None:
        super().__init__()
        self.dec_attn = RelPartialLearnableMultiHeadAttn(config, r_w_bias, r_r_bias)
        self.pos_ff = PositionwiseFF(config.d_model, config.d_inner, config.dropout,
                                     config.pre_lnorm, config.layer_norm_epsilon)

    def forward(self, x, r, mask, mems=None, head_mask=None, output_attentions=False):
        out, prob = self.dec_attn(x, r, mask, mems=mems, head_mask=head_mask,
                                  output_attentions=output_attentions)
        return self.pos_ff(out), prob


# ----------------------------------------------------------------------------- outputs

@dataclass
class TransfoXLModelOutput(ModelOutput):
    """last_hidden_state: ``[batch, len, d_model]``; mems: ``n_layer`` tensors
    ``[mem_len, batch, d_model]`` (None when ``mem_len == 0``); hidden_states: embeddings
    and each layer's output ``[batch, len, d_model]``; attentions: ``[batch, n_head, len,
    mlen + len]`` per layer."""

    last_hidden_state: Optional[Tensor] = None
    mems: Optional[List[Tensor]] = None
    hidden_states: Optional[Tuple[Tensor, ...]] = None
    attentions: Optional[Tuple[Tensor, ...]] = None


@dataclass
class TransfoXLLMHeadModelOutput(ModelOutput):
    """loss: mean negative log-likelihood over the predicted tokens (labels shifted
    inside); logits: log-probabilities ``[batch, len, V]`` (only without labels); losses:
    ``[batch, len - 1]`` per-token NLL in token order (0 where the label is -100); mems,
    hidden_states, attentions: as :class:`TransfoXLModelOutput`."""

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    losses: Optional[Tensor] = None
    mems: Optional[List[Tensor]] = None
    hidden_states: Optional[Tuple[Tensor, ...]] = None
    attentions: Optional[Tuple[Tensor, ...]] = None

    @property
    def prediction_scores(self) -> Optional[Tensor]:
        """The 4.x name of ``logits``."""
        return self.logits


# ----------------------------------------------------------------------------- models

class TransfoXLPreTrainedModel(PreTrainedModel):
    config_class = TransfoXLConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["RelPartialLearnableDecoderLayer"]

    def _init_param(self, weight: Tensor) -> None:
        if self.config.init == "uniform":
            init.uniform_(weight, -self.config.init_range, self.config.init_range)
        else:
            init.normal_(weight, 0.0, self.config.init_std)

    def _init_weights(self, module: nn.Module) -> None:
        """4.x initialisation; compressed (compemb) layers keep their own."""
        cfg = self.config
        if isinstance(module, nn.Linear):
            self._init_param(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            self._init_param(module.weight)
        elif isinstance(module, nn.LayerNorm):
            init.normal_(module.weight, 1.0, cfg.init_std)
            init.zeros_(module.bias)
        elif isinstance(module, nn.ParameterList) and self._is_projection_list(module):
            # the projections (emb_projs / out_projs) are initialised here because
            # transformers skips modules without direct parameters; other ParameterLists
            # (the cores of a TT / TR table) keep their layer's own initialisation
            for p in module:
                if p is not None:
                    init.normal_(p, 0.0, cfg.proj_init_std)
        elif isinstance(module, ProjectedAdaptiveLogSoftmax):
            if module.n_clusters > 0:
                self._init_param(module.cluster_weight)
                init.zeros_(module.cluster_bias)
            for layer in module.out_layers:  # bias of a compemb.OutputLayer
                if not isinstance(layer, nn.Linear) and getattr(layer, "bias", None) is not None:
                    init.zeros_(layer.bias)
        elif isinstance(module, PositionalEmbedding):
            init.copy_(module.inv_freq, PositionalEmbedding.frequencies(module.d))
        elif isinstance(module, (RelPartialLearnableMultiHeadAttn, TransfoXLModel)):
            if isinstance(getattr(module, "r_w_bias", None), nn.Parameter):
                self._init_param(module.r_w_bias)
                self._init_param(module.r_r_bias)

    def _is_projection_list(self, params: nn.ParameterList) -> bool:
        return any(params is getattr(m, "emb_projs", None) or params is getattr(m, "out_projs", None)
                   for m in self.modules() if isinstance(m, (AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax)))

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        """The shared parameters, by name: ``{target: source}``. Computed from the actual
        structure (relative biases shared with ``untie_r=False``; softmax tables and
        projections shared with the adaptive input), whatever ``tie_word_embeddings``
        says about the other ones."""
        if all_submodels:
            return super().get_expanded_tied_weights_keys(all_submodels=True)
        own = self._own_tied_weights()
        # the patterns transformers' save_pretrained uses to drop the duplicates
        self._tied_weights_keys = {re.escape(k) + "$": re.escape(v) + "$" for k, v in own.items()}
        return own

    def _own_tied_weights(self) -> Dict[str, str]:
        return {}

    def resize_token_embeddings(self, *args: Any, **kwargs: Any):
        raise ValueError(
            "resize_token_embeddings does not apply to Transformer-XL's adaptive input/softmax "
            "(one table per cluster): build a TransfoXLConfig with the new vocab_size and "
            "cutoffs, and copy the weights you keep")


class TransfoXLModel(TransfoXLPreTrainedModel):
    """The Transformer-XL decoder stack (no softmax)."""

    def __init__(self, config: TransfoXLConfig) -> None:
        super().__init__(config)
        self.n_token = config.vocab_size
        self.n_layer, self.d_model = config.n_layer, config.d_model
        self.mem_len, self.clamp_len, self.same_length = config.mem_len, config.clamp_len, config.same_length
        self.word_emb = AdaptiveEmbedding(config.vocab_size, config.d_embed, config.d_model,
                                          config.cutoffs, div_val=config.div_val)
        self.drop = nn.Dropout(config.dropout)
        if not config.untie_r:
            self.r_w_bias = nn.Parameter(torch.zeros(config.n_head, config.d_head))
            self.r_r_bias = nn.Parameter(torch.zeros(config.n_head, config.d_head))
        shared = (None, None) if config.untie_r else (self.r_w_bias, self.r_r_bias)
        self.layers = nn.ModuleList(RelPartialLearnableDecoderLayer(config, *shared)
                                    for _ in range(config.n_layer))
        self.pos_emb = PositionalEmbedding(config.d_model)
        if config.compressed_embedding is not None:
            spec, _, dense_below = split_compressed_embedding(config.compressed_embedding)
            self.word_emb.emb_layers = _compressed_tables(self.word_emb, spec, dense_below, from_dense=False,
                                                          init_std=config.init_std)
        self.post_init()

    def _own_tied_weights(self) -> Dict[str, str]:
        if self.config.untie_r:
            return {}
        return {f"layers.{i}.dec_attn.{name}": name
                for i in range(self.config.n_layer) for name in ("r_w_bias", "r_r_bias")}

    def get_input_embeddings(self) -> nn.Module:
        return self.word_emb

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.word_emb = value

    def reset_memory_length(self, mem_len: int) -> None:
        if not isinstance(mem_len, int) or mem_len < 0:
            raise ValueError(f"mem_len must be an int >= 0, got {mem_len!r}")
        self.mem_len = mem_len

    def init_mems(self, batch_size: int) -> Optional[List[Tensor]]:
        """``mem_len`` zero memories per layer (what 4.x used when ``mems`` was None)."""
        if self.mem_len <= 0:
            return None
        p = next(self.parameters())
        return [torch.zeros(self.mem_len, batch_size, self.d_model, dtype=p.dtype, device=p.device)
                for _ in range(self.n_layer)]

    def _check_mems(self, mems: Any, batch_size: int) -> None:
        if not isinstance(mems, (list, tuple)) or len(mems) != self.n_layer:
            raise ValueError(f"mems must be a list of n_layer={self.n_layer} tensors "
                             f"[mlen, batch, d_model] (the mems of the previous output), got "
                             f"{type(mems).__name__} of length {len(mems) if hasattr(mems, '__len__') else '?'}")
        mlen = mems[0].shape[0] if isinstance(mems[0], Tensor) and mems[0].dim() == 3 else None
        for i, m in enumerate(mems):
            if not isinstance(m, Tensor) or m.dim() != 3 or m.shape[0] != mlen \
                    or m.shape[2] != self.d_model:
                raise ValueError(f"mems[{i}] must be a tensor [mlen, batch, d_model={self.d_model}] "
                                 f"like the others, got {tuple(getattr(m, 'shape', ()))}")
            if m.shape[1] != batch_size:
                raise ValueError(f"mems[{i}] has batch size {m.shape[1]} but the input has batch "
                                 f"size {batch_size}; pass the mems returned for this batch")

    def forward(self, input_ids: Optional[Tensor] = None, mems: Optional[List[Tensor]] = None,
                head_mask: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, output_attentions: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None,
                use_cache: Optional[bool] = None) -> TransfoXLModelOutput:
        """input_ids ``[batch, len]`` (or inputs_embeds ``[batch, len, d_model]``); mems:
        as returned by the previous segment, or None for no memory. ``attention_mask``
        is accepted for API compatibility and must be all ones (no padding)."""
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [batch, len] and inputs_embeds [batch, len, d_model]")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, len], got {tuple(input_ids.shape)}")
            word_emb = self.word_emb(input_ids.t())
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.d_model:
                raise ValueError(f"inputs_embeds must be [batch, len, d_model={self.d_model}], "
                                 f"got {tuple(inputs_embeds.shape)}")
            word_emb = inputs_embeds.transpose(0, 1)
        qlen, bsz = word_emb.shape[:2]
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("attention_mask has zeros: Transformer-XL takes no padding; pack the "
                             "text into full segments (or pass no attention_mask)")
        if mems is not None:
            self._check_mems(mems, bsz)
        mlen = 0 if mems is None else mems[0].shape[0]
        klen = mlen + qlen
        if head_mask is not None:
            if head_mask.dim() == 1:
                head_mask = head_mask[None].expand(self.n_layer, -1)
            head_mask = head_mask.to(word_emb.dtype)[:, None, None, None, :]  # [layer, 1, 1, 1, head]

        mask = build_attention_mask(qlen, mlen, self.mem_len, self.same_length, device=word_emb.device)
        pos = relative_positions(klen, self.clamp_len, device=word_emb.device)
        pos_emb = self.drop(self.pos_emb(pos).to(word_emb.dtype))
        core = self.drop(word_emb)
        hids, attentions = [], []
        for i, layer in enumerate(self.layers):
            hids.append(core)
            core, prob = layer(core, pos_emb, mask, mems=None if mems is None else mems[i],
                               head_mask=None if head_mask is None else head_mask[i],
                               output_attentions=output_attentions)
            if output_attentions:
                attentions.append(prob.permute(2, 3, 0, 1).contiguous())
        core = self.drop(core)
        new_mems = update_mems(hids, mems, self.mem_len)
        hidden_states = None
        if output_hidden_states:
            hidden_states = tuple(h.transpose(0, 1).contiguous() for h in hids + [core])
        out = TransfoXLModelOutput(
            last_hidden_state=core.transpose(0, 1).contiguous(), mems=new_mems,
            hidden_states=hidden_states, attentions=tuple(attentions) if output_attentions else None)
        return out if return_dict is not False else out.to_tuple()


class TransfoXLLMHeadModel(TransfoXLPreTrainedModel, GenerationMixin):
    """Transformer-XL with its (adaptive) softmax, tied to the adaptive input as in 4.x."""

    def __init__(self, config: TransfoXLConfig) -> None:
        super().__init__(config)
        self.transformer = TransfoXLModel(config)
        self.crit = ProjectedAdaptiveLogSoftmax(config.vocab_size, config.d_embed, config.d_model,
                                                config.cutoffs, div_val=config.div_val)
        if config.compressed_embedding is not None:
            spec, output, dense_below = split_compressed_embedding(config.compressed_embedding)
            self.crit.out_layers = _compressed_outputs(self.crit, self.transformer.word_emb, spec,
                                                       output, dense_below, from_dense=False,
                                                       init_std=config.init_std)
        self._tie_structure()
        self.post_init()

    # --- tying: the same Parameter objects, declared to transformers for save / load
    def _word_ties(self) -> List[int]:
        """Clusters whose softmax weight is the input table's (both dense nn.Embedding/Linear)."""
        if not self.config.tie_word_embeddings:
            return []
        return [i for i, (o, e) in enumerate(zip(self.crit.out_layers, self.transformer.word_emb.emb_layers))
                if isinstance(o, nn.Linear) and _is_plain(e) and o.weight.shape == e.weight.shape]

    def _proj_ties(self) -> List[Tuple[int, int]]:
        """``(softmax cluster, input projection)`` pairs that share a projection."""
        pairs = []
        n_in = len(self.transformer.word_emb.emb_projs)
        for i, tie in enumerate(self.config.tie_projs):
            if not tie or self.crit.out_projs[i] is None:
                continue
            j = 0 if self.config.div_val == 1 else i
            if j < n_in:
                pairs.append((i, j))
        return pairs

    def _own_tied_weights(self) -> Dict[str, str]:
        ties = {f"crit.out_layers.{i}.weight": f"transformer.word_emb.emb_layers.{i}.weight"
                for i in self._word_ties()}
        ties.update({f"crit.out_projs.{i}": f"transformer.word_emb.emb_projs.{j}"
                     for i, j in self._proj_ties()})
        return ties

    def _tie_structure(self) -> None:
        emb = self.transformer.word_emb
        for i in self._word_ties():
            self.crit.out_layers[i].weight = emb.emb_layers[i].weight
        for i, j in self._proj_ties():
            self.crit.out_projs[i] = emb.emb_projs[j]

    def tie_weights(self, missing_keys=None, recompute_mapping: bool = True):
        super().tie_weights(missing_keys=missing_keys, recompute_mapping=recompute_mapping)
        if missing_keys is None:
            self._tie_structure()

    def get_output_embeddings(self) -> None:
        return None  # the adaptive softmax is not a single Linear; tying is handled here

    def reset_memory_length(self, mem_len: int) -> None:
        self.transformer.reset_memory_length(mem_len)

    def init_mems(self, batch_size: int) -> Optional[List[Tensor]]:
        return self.transformer.init_mems(batch_size)

    def forward(self, input_ids: Optional[Tensor] = None, mems: Optional[List[Tensor]] = None,
                head_mask: Optional[Tensor] = None, inputs_embeds: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, use_cache: Optional[bool] = None
                ) -> TransfoXLLMHeadModelOutput:
        """As :meth:`TransfoXLModel.forward`; ``labels [batch, len]`` (usually
        ``input_ids``, -100 to ignore) are shifted inside: position ``t`` predicts
        ``labels[:, t + 1]``. Without labels, ``logits`` holds log-probabilities
        ``[batch, len, V]``."""
        out = self.transformer(input_ids, mems=mems, head_mask=head_mask, inputs_embeds=inputs_embeds,
                               attention_mask=attention_mask, output_attentions=output_attentions,
                               output_hidden_states=output_hidden_states, return_dict=True)
        hidden = out.last_hidden_state
        bsz, tgt_len = hidden.shape[:2]
        loss = losses = logits = None
        if labels is not None:
            if labels.shape != (bsz, tgt_len):
                raise ValueError(f"labels must be [batch, len] = {(bsz, tgt_len)} like the input, "
                                 f"got {tuple(labels.shape)}")
            target = labels[:, 1:].reshape(-1)
            losses = self.crit(hidden[:, :-1].reshape(-1, hidden.shape[-1]), target).view(bsz, tgt_len - 1)
            count = (target != -100).sum()
            loss = losses.sum() / count.clamp(min=1)
        else:
            logits = self.crit(hidden.reshape(-1, hidden.shape[-1])).view(bsz, tgt_len, -1)
        result = TransfoXLLMHeadModelOutput(loss=loss, logits=logits, losses=losses, mems=out.mems,
                                            hidden_states=out.hidden_states, attentions=out.attentions)
        return result if return_dict is not False else result.to_tuple()

    def token_nll(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """Negative log-likelihood of ``targets [batch, len]`` given the hidden states
        ``[batch, len, d_model]`` at the same positions (no shift): ``[batch, len]``."""
        return self.crit(hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)).view(targets.shape)

    # --- compression hook
    def apply_compressed_embedding(self, spec: Any, output: str = "tied", *, dense_below: int = 0,
                                   from_dense: bool = True, from_weights: Optional[bool] = None
                                   ) -> Dict[str, nn.Module]:
        """Replace the adaptive input tables and the softmax by compemb layers, in place.

        Args:
            spec: a flat :class:`compemb.EmbeddingSpec` dict (``{"method": "tt", "rank": 8}``)
                or an ``EmbeddingSpec``; or a ``compemb_hf.CompressedEmbeddingConfig``
                (``compemb_hf.compress`` and ``from_pretrained(..., compressed_embedding=)``
                call this hook with one: its ``output`` (None: ``"tied"``) and ``init``
                apply, and it is recorded as the model's quantization config instead of
                ``config.compressed_embedding``).
            output: ``"tied"`` (the softmax uses the compressed input tables plus its
                own biases), ``"untied"`` (compressed softmax tables of its own) or
                ``"dense"`` (the softmax stays dense and untied).
            dense_below: a cluster whose dense table has fewer entries stays dense. A
                cluster also stays dense when the compressed layer would not be smaller
                than its dense table (``storage().ratio <= 1``), and a tail cluster when
                the method cannot take its shape (e.g. TT with 3 factors of a 4-wide
                table); the head cluster (the whole table without cutoffs) raises
                ``ValueError`` then. ``compemb.compression_report(model)`` lists what
                was compressed.
            from_dense: start the compressed tables from the current dense ones
                (``compemb.compress_embedding``: TT-SVD, k-means, ...); False: fresh init.
            from_weights: the name ``compemb_hf`` uses for ``from_dense``.

        Returns ``{path: layer}`` of the new compressed tables. With a spec dict the choice
        is recorded in ``config.compressed_embedding`` (``save_pretrained`` /
        ``from_pretrained`` rebuild the same structure). On error the model is unchanged.
        """
        record = True
        if from_weights is not None:
            from_dense = bool(from_weights)
        if hasattr(spec, "spec") and hasattr(spec, "output") and not isinstance(spec, Mapping):
            hf_config = spec  # compemb_hf.CompressedEmbeddingConfig
            if getattr(hf_config, "form", "train") != "train":
                raise ValueError(f"form={hf_config.form!r} is not available for Transformer-XL: compress "
                                 f"with form='train' (then compemb_hf.export_codebooks for DPQ)")
            if getattr(hf_config, "modules", None):
                raise ValueError(f"modules={list(hf_config.modules)} does not apply to Transformer-XL: "
                                 f"its tables are the adaptive input clusters; leave modules=None")
            spec, output = hf_config.spec, hf_config.output or "tied"
            from_dense = from_dense and getattr(hf_config, "init", None) != "random"
            record = False
        spec_dict, output, dense_below = _normalise_hook_args(spec, output, dense_below)
        emb = self.transformer.word_emb
        if any(not _is_plain(layer) for layer in emb.emb_layers):
            raise ValueError("the model already has compressed tables (config.compressed_embedding="
                             f"{self.config.compressed_embedding}); start from a dense model")
        spec_obj, output, dense_below = split_compressed_embedding(
            {**spec_dict, "output": output, "dense_below": dense_below})
        new_tables = _compressed_tables(emb, spec_obj, dense_below, from_dense=from_dense,
                                        init_std=self.config.init_std)
        new_outputs = _compressed_outputs(self.crit, emb, spec_obj, output, dense_below,
                                          from_dense=from_dense, new_tables=new_tables,
                                          init_std=self.config.init_std)
        new_tables.train(self.training)
        new_outputs.train(self.training)
        # all built: swap
        emb.emb_layers = new_tables
        self.crit.out_layers = new_outputs
        if record:
            self.config.compressed_embedding = {**spec_dict, "output": output, "dense_below": dense_below}
            self.transformer.config.compressed_embedding = self.config.compressed_embedding
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=True)
        self._tie_structure()
        built = {f"transformer.word_emb.emb_layers.{i}": t for i, t in enumerate(new_tables)
                 if not _is_plain(t)}
        built.update({f"crit.out_layers.{i}.embedding": o.embedding for i, o in enumerate(new_outputs)
                      if getattr(o, "tied", True) is False})
        return built

    # --- generation: mems are the cache
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def prepare_inputs_for_generation(self, input_ids: Tensor, next_sequence_length=None, mems=None,
                                      **kwargs) -> Dict[str, Any]:
        """With memories, only the tokens they do not cover yet are fed (the last one);
        without (``mem_len == 0``), the whole sequence."""
        if mems is not None:
            input_ids = input_ids[:, -1:]
        return {"input_ids": input_ids.contiguous(), "mems": mems}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens: int = 1):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens)
        model_kwargs["mems"] = outputs.mems
        return model_kwargs

    @staticmethod
    def _reorder_cache(mems: Optional[List[Tensor]], beam_idx: Tensor) -> Optional[List[Tensor]]:
        if mems is None:
            return None
        return [m.index_select(1, beam_idx.to(m.device)) for m in mems]


# ----------------------------------------------------------------------------- compression helpers

def _normalise_hook_args(spec: Any, output: str, dense_below: int) -> Tuple[Dict[str, Any], str, int]:
    from compemb import EmbeddingSpec

    if isinstance(spec, EmbeddingSpec):
        spec_dict = spec.to_dict()
    elif isinstance(spec, Mapping):
        spec_dict = dict(spec)
    else:
        raise ValueError(f"spec must be a dict like {{'method': 'tt', 'rank': 8}} or an "
                         f"EmbeddingSpec, got {type(spec).__name__}")
    if output not in OUTPUT_MODES:
        raise ValueError(f"output must be one of {OUTPUT_MODES}, got {output!r}")
    return spec_dict, output, dense_below


def _is_plain(layer: nn.Module) -> bool:
    """A plain ``nn.Embedding`` (a dense table that the softmax may share)."""
    return type(layer) is nn.Embedding


def _should_compress(layer: nn.Module, dense_entries: int, dense_below: int) -> bool:
    if dense_entries < dense_below:
        return False
    storage = getattr(layer, "storage", None)
    if storage is not None:
        return storage().ratio > 1.0
    return sum(p.numel() for p in layer.parameters()) < dense_entries


def _build_table(spec, weight: Tensor, from_dense: bool, init_std: float = 0.02) -> nn.Module:
    """A compemb layer for ``weight``'s table: compressed from it, or freshly built. A
    fresh layer of any method starts at the model's ``init_std``, the std of the dense
    word tables it replaces (the core's init rule, ``build_embedding(..., init_std=)``:
    TT/TR cores scaled by one factor, DPQ query, keys and values drawn at it)."""
    from compemb import build_embedding, compress_embedding

    if from_dense:
        layer = compress_embedding(spec, weight.detach().float())
    else:
        layer = build_embedding(spec, weight.shape[0], weight.shape[1], init_std=init_std)
    if weight.device.type != "meta":
        layer = layer.to(device=weight.device)
    if weight.dtype != torch.float32 and weight.is_floating_point():
        for p in layer.parameters():  # keep the model's float dtype (bf16 / fp16)
            if p.is_floating_point():
                p.data = p.data.to(weight.dtype)
    return layer


def _compressed_tables(emb: AdaptiveEmbedding, spec, dense_below: int, from_dense: bool,
                       init_std: float = 0.02) -> nn.ModuleList:
    """One layer per cluster: compressed, or the existing dense table (see the rule in
    ``apply_compressed_embedding``)."""
    tables = nn.ModuleList()
    for i, dense in enumerate(emb.emb_layers):
        layer = _try_build(spec, dense.weight, from_dense, init_std, i, "adaptive input")
        keep = layer is not None and _should_compress(layer, dense.weight.numel(), dense_below)
        tables.append(layer if keep else dense)
    return tables


def _try_build(spec, weight: Tensor, from_dense: bool, init_std: float, cluster: int,
               what: str) -> Optional[nn.Module]:
    """The compressed layer of a cluster; None for a tail cluster whose shape the method
    cannot take (it stays dense); ``ValueError`` naming the cluster for the head."""
    try:
        return _build_table(spec, weight, from_dense, init_std)
    except ValueError as err:
        if cluster > 0:
            return None
        raise ValueError(f"compressed_embedding cannot compress the head cluster of the {what} "
                         f"({weight.shape[0]} x {weight.shape[1]}): {err}") from err


def _compressed_outputs(crit: ProjectedAdaptiveLogSoftmax, emb: AdaptiveEmbedding, spec, output: str,
                        dense_below: int, from_dense: bool, new_tables: Optional[nn.ModuleList] = None,
                        init_std: float = 0.02) -> nn.ModuleList:
    """The softmax layers matching ``output`` for the compressed input tables."""
    from compemb import OutputLayer

    tables = emb.emb_layers if new_tables is None else new_tables
    outs = nn.ModuleList()
    for i, dense in enumerate(crit.out_layers):
        compressed_in = not _is_plain(tables[i])
        if output == "tied" and compressed_in:
            layer = OutputLayer(tables[i], bias=True, tied=True)
        elif output == "untied":
            table = _try_build(spec, dense.weight, from_dense, init_std, i, "softmax")
            if table is None or not _should_compress(table, dense.weight.numel(), dense_below):
                outs.append(_untied_linear(dense))
                continue
            layer = OutputLayer(table, bias=True, tied=False)
        else:
            # dense softmax: an untied copy when its input table is compressed
            outs.append(_untied_linear(dense) if compressed_in else dense)
            continue
        with torch.no_grad():
            layer.bias.copy_(dense.bias)
        outs.append(layer)
    return outs


def _untied_linear(dense: nn.Linear) -> nn.Linear:
    new = nn.Linear(dense.in_features, dense.out_features, bias=dense.bias is not None)
    with torch.no_grad():
        new.weight.copy_(dense.weight)
        if dense.bias is not None:
            new.bias.copy_(dense.bias)
    return new.to(dense.weight.device, dense.weight.dtype)
