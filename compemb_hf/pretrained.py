"""Post-training compression of a pretrained model's vocabulary tables.

:func:`compress_pretrained` is what ``compemb compress MODEL --ratio R`` runs:

1. calibration text: the user's sources, blended with text sampled from the model itself
   (a causal LM), each source weighing the same;
2. statistics from the dense model: smoothed, capped token weights and the second moment of
   the LM head's input (:mod:`compemb.fit.stats`);
3. the planner picks the settings that reach the ratio over the vocabulary tables
   (:func:`compemb.fit.plan_fit`), with rows kept exactly for the most used tokens;
4. each table is fitted in the head's metric (:func:`compemb.fit.fit_table`) and put in
   (the model's own tying kept);
5. for a model with an LM head, the head fit (:func:`compemb.fit.fit_head`): the compressed
   parameters tuned so that the head's softmax matches the dense one on the head inputs
   that step 2 saw (no pass through the transformer, so many steps are cheap);
6. a short distillation against the dense model (:func:`compemb_hf.calibrate`), within the
   time budget that is left.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from compemb.fit import (DEFAULT_TRANSFORM_RANK, FitPlan, HeadFit, check_prior, default_prior,
                         default_residual_share, default_row_order, default_row_scale, fit_head,
                         fit_table, metric_root, plan_fit, rank_prior, shrinkage_scale,
                         token_weights)

from .calibration import (DEFAULT_SAMPLE_TOKENS, DEFAULT_SEQ_LEN, CalibrationResult,
                          CalibrationSource, Texts,
                          calibrate, can_sample, collect_statistics, opener_prompts,
                          sample_tokens, special_ids, sources_from_texts)
from .config import CompressedEmbeddingConfig
from .surgery import apply_surgery, is_compressed, plan_surgery

__all__ = ["compress_pretrained", "PretrainedCompression", "IDENTITY_WEIGHT", "HEAD_STEPS",
           "TOKEN_PRIORS"]

#: The token priors ``compress_pretrained(token_prior=...)`` takes by name (or a ``[V]``
#: tensor); the first is the default.
TOKEN_PRIORS = ("rank", "uniform")

#: Weight of plain L2 beside the head's metric for a tied table (whose rows are also read
#: by the input side); an untied head gets a tenth of it.
IDENTITY_WEIGHT = 1.0
#: Steps of the head fit (batches of 256 head inputs) by default.
HEAD_STEPS = 200


@dataclass
class PretrainedCompression:
    """What :func:`compress_pretrained` chose and measured.

    Attributes:
        plan: the settings of each table (:class:`compemb.fit.FitPlan`).
        output: how the head is compressed (``"tied"``, ``"untied"``, ``"dense"``, ``"none"``).
        sources: ``{name: tokens}`` of the calibration text (``"sampled"``: from the model).
        seconds: wall time per stage (``sampling``, ``statistics``, ``fit``, ``calibration``).
        head_fit: the head fit's result (:class:`compemb.fit.HeadFit`), or ``None``.
        calibration: the distillation's result, or ``None`` when not run.
        prior: the prior's share in the token weights (:func:`compemb.fit.token_weights`).
        token_weights: ``float32 [V]``, the weights the tables were fitted with (mean 1).
    """

    plan: FitPlan
    output: str
    sources: Dict[str, int] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)
    head_fit: Optional[HeadFit] = None
    calibration: Optional[CalibrationResult] = None
    prior: Optional[float] = None
    token_weights: Optional[torch.Tensor] = None


def compress_pretrained(model: nn.Module, method: str, ratio: float, *, tokenizer: Any = None,
                        texts: Texts = None, sample: Optional[int] = None,
                        sources: Optional[Sequence[CalibrationSource]] = None,
                        calibration_minutes: Optional[float] = None,
                        calibration_steps: Optional[int] = None, seq_len: int = DEFAULT_SEQ_LEN,
                        exact_share: Optional[float] = None, row_order: Optional[bool] = None,
                        prior: Optional[float] = None, cap: Optional[float] = None,
                        token_prior: Union[str, torch.Tensor] = "rank",
                        seed: int = 0, random_start: bool = True,
                        openers: Sequence[str] = (),
                        head_steps: Optional[int] = None,
                        transform_rank: Optional[int] = DEFAULT_TRANSFORM_RANK,
                        residual_share: Optional[float] = None,
                        row_scale: Optional[bool] = None,
                        progress: bool = True) -> PretrainedCompression:
    """Compress ``model``'s vocabulary tables (input embedding and LM head, tied or not) to
    ``ratio`` times fewer bytes, fitted to the model, in place; the model is then marked
    compressed (``save_pretrained`` writes the inference form: DPQ codes and values, TT
    cores, with the transforms and exact rows).

    Args:
        method: ``"dpq"`` (product quantisation, stored as codes) or ``"tt"`` / ``"tr"``.
        ratio: dense bytes of the vocabulary tables / bytes stored (each table at this
            ratio, in the model's dtype).
        tokenizer, texts: calibration text (see :func:`compemb_hf.calibrate`).
        sample: tokens sampled from the model itself and blended with ``texts`` (default
            :data:`DEFAULT_SAMPLE_TOKENS` for a causal LM; 0 for an encoder, which then
            needs ``texts``).
        calibration_minutes, calibration_steps: the distillation's budget (minutes count
            sampling, statistics and the head fit too). Neither: no distillation, only the
            data-aware fit and the head fit.
        head_steps: steps of the head fit (default :data:`HEAD_STEPS`; 0: none). It stops
            early at the calibration deadline, leaving the distillation what is left.
        exact_share: share of each table's bytes reserved for rows kept exactly (default
            :func:`compemb.fit.default_exact_share`: none; residual rows do it better).
        residual_share: share of each table's bytes for residual rows: the rows that cost
            most get the base's residual at 2-8 bits per dimension
            (:class:`compemb.fit.residual.ResidualRows`; default
            :func:`compemb.fit.default_residual_share`: 0.05 for DPQ, 0.2 when there is no
            user text (all of it sampled), 0.93 for TT/TR).
        row_scale: the table that serves as the head stores a per-token row factor at 8
            bits (``V + 8`` bytes, taken from the budget), set after the head fit from the
            rows' shrinkage (:func:`compemb.fit.shrinkage_scale`): a quantised row is
            shorter along its dense row, so its token's logit falls exactly where the
            context predicts it. Not trained afterwards. ``None`` (default,
            :func:`compemb.fit.default_row_scale`): for DPQ when there is no user text (all
            of it sampled), since with it the head fit already tunes the rows to the
            user's domain, which the scale would cost (and TT measured no gain).
        row_order: TT/TR: place similar rows under shared index prefixes (a stored ``[V]``
            permutation, :func:`compemb.fit.prefix_order`); ``None`` (default,
            :func:`compemb.fit.default_row_order`): on for TT/TR, where it lowers the fit's
            error by about 40%; ignored for DPQ.
        transform_rank: each table's ``d x d`` transform is stored as a Kronecker product
            plus this rank (:class:`compemb.fit.transform.KroneckerLowRank`), freeing its
            bytes for the codes; ``None``: the whole matrix.
        prior, cap: token weight smoothing (:func:`compemb.fit.token_weights`); ``prior``
            defaults (:func:`compemb.fit.default_prior`) to 0.3 when there is calibration
            text and, when all of it is sampled from the model (its counts say less about
            the user's text than the tokenizer's ranks), to 1.0 (the weights are
            ``token_prior`` alone) or, with ``token_prior="uniform"``, 0.85.
        token_prior: the prior that the token counts are blended with: ``"rank"`` (default;
            :func:`compemb.fit.rank_prior`: lower ids are more frequent, as tokenizers
            number their tokens), ``"uniform"``, or a ``[V]`` tensor of non-negative
            weights (e.g. token frequencies of a general corpus).
        random_start: sampled windows begin with a random token (``tokenizer``'s special
            tokens left out), not all with BOS (:func:`compemb_hf.calibration.sample_tokens`).
        openers: texts that begin half the sampled windows (e.g.
            :data:`compemb_hf.calibration.SAMPLE_OPENERS`: code, markup, formal prose, ...;
            default none: measured, no consistent gain); they need ``tokenizer``.
        sources: ready token windows (:class:`compemb_hf.calibration.CalibrationSource`,
            e.g. one sampling shared by several compressions), used beside ``texts`` and
            ``sample``.

    ``ValueError`` before any work for: a model already compressed, one without an
    embedding the project can replace, an unreachable ratio (naming the closest one), an
    encoder without text, text too short for one window.
    """
    began = time.monotonic()
    deadline = None if calibration_minutes is None else began + 60.0 * calibration_minutes
    if is_compressed(model):
        raise ValueError(f"{type(model).__name__} is already compressed")
    if method not in ("tt", "tr", "dpq"):
        raise ValueError(f"method must be 'dpq', 'tt' or 'tr', got {method!r}")
    head_steps = HEAD_STEPS if head_steps is None else head_steps
    if not (isinstance(head_steps, int) and not isinstance(head_steps, bool) and head_steps >= 0):
        raise ValueError(f"head_steps must be an int >= 0, got {head_steps!r}")
    probe = CompressedEmbeddingConfig(method)
    layout = plan_surgery(model, probe)  # ValueError for a model without a replaceable embedding
    weight = layout.groups[0].weight
    v, d = int(weight.shape[0]), int(weight.shape[1])
    prior_distribution = _token_prior(token_prior, v)
    has_head = layout.output in ("tied", "untied")
    if row_order is not None and not isinstance(row_order, bool):
        raise ValueError(f"row_order must be True, False or None (on for tt/tr), got "
                         f"{row_order!r}")
    if row_order is None:
        row_order = default_row_order(method)
    if row_scale is not None and not isinstance(row_scale, bool):
        raise ValueError(f"row_scale must be True, False or None (the default rule), got "
                         f"{row_scale!r}")
    only_sampled = texts is None and all(s.sampled for s in sources or [])  # no user text
    if row_scale is None:
        row_scale = default_row_scale(only_sampled, method)
    if residual_share is None:
        residual_share = default_residual_share(method, only_sampled)
    fit_plan = plan_fit(v, d, method, ratio, element_size=weight.element_size(),
                        transform=has_head, row_order=row_order, logit_bias=has_head,
                        exact_share=exact_share, transform_rank=transform_rank,
                        residual_share=residual_share, row_scale=has_head and row_scale)
    if sample is None:
        sample = DEFAULT_SAMPLE_TOKENS if can_sample(model) else 0
    sources = list(sources or [])
    if texts is not None:
        if tokenizer is None:
            raise ValueError("texts need tokenizer=...")
        sources += sources_from_texts(tokenizer, texts, seq_len)
    if sample and not can_sample(model):
        raise ValueError(f"{type(model).__name__} cannot generate text: set sample=0 and give "
                         f"calibration text")
    if not sources and not sample:
        raise ValueError(f"{type(model).__name__} cannot generate text to calibrate on: give "
                         f"calibration text (--calibration-text FILE, or texts=... with "
                         f"tokenizer=...)")

    seconds: Dict[str, float] = {}
    t = time.monotonic()
    if sample:
        sources.append(sample_tokens(model, sample, seq_len=seq_len, seed=seed, progress=progress,
                                     deadline=deadline, random_start=random_start,
                                     exclude_tokens=special_ids(tokenizer),
                                     prompts=opener_prompts(tokenizer, openers)))
    seconds["sampling"] = time.monotonic() - t
    t = time.monotonic()
    head_inputs: list = []
    counts, second, mean = collect_statistics(model, sources, v, progress=progress,
                                              deadline=deadline, head_inputs=head_inputs)
    seconds["statistics"] = time.monotonic() - t

    t = time.monotonic()
    if prior is None:
        prior = default_prior(all(s.sampled for s in sources), prior_distribution is None)
    tw = token_weights(counts, prior=prior, prior_distribution=prior_distribution,
                       **({} if cap is None else {"cap": cap}))
    teacher = copy.deepcopy(model) if (calibration_minutes or calibration_steps) else None
    # the logit bias cancels each row's error along the mean hidden state, so the fit
    # spends its budget on the covariance (plus plain L2 for the input side of a tied table)
    covariance = None if second is None else second - torch.outer(mean, mean)
    metrics = {
        "input": metric_root(covariance, d, IDENTITY_WEIGHT)
        if layout.output == "tied" and covariance is not None else None,
        "head": metric_root(covariance, d, 0.1 * IDENTITY_WEIGHT) if covariance is not None else None,
    }
    head_role = "input" if layout.output == "tied" else "head"
    config = CompressedEmbeddingConfig(
        method, **{k: val for k, val in fit_plan.spec.to_dict().items() if k != "method"},
        output=layout.output if has_head else None,
        form="codebook" if method == "dpq" else "train",
        fit={"transform": fit_plan.transform, "exact_rows": fit_plan.num_exact,
             "row_order": fit_plan.row_order, "logit_bias": fit_plan.logit_bias,
             **({"transform_rank": fit_plan.transform_rank}
                if fit_plan.transform_rank is not None else {}),
             **({"row_scale": True} if fit_plan.row_scale else {})})

    def build(path: str, table: torch.Tensor, padding_idx: Optional[int], role: str):
        metric = metrics[role]
        if metric is None and fit_plan.transform:  # same structure for every table
            eye = torch.eye(d, dtype=torch.float64)
            metric = (eye, eye)
        layer = fit_table(table.detach(), fit_plan.spec, token_weights=tw, metric=metric,
                          # a random rotation (DPQ's groups, every method's residual
                          # rows: compemb.fit.default_rotation) is stored in the
                          # transform, so only where the plan pays for one
                          rotate=None if fit_plan.transform else False,
                          num_exact=fit_plan.num_exact, row_order=fit_plan.row_order,
                          transform_rank=fit_plan.transform_rank,
                          padding_idx=padding_idx, seed=seed,
                          residual_bytes=fit_plan.residual_bytes,
                          head_mean=mean if (role == head_role and fit_plan.logit_bias) else None)
        if layer.residual is not None:  # a checkpoint rebuilds the same structure
            residual_rows[role] = {str(b): n for b, n in layer.residual.counts.items()}
        return layer.to(table.device)

    residual_rows: Dict[str, Dict[str, int]] = {}
    dense_head = _dense_head(model) if has_head else None
    apply_surgery(model, config, from_weights=True, progress=progress, build=build)
    if residual_rows:
        config.fit["residual_rows"] = residual_rows
    from .quantizer import mark_compressed

    mark_compressed(model, config)
    seconds["fit"] = time.monotonic() - t
    result = PretrainedCompression(plan=fit_plan, output=layout.output,
                                   sources={s.name: s.num_tokens for s in sources},
                                   seconds=seconds, prior=prior, token_weights=tw)
    if dense_head is not None and head_inputs and head_steps:
        t = time.monotonic()
        result.head_fit = _fit_head(model, dense_head, head_inputs, head_steps, deadline, seed,
                                    progress)
        seconds["head fit"] = time.monotonic() - t
    if fit_plan.row_scale:
        _set_row_scale(model, dense_head[0], mean)
    del dense_head
    if teacher is not None:
        left = None if deadline is None else (deadline - time.monotonic()) / 60.0
        if left is None or left > 0:
            result.calibration = calibrate(model, teacher=teacher, sources=sources, sample=0,
                                           minutes=left, steps=calibration_steps, seq_len=seq_len,
                                           seed=seed, progress=progress)
            seconds["calibration"] = result.calibration.seconds
        del teacher
    return result


def _token_prior(token_prior: Union[str, torch.Tensor], num_embeddings: int
                 ) -> Optional[torch.Tensor]:
    """The prior distribution ``[V]`` that ``token_prior`` names (``None``: uniform);
    ``ValueError`` for anything else."""
    if isinstance(token_prior, torch.Tensor):
        return check_prior(token_prior, num_embeddings, name="token_prior")
    if token_prior == "rank":
        return rank_prior(num_embeddings)
    if token_prior == "uniform":
        return None
    raise ValueError(f"token_prior must be {', '.join(map(repr, TOKEN_PRIORS))} or a "
                     f"[{num_embeddings}] tensor, got {token_prior!r:.80}")


def _dense_head(model: nn.Module):
    """``(weight [V, d], bias [V] or None)`` of the model's dense LM head, copied."""
    head = model.get_output_embeddings()
    weight = head.weight.detach().clone()
    bias = getattr(head, "bias", None)
    return weight, None if bias is None else bias.detach().clone()


