"""Perplexity over a long text, segment by segment with the memories carried over.

Every token but the first is predicted exactly once: segment ``k`` feeds
``ids[:, k*L : (k+1)*L]`` with the memories of segment ``k - 1`` and scores the next
tokens ``ids[:, k*L + 1 : (k+1)*L + 1]`` (``L = tgt_len``), as the Transformer-XL
evaluation does. The attention span of a token is its segment plus ``mem_len`` past
positions.
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, Optional

import torch
from torch import Tensor

__all__ = ["segment_nll", "evaluate_perplexity"]


def _as_batch(input_ids: Tensor) -> Tensor:
    if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("input_ids must be an integer tensor [length] or [streams, length]")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [length] or [streams, length] with length >= 2, "
                         f"got {tuple(input_ids.shape)}")
    return input_ids.long()


def segment_nll(model, input_ids: Tensor, tgt_len: int) -> Iterator[Tensor]:
    """Yields, per segment, the negative log-likelihoods ``[streams, len]`` of the
    tokens it predicts. ``model``: a ``TransfoXLLMHeadModel``."""
    ids = _as_batch(input_ids).to(next(model.parameters()).device)
    if not isinstance(tgt_len, int) or tgt_len < 1:
        raise ValueError(f"tgt_len must be a positive int (the segment length), got {tgt_len!r}")
    mems = None
    total = ids.shape[1] - 1
    for start in range(0, total, tgt_len):
        end = min(start + tgt_len, total)
        out = model.transformer(ids[:, start:end], mems=mems, return_dict=True)
        mems = out.mems
        yield model.token_nll(out.last_hidden_state, ids[:, start + 1:end + 1])


@torch.no_grad()
def evaluate_perplexity(model, input_ids: Tensor, tgt_len: Optional[int] = None,
                        mem_len: Optional[int] = None, clamp_len: Optional[int] = None,
                        same_length: Optional[bool] = None) -> Dict[str, float]:
    """``{"loss": mean NLL (nats), "perplexity": exp(loss), "tokens": count}`` of
    ``input_ids`` (``[length]`` or ``[streams, length]``: parallel streams, as the
    batched Transformer-XL evaluation), segment by segment.

    Args:
        tgt_len: segment length (default ``model.config.tgt_len``).
        mem_len, clamp_len, same_length: settings for this evaluation only (default: the
            model's), restored after; the paper evaluates WikiText-103 with
            ``tgt_len=64, mem_len=640, clamp_len=400, same_length=True``.
    """
    tgt_len = tgt_len if tgt_len is not None else model.config.tgt_len
    if tgt_len is None:
        raise ValueError("tgt_len is needed: pass tgt_len= or set config.tgt_len")
    if mem_len is not None and (not isinstance(mem_len, int) or mem_len < 0):
        raise ValueError(f"mem_len must be an int >= 0, got {mem_len!r}")
    if clamp_len is not None and not isinstance(clamp_len, int):
        raise ValueError(f"clamp_len must be an int (<= 0: no clamping), got {clamp_len!r}")
    core = model.transformer
    saved = {"mem_len": core.mem_len, "clamp_len": core.clamp_len, "same_length": core.same_length}
    overrides = {"mem_len": mem_len, "clamp_len": clamp_len, "same_length": same_length}
    was_training = model.training
    for name, value in overrides.items():
        if value is not None:
            setattr(core, name, value)
    model.eval()
    try:
        total, count = 0.0, 0
        for nll in segment_nll(model, input_ids, tgt_len):
            total += float(nll.double().sum())
            count += nll.numel()
    finally:
        for name, value in saved.items():
            setattr(core, name, value)
        model.train(was_training)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
