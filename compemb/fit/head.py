"""Fitting a compressed LM head to the dense one on the head's inputs alone.

A fitted table's logits ``h @ W_hat.T`` differ from the dense head's ``h @ W.T``; what the
model pays for it is the KL between the two softmaxes over the hidden states ``h`` that
text produces. The head is the last layer, so that KL needs no pass through the
transformer: given the head's inputs collected once from calibration text, every step is
one ``[B, d] x [d, V]`` product per model. At the cost of one step of the full distillation
(``compemb_hf.calibrate``, a forward of the teacher and a forward and backward of the
student) this takes several, on many more tokens. The input side of a tied table is not
seen here: the parameters move little (the layer stays close to its fit), and
:func:`fit_head` keeps the state with the lowest held-out KL.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HeadFit", "fit_head", "head_kl", "relative_adam"]


@dataclass
class HeadFit:
    """What :func:`fit_head` did: ``steps`` taken, held-out KL (nats per token) at the
    start and for the state kept, wall ``seconds``."""

    steps: int
    heldout_before: float
    heldout_after: float
    seconds: float


def relative_adam(parameters: Sequence[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam with each parameter's learning rate ``lr`` times its RMS, so that every
    parameter moves by about ``lr`` of its own scale per step (codebook values, cores,
    exact rows and a logit bias differ in scale by orders of magnitude)."""
    return torch.optim.Adam([{"params": [p], "lr": lr * float(p.detach().float().pow(2).mean()
                                                              .sqrt().clamp_min(1e-8))}
                             for p in parameters])


@torch.no_grad()
def head_kl(student: Callable[[Tensor], Tensor], teacher: Callable[[Tensor], Tensor],
            inputs: Tensor, chunk: int = 512) -> float:
    """Mean ``KL(softmax(teacher(h)) || softmax(student(h)))`` over the rows ``h`` of
    ``inputs [N, d]``, in nats, ``chunk`` rows at a time."""
    total = 0.0
    for start in range(0, inputs.shape[0], chunk):
        h = inputs[start:start + chunk]
        t = F.log_softmax(teacher(h).float(), -1)
        s = F.log_softmax(student(h).float(), -1)
        total += float((t.exp() * (t - s)).sum())
    return total / max(1, inputs.shape[0])


def _keep_best(student, teacher, held, params, best, state):
    now = head_kl(student, teacher, held)
    if now < best:
        return now, [p.detach().clone() for p in params]
    return best, state


def fit_head(student: Callable[[Tensor], Tensor], teacher: Callable[[Tensor], Tensor],
             inputs: Sequence[Tensor], parameters: Sequence[nn.Parameter], *,
             steps: Optional[int] = None, deadline: Optional[float] = None,
             batch_size: int = 256, lr: float = 1e-3, eval_every: int = 25,
             heldout_share: float = 0.1, seed: int = 0,
             on_step: Optional[Callable[[int, float], None]] = None) -> HeadFit:
    """Train ``parameters`` so that ``student(h)`` (logits ``[B, V]``) matches
    ``teacher(h)`` in softmax KL over the head inputs ``h``, in place.

    Args:
        inputs: one ``[n_i, d]`` tensor of head inputs per calibration source; every batch
            draws the same number of rows from each (each source weighs the same). The
            last ``heldout_share`` of each source's rows is held out.
        parameters: what is trained (e.g. codebook values, exact rows, logit bias); all
            else stays as it is.
        steps, deadline: stop after ``steps`` steps or at ``deadline``
            (``time.monotonic()``), whichever comes first; at least one is needed.
        lr: Adam learning rate relative to each parameter's RMS.
        eval_every: steps between held-out evaluations; the parameters with the lowest
            held-out KL are kept (the start included), so the fit never leaves the head
            worse on held-out rows than it found it.
        on_step: called with ``(step, training loss)`` after each step (a progress bar).

    ``ValueError`` for no budget, no parameters, no inputs, or a source too small to hold
    out rows. Parameters not in ``parameters`` that take part get gradients: freeze them
    first to save the work (``compemb_hf`` does).
    """
    if steps is None and deadline is None:
        raise ValueError("fit_head needs steps=... or deadline=...")
    if steps is not None and (not isinstance(steps, int) or steps < 0):
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    params = list(parameters)
    if not params or not all(isinstance(p, Tensor) and p.is_floating_point() for p in params):
        raise ValueError("fit_head needs floating-point parameters to train (at least one)")
    if not 0 < heldout_share < 1:
        raise ValueError(f"heldout_share must be in (0, 1), got {heldout_share!r}")
    inputs = list(inputs)
    if not inputs:
        raise ValueError("fit_head needs head inputs (one [n, d] tensor per source, at least one)")
    began = time.monotonic()
    train, heldout = [], []
    for i, x in enumerate(inputs):
        if x.dim() != 2:
            raise ValueError(f"inputs[{i}] must be [n, d], got {tuple(x.shape)}")
        cut = x.shape[0] - max(1, int(round(x.shape[0] * heldout_share)))
        if cut < 1:
            raise ValueError(f"inputs[{i}] has {x.shape[0]} rows: too few to hold some out")
        train.append(x[:cut].detach())
        heldout.append(x[cut:].detach())
    held = torch.cat(heldout)
    state = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = relative_adam(params, lr)
    gen = torch.Generator().manual_seed(seed)
    per_source = max(1, math.ceil(batch_size / len(train)))
    best = before = head_kl(student, teacher, held)
    done = 0
    try:
        while (steps is None or done < steps) and (deadline is None or time.monotonic() < deadline):
            h = torch.cat([x[torch.randint(x.shape[0], (per_source,), generator=gen)]
                           for x in train])
            with torch.no_grad():
                target = F.log_softmax(teacher(h).float(), -1)
            out = F.log_softmax(student(h).float(), -1)
            loss = (target.exp() * (target - out)).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if on_step is not None:
                on_step(done, float(loss.detach()))
            if done % eval_every == 0:
                best, state = _keep_best(student, teacher, held, params, best, state)
        if done % eval_every:
            best, state = _keep_best(student, teacher, held, params, best, state)
    finally:
        with torch.no_grad():
            for p, saved, flag in zip(params, state, flags):
                p.copy_(saved)
                p.requires_grad_(flag)
        opt.zero_grad(set_to_none=True)
    return HeadFit(steps=done, heldout_before=before, heldout_after=best,
                   seconds=time.monotonic() - began)
