"""Calibration text for post-training compression: sources, sampling from the model,
statistics, and the short distillation (:func:`calibrate`).

The counting, smoothing and weighted fits are in the core (:mod:`compemb.fit`); this module
turns a transformers model and text into what they need.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compemb.fit import SecondMoment, count_tokens, relative_adam

__all__ = ["CalibrationSource", "read_sources", "sources_from_texts", "sample_tokens",
           "can_sample", "collect_statistics", "calibrate", "CalibrationResult",
           "DEFAULT_SEQ_LEN", "DEFAULT_SAMPLE_TOKENS", "SAMPLE_OPENERS", "opener_prompts"]

#: Tokens per calibration window.
DEFAULT_SEQ_LEN = 128
#: Tokens sampled from a generative model when calibrating (with or without text).
DEFAULT_SAMPLE_TOKENS = 8192
#: Sequences generated at once when sampling.
SAMPLE_BATCH = 8
#: Openings for sampled windows (:func:`sample_tokens`, ``prompts``; opt-in through
#: ``openers=SAMPLE_OPENERS`` or ``--sample-openers``): program code in several languages,
#: markup and data, formal and legal prose, questions, letters, mathematics, another
#: language. Samples from a random first token read back as English prose; these lead the
#: model into code and formal text. Measured on SmolLM2 at DPQ 10x (PTB / Python / legal
#: evaluation files, which no calibration source shares), half the windows from these:
#: the head's KL after the head fit 0.039 / 0.108 / 0.084 -> 0.039 / 0.090 / 0.076 (PTB
#: text + samples), but perplexity +5.5 / +13.3 / +14.0% -> +5.3 / +14.9 / +14.2% (PTB
#: text + samples) and +10.8 / +13.2 / +15.5% -> +11.7 / +11.4 / +16.6% (samples only):
#: no consistent gain, and sampling took 238 s instead of 168 s, so they are not the default.
SAMPLE_OPENERS = ("def ", "import numpy as np\n", "#include <stdio.h>\n", "public static void ",
                  "function ", "SELECT * FROM ", "<html>\n<head>", "{\"name\": ",
                  "## Installation\n", "| Name | ", "Section 2. Definitions.\n",
                  "Terms of Service\n\n", "Q: ", "Dear Sir or Madam,\n", "Theorem 1. Let ",
                  "Il était une fois ")
#: Share of the sampled windows that begin with an opener when openers are given.
OPENER_SHARE = 0.5
#: Parameters of the compressed layers that calibration leaves as fitted: the ``d x d``
#: transform of a :class:`compemb.fit.FittedEmbedding` couples every row (Adam's step
#: moves all ``d*d`` entries at once, a large random change of the whole table).
FROZEN = ("transform",)

Texts = Union[None, str, Sequence[str], Mapping[str, Sequence[str]]]


@dataclass
class CalibrationSource:
    """One calibration source: a name (a path, ``"texts"`` or ``"sampled"``), its token
    windows ``LongTensor [n, seq_len]`` and whether the model itself generated them."""

    name: str
    windows: Tensor
    sampled: bool = False

    @property
    def num_tokens(self) -> int:
        return self.windows.numel()


# ---------------------------------------------------------------------------- text sources
def _read_text_file(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    if b"\x00" in data:
        raise ValueError(f"calibration text {path} is not a text file (it holds NUL bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"calibration text {path} is not UTF-8 text ({err.reason} at byte "
                         f"{err.start})") from None
    if not text.strip():
        raise ValueError(f"calibration text {path} is empty")
    return text


def read_sources(paths: Sequence[str]) -> Dict[str, List[str]]:
    """``{path: [text of each file]}`` for files or folders (every ``*.txt`` below a
    folder). ``ValueError`` naming the path for one that is missing, an empty folder, or a
    file that is empty or not UTF-8 text. Reads everything before returning (so a bad
    path is reported before any work starts)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: Dict[str, List[str]] = {}
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            files = sorted(os.path.join(root, n) for root, _, names in os.walk(path)
                           for n in names if n.endswith(".txt"))
            if not files:
                raise ValueError(f"calibration text folder {path} holds no .txt file")
            out[path] = [_read_text_file(f) for f in files]
        elif os.path.isfile(path):
            out[path] = [_read_text_file(path)]
        else:
            raise ValueError(f"calibration text {path} does not exist (give a .txt file or a "
                             f"folder of them)")
    return out