@torch.no_grad()
def _set_row_scale(model: nn.Module, dense_weight: torch.Tensor,
                   head_mean: Optional[torch.Tensor]) -> None:
    """The head table's row scale from its rows' shrinkage against ``dense_weight``, the
    logits at the mean head input kept (when it is known)."""
    table = model.get_output_embeddings().table
    table.set_row_scale(shrinkage_scale(table.materialize(), dense_weight),
                        head_mean=head_mean if table.logit_bias is not None else None)


def _fit_head(model: nn.Module, dense_head, head_inputs, steps: int, deadline: Optional[float],
              seed: int, progress: bool) -> HeadFit:
    """The compressed parameters (not the transforms) tuned to the dense head's softmax."""
    from .calibration import _progress, restore_requires_grad, train_only, trainable_parameters

    weight, bias = dense_head
    head = model.get_output_embeddings()
    device, dtype = weight.device, weight.dtype  # the inputs were kept as float32

    def teacher(h: torch.Tensor) -> torch.Tensor:
        out = h.to(device, dtype) @ weight.T
        return out if bias is None else out + bias

    def student(h: torch.Tensor) -> torch.Tensor:
        return head(h.to(device, dtype))

    params = list(trainable_parameters(model).values())
    flags = train_only(model, params)  # no gradient work (nor stale .grad) for anything else
    bar = _progress(total=steps, desc="head fit", unit="step", enabled=progress)
    try:
        def on_step(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(kl=f"{loss:.4f}")

        return fit_head(student, teacher, head_inputs, params, steps=steps, deadline=deadline,
                        seed=seed, on_step=on_step)
    finally:
        bar.close()
        restore_requires_grad(flags)