def _normalise_texts(texts: Texts) -> Dict[str, List[str]]:
    if texts is None:
        return {}
    if isinstance(texts, str):
        return {"texts": [texts]}
    if isinstance(texts, Mapping):
        return {str(k): [v] if isinstance(v, str) else list(v) for k, v in texts.items()}
    return {"texts": list(texts)}


def sources_from_texts(tokenizer: Any, texts: Texts, seq_len: int = DEFAULT_SEQ_LEN,
                       ) -> List[CalibrationSource]:
    """Token windows of each source. ``texts``: a string, a list of strings (one source),
    or ``{name: list of strings}`` (several sources). Each document is tokenized on its
    own (streamed), documents are joined with the tokenizer's end-of-sequence token and
    cut into windows of ``seq_len``. ``ValueError`` for a source too short for one window
    (naming the source, its token count and ``seq_len``) or holding no text."""
    sources = []
    sep = getattr(tokenizer, "eos_token_id", None)
    for name, docs in _normalise_texts(texts).items():
        if not docs or not all(isinstance(d, str) for d in docs):
            raise ValueError(f"calibration source {name!r} must be a list of strings")
        ids: List[int] = []
        for doc in docs:
            if not doc.strip():
                continue
            ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
            if sep is not None:
                ids.append(sep)
        if len(ids) < seq_len:
            raise ValueError(f"calibration source {name!r} has {len(ids)} tokens, too short for "
                             f"one window of {seq_len} tokens; give more text (or a smaller "
                             f"window)")
        n = len(ids) // seq_len
        sources.append(CalibrationSource(name, torch.tensor(ids[:n * seq_len]).view(n, seq_len)))
    return sources


# ---------------------------------------------------------------------------- sampling
def can_sample(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder that can generate text (a causal LM)."""
    config = getattr(model, "config", None)
    return bool(getattr(model, "can_generate", lambda: False)()) and not getattr(
        config, "is_encoder_decoder", False)


@torch.no_grad()
def sample_tokens(model: nn.Module, num_tokens: int, *, seq_len: int = DEFAULT_SEQ_LEN,
                  batch_size: int = SAMPLE_BATCH, seed: int = 0, start_token: Optional[int] = None,
                  random_start: bool = False, exclude_tokens: Sequence[int] = (),
                  prompts: Sequence[Sequence[int]] = (), prompt_share: float = OPENER_SHARE,
                  progress: bool = True, deadline: Optional[float] = None) -> CalibrationSource:
    """About ``num_tokens`` tokens sampled from ``model`` itself (temperature 1, no top-k),
    as ``ceil(num_tokens / seq_len)`` windows of ``seq_len``, generated ``batch_size`` at a
    time from the start token (default: the model's BOS, else EOS). Reproducible: the
    same ``seed`` gives the same tokens, and the global RNG is left as it was.

    ``random_start``: each window begins with a token drawn uniformly from the vocabulary
    (leaving out ``exclude_tokens``, the start token and the config's BOS / EOS / PAD
    ids; give the tokenizer's ``all_special_ids``), the model writing the rest after
    the start token and it. Text sampled from the start token alone stays in the model's
    favourite genre (an instruct model writes chat); a random first token sends each
    window to another topic, so that statistics from it cover more of what users will feed
    the model (measured on SmolLM2, DPQ 10x: perplexity 0.5 to 1.2 points closer to dense
    out of domain, the same in domain; ``bench/results/pretrained.md``). Read back,
    SmolLM2's random-start windows are still English prose; ``prompts`` lead the model into
    code and other genres.
    ``prompts``: token ids (e.g. :func:`opener_prompts` of :data:`SAMPLE_OPENERS`; each cut
    to at most half a window) that begin ``prompt_share`` of the windows, each prompt in
    turn, the model writing the rest; batches of prompted windows alternate with the
    others, so an early stop keeps both.
    ``deadline`` (``time.monotonic()`` value): stop early, keeping whole windows.
    ``ValueError`` when ``num_tokens`` is below one window (naming ``seq_len``) or a prompt
    is empty."""
    if not can_sample(model):
        raise ValueError(f"{type(model).__name__} cannot generate text to calibrate on; give "
                         f"calibration text (--calibration-text / texts=...)")
    if not isinstance(num_tokens, int) or num_tokens < seq_len:
        raise ValueError(f"a sampling budget of {num_tokens!r} tokens is too small for one "
                         f"window; the smallest budget is {seq_len} tokens (seq_len)")
    config = model.config
    start = start_token
    if start is None:
        starts = _config_ids(config, "bos_token_id") or _config_ids(config, "eos_token_id")
        start = starts[0] if starts else None
    if start is None:
        raise ValueError("the model's config has no bos_token_id or eos_token_id; pass "
                         "start_token=...")
    windows = math.ceil(num_tokens / seq_len)
    prompts = [[int(t) for t in p][:max(1, seq_len // 2)] for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompts[{i}] is empty; give token ids (at least one)")
    if prompts and not 0 < prompt_share <= 1:
        raise ValueError(f"prompt_share must be in (0, 1], got {prompt_share!r}")
    prompted = min(windows, max(1, round(windows * prompt_share))) if prompts else 0
    device = next(model.parameters()).device
    allowed = None
    if random_start:
        vocab = model.get_input_embeddings().weight.shape[0]
        vocab = min(vocab, getattr(config, "vocab_size", None) or vocab)
        keep = torch.ones(vocab, dtype=torch.bool)
        specials = _config_ids(config, "bos_token_id", "eos_token_id", "pad_token_id")
        drop = torch.tensor([t for t in (*map(int, exclude_tokens), *specials, int(start))
                             if 0 <= t < vocab], dtype=torch.long)
        keep[drop] = False
        allowed = keep.nonzero().squeeze(1)
        if allowed.numel() == 0:
            raise ValueError("random_start: exclude_tokens leaves no token to start from")
    out: List[Tensor] = []
    was_training = model.training
    model.eval()
    bar = _progress(total=windows * seq_len, desc="sampling calibration text", unit="tok",
                    enabled=progress)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for n, p in _sampling_schedule(windows, prompted, prompts, batch_size):
                if deadline is not None and time.monotonic() > deadline and out:
                    break
                if p is not None:
                    prompt = torch.tensor([[int(start)] + p] * n, dtype=torch.long)
                else:
                    prompt = torch.full((n, 1), int(start), dtype=torch.long)
                    if allowed is not None:
                        first = allowed[torch.randint(len(allowed), (n, 1))]
                        prompt = torch.cat([prompt, first], dim=1)
                prompt = prompt.to(device)
                new = seq_len - (prompt.shape[1] - 1)
                gen = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                     do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                     max_new_tokens=new, min_new_tokens=new,
                                     pad_token_id=int(start))
                out.append(gen[:, 1:1 + seq_len].cpu())
                bar.update(n * seq_len)
    finally:
        bar.close()
        model.train(was_training)
    return CalibrationSource("sampled", torch.cat(out), sampled=True)


def _sampling_schedule(windows: int, prompted: int, prompts: List[List[int]], batch_size: int
                       ) -> List[Tuple[int, Optional[List[int]]]]:
    """``[(windows in the batch, its prompt or None)]``: the plain windows in batches, each
    prompt's share of ``prompted`` windows (round robin) in batches, the two alternating."""
    plain = windows - prompted
    plain_batches = [(min(batch_size, plain - k), None) for k in range(0, plain, batch_size)]
    prompt_batches: List[Tuple[int, Optional[List[int]]]] = []
    for i, p in enumerate(prompts):
        count = prompted // len(prompts) + (i < prompted % len(prompts))
        prompt_batches += [(min(batch_size, count - k), p) for k in range(0, count, batch_size)]
    schedule: List[Tuple[int, Optional[List[int]]]] = []
    for k in range(max(len(plain_batches), len(prompt_batches))):
        schedule += plain_batches[k:k + 1] + prompt_batches[k:k + 1]
    return schedule


def opener_prompts(tokenizer: Any, openers: Sequence[str] = SAMPLE_OPENERS) -> List[List[int]]:
    """Token ids of each opener (no special tokens), for :func:`sample_tokens`'
    ``prompts``; none without a tokenizer."""
    if tokenizer is None:
        return []
    if isinstance(openers, str):
        raise ValueError("openers must be a sequence of texts, not one string")
    ids = [list(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in openers]
    return [p for p in ids if p]


def _config_ids(config: Any, *names: str) -> List[int]:
    """The token ids a config names under ``names`` (each an id, a list of ids or None)."""
    ids: List[int] = []
    for name in names:
        value = getattr(config, name, None)
        ids += [int(t) for t in (value if isinstance(value, (list, tuple)) else [value])
                if t is not None]
    return ids


def special_ids(tokenizer: Any) -> List[int]:
    """The tokenizer's special token ids (none without a tokenizer)."""
    return [int(t) for t in (getattr(tokenizer, "all_special_ids", None) or [])]


# ---------------------------------------------------------------------------- statistics
def _head(model: nn.Module) -> Optional[nn.Module]:
    try:
        return model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


@torch.no_grad()
def collect_statistics(model: nn.Module, sources: Sequence[CalibrationSource],
                       num_embeddings: int, *, batch_size: int = 4, max_windows: int = 32,
                       progress: bool = True, deadline: Optional[float] = None,
                       head_inputs: Optional[List[Tensor]] = None):
    """``(counts [V], second_moment [d, d] or None, mean [d] or None)``: token counts of
    every source, each
    scaled to the same total (every source weighs the same, however long), and the second
    moment and the mean of the LM head's input over the sources (each source the same
    weight), or ``None`` for a model without a head. The counts take every token (they need no model);
    the moment runs the (dense) model on up to ``max_windows`` windows of each source
    spread over it (a ``d x d`` average settles long before the counts of ``V`` tokens
    do), stopping at ``deadline`` (``time.monotonic()``) once every source has had a
    batch. ``head_inputs``: a list that gets, per source, the head inputs seen
    (``float32 [tokens, d]`` on the CPU, for :func:`compemb.fit.fit_head`)."""
    counts = torch.zeros(num_embeddings, dtype=torch.float64)
    head = _head(model)
    moments: List[SecondMoment] = []
    total = sum(min(s.windows.shape[0], max_windows) for s in sources)
    bar = _progress(total=total, desc="calibration statistics", unit="win", enabled=progress)
    was_training = model.training
    model.eval()
    try:
        for source in sources:
            c = count_tokens(source.windows, num_embeddings)
            counts += c / c.sum()
            if head is None:
                continue
            moment: Optional[SecondMoment] = None
            kept: List[Tensor] = []

            def hook(_module, args):
                nonlocal moment
                h = args[0]
                if moment is None:
                    moment = SecondMoment(h.shape[-1])
                moment.update(h)
                if head_inputs is not None:
                    kept.append(h.detach().reshape(-1, h.shape[-1]).float().cpu())

            handle = head.register_forward_pre_hook(hook)
            n = source.windows.shape[0]
            picked = source.windows[torch.linspace(0, n - 1, min(n, max_windows)).long()]
            try:
                for start in range(0, picked.shape[0], batch_size):
                    if deadline is not None and time.monotonic() > deadline and moment is not None:
                        break
                    batch = picked[start:start + batch_size].to(_device(model))
                    model(input_ids=batch)
                    bar.update(batch.shape[0])
            finally:
                handle.remove()
            if moment is not None:
                moments.append(moment)
            if head_inputs is not None and kept:
                head_inputs.append(torch.cat(kept))
    finally:
        bar.close()
        model.train(was_training)
    second = mean = None
    if moments:
        second = sum(m.value() for m in moments) / len(moments)
        mean = sum(m.mean() for m in moments) / len(moments)
    return counts, second, mean


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _progress(total: int, desc: str, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)


# ---------------------------------------------------------------------------- distillation
@dataclass
class CalibrationResult:
    """What :func:`calibrate` did.

    Attributes:
        steps: optimizer steps taken.
        seconds: wall time, sampling included.
        train_loss: the first and last training losses (distillation loss of a batch).
        heldout_before, heldout_after: the distillation loss on held-out windows (one per
            source) before calibration and for the kept parameters (the best seen).
        sources: ``{name: tokens}`` of the text used.
        trained: names of the parameters trained.
    """

    steps: int
    seconds: float
    train_loss: List[float]
    heldout_before: float
    heldout_after: float
    sources: Dict[str, int] = field(default_factory=dict)
    trained: List[str] = field(default_factory=list)


def _distill_loss(student: nn.Module, teacher: nn.Module, batch: Tensor, lm: bool) -> Tensor:
    """Logit KL(teacher || student) per token for language models; for encoders the mean
    squared error of the final hidden states relative to the teacher's mean square."""
    if lm:
        with torch.no_grad():
            t = teacher(input_ids=batch).logits.float()
        s = student(input_ids=batch).logits.float()
        return F.kl_div(F.log_softmax(s, -1).flatten(0, -2), F.log_softmax(t, -1).flatten(0, -2),
                        log_target=True, reduction="batchmean")
    with torch.no_grad():
        t = teacher(input_ids=batch).last_hidden_state.float()
    s = student(input_ids=batch).last_hidden_state.float()
    return (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)


def trainable_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """``{path.name: parameter}``: what calibration trains, every floating parameter of
    the compressed layers but :data:`FROZEN`."""
    from .surgery import compressed_layers

    return {f"{path}.{name}": p for path, layer in compressed_layers(model).items()
            for name, p in layer.named_parameters()
            if p.is_floating_point() and name.split(".")[0] not in FROZEN}


def train_only(model: nn.Module, params: Iterable[nn.Parameter]) -> List[Tuple[nn.Parameter, bool]]:
    """Let only ``params`` of ``model`` take gradients; returns the flags for
    :func:`restore_requires_grad`."""
    ids = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(id(p) in ids)
    return flags


def restore_requires_grad(flags: List[Tuple[nn.Parameter, bool]]) -> None:
    for p, flag in flags:
        p.requires_grad_(flag)


def _is_lm(model: nn.Module) -> bool:
    return _head(model) is not None


def calibrate(model: nn.Module, texts: Texts = None, teacher: Optional[nn.Module] = None, *,
              minutes: Optional[float] = None, steps: Optional[int] = None,
              tokenizer: Any = None, sources: Optional[Sequence[CalibrationSource]] = None,
              sample: Optional[int] = None, seq_len: int = DEFAULT_SEQ_LEN, batch_size: int = 2,
              lr: float = 1e-3, eval_every: int = 10, seed: int = 0,
              random_start: bool = True, openers: Sequence[str] = (),
              progress: bool = True) -> CalibrationResult:
    """Train only the compressed tables of ``model`` so that it matches the dense
    ``teacher``: logit KL for language models, hidden states for encoders. In place.

    Args:
        model: a model compressed by compemb (``compress_pretrained``, ``compress`` or
            ``from_pretrained(..., compressed_embedding=...)``).
        texts: calibration text (a string, a list of strings, or ``{source: strings}``);
            needs ``tokenizer``. ``None``: text sampled from the teacher (a causal LM).
            Text is blended with ``sample`` tokens sampled from the teacher (default
            :data:`DEFAULT_SAMPLE_TOKENS` for a causal LM, 0 for encoders); each source gets
            an equal share of the steps.
        teacher: the dense model (never changed). ``None``: the one
            ``compress_pretrained`` recorded on the model, if any.
        minutes, steps: the budget (wall time, sampling included; and/or a step count).
            Neither: 100 steps.
        sources: ready token windows instead of ``texts`` (what ``compress_pretrained``
            passes).
        random_start: sampled windows begin with a random token (:func:`sample_tokens`),
            not all with BOS.
        openers: texts that begin half the sampled windows (e.g. :data:`SAMPLE_OPENERS`;
            default none; they need ``tokenizer``).
        lr: Adam learning rate relative to each parameter's RMS (each parameter moves by
            about ``lr`` of its own scale per step).
        eval_every: steps between evaluations on the held-out windows (one per source);
            the parameters with the lowest held-out loss are kept, so calibration never
            leaves the model worse on them than it started.

    Trained: every floating parameter of the compressed layers (codebook values, TT cores,
    exact rows, logit bias) but the transforms (:data:`FROZEN`); everything else is frozen
    during the call and restored after.
    A progress bar shows the loss and the time left. ``ValueError`` for a model that is
    not compressed, a missing teacher, an encoder without text, or bad budgets.
    """
    from .surgery import compressed_layers

    began = time.monotonic()
    layers = compressed_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no compressed table to calibrate; compress "
                         f"it first (compemb_hf.compress_pretrained)")
    teacher = teacher if teacher is not None else getattr(model, "_compemb_teacher", None)
    if teacher is None:
        raise ValueError("calibrate needs teacher=<the dense model> (e.g. "
                         "AutoModelForCausalLM.from_pretrained(dense_dir))")
    if minutes is not None and not minutes > 0:
        raise ValueError(f"minutes must be > 0, got {minutes!r}")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if minutes is None and steps is None:
        steps = 100
    deadline = None if minutes is None else began + 60.0 * minutes
    lm = _is_lm(model)
    srcs = list(sources or [])
    if not srcs and texts is not None:
        if tokenizer is None:
            raise ValueError("texts need tokenizer=...")
        srcs = sources_from_texts(tokenizer, texts, seq_len)
    if sample is None:
        sample = DEFAULT_SAMPLE_TOKENS if (can_sample(teacher) and sources is None) else 0
    if sample:
        srcs.append(sample_tokens(teacher, sample, seq_len=seq_len, seed=seed, progress=progress,
                                  deadline=deadline, random_start=random_start,
                                  exclude_tokens=special_ids(tokenizer),
                                  prompts=opener_prompts(tokenizer, openers)))
    if not srcs:
        raise ValueError(f"{type(teacher).__name__} cannot generate text: give calibration text "
                         f"(--calibration-text FILE, or texts=... with tokenizer=...)")
    device = _device(model)
    heldout = [s.windows[-1:].to(device) for s in srcs]
    train = [s.windows[:-1] if s.windows.shape[0] > 1 else s.windows for s in srcs]

    params = trainable_parameters(model)
    teacher_state = teacher.training
    model_state = model.training
    frozen = train_only(model, params.values())
    opt = relative_adam(params.values(), lr)
    teacher.eval()
    model.eval()  # no dropout: match the teacher's deterministic outputs

    def evaluate() -> float:
        with torch.no_grad():
            return float(sum(_distill_loss(model, teacher, b, lm) for b in heldout) / len(heldout))

    gen = torch.Generator().manual_seed(seed)
    cursors = [torch.randperm(t.shape[0], generator=gen) for t in train]
    positions = [0] * len(train)
    losses: List[float] = []
    best = evaluate()
    before = best
    best_state = {k: p.detach().clone() for k, p in params.items()}
    step = 0
    bar = _progress(total=steps or 0, desc="calibrating", unit="step", enabled=progress)
    try:
        while (steps is None or step < steps) and (deadline is None or time.monotonic() < deadline):
            k = step % len(train)
            take = []
            for _ in range(batch_size):
                if positions[k] >= cursors[k].numel():
                    cursors[k] = torch.randperm(train[k].shape[0], generator=gen)
                    positions[k] = 0
                take.append(int(cursors[k][positions[k]]))
                positions[k] += 1
            batch = train[k][take].to(device)
            opt.zero_grad(set_to_none=True)
            loss = _distill_loss(model, teacher, batch, lm)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if step % eval_every == 0:
                now = evaluate()
                if now < best:
                    best = now
                    best_state = {k2: p.detach().clone() for k2, p in params.items()}
            left = "" if deadline is None else f"{max(0.0, deadline - time.monotonic()):.0f}s left"
            bar.set_postfix_str(f"loss {losses[-1]:.4f} held-out {best:.4f} {left}")
            bar.update(1)
        if step % eval_every:
            now = evaluate()
            if now < best:
                best = now
                best_state = {k2: p.detach().clone() for k2, p in params.items()}
    finally:
        bar.close()
        with torch.no_grad():
            for k2, p in params.items():
                p.copy_(best_state[k2])
        restore_requires_grad(frozen)
        model.train(model_state)
        teacher.train(teacher_state)
    return CalibrationResult(
        steps=step, seconds=time.monotonic() - began,
        train_loss=[losses[0], losses[-1]] if losses else [],
        heldout_before=before, heldout_after=best,
        sources={s.name: s.num_tokens for s in srcs}, trained=sorted(params))
