"""Compressing a pretrained table: calibration statistics, weighted fits in the model's
metric, mixed allocation (residual rows at 2-8 bits and exact rows for the tokens that cost
most) and the planner.

torch only; ``compemb_hf`` (and any other integration) collects the statistics from its
model and text, then calls :func:`fit_table` with the settings of :func:`plan_fit`.
"""
from .fit import (default_rotation, fit_codebook, fit_table, fit_tensor_network, prefix_order,
                  random_rotation, weighted_error)
from .head import HeadFit, fit_head, head_kl, relative_adam
from .layer import ROW_SCALE_POWER, FittedEmbedding, shrinkage_scale
from .plan import (DEFAULT_EXACT_SHARE, DEFAULT_TRANSFORM_RANK, DPQ_EXACT_SHARE,
                   DPQ_RESIDUAL_SHARE, DPQ_SAMPLED_RESIDUAL_SHARE, TT_RESIDUAL_SHARE, FitPlan,
                   TT_SAMPLED_RESIDUAL_SHARE,
                   default_exact_share, default_residual_share, default_row_order,
                   default_row_scale, plan_fit)
from .residual import ResidualRows, allocate_bits
from .stats import (DEFAULT_CAP, DEFAULT_PRIOR, SAMPLED_PRIOR, SAMPLED_UNIFORM_PRIOR, SecondMoment,
                    check_prior, count_tokens, default_prior, metric_root, rank_prior,
                    token_weights)
from .transform import KroneckerLowRank

__all__ = ["FittedEmbedding", "HeadFit", "fit_head", "head_kl", "relative_adam", "fit_table", "fit_codebook", "fit_tensor_network", "prefix_order",
           "random_rotation", "weighted_error", "FitPlan", "plan_fit", "DEFAULT_EXACT_SHARE",
           "DEFAULT_TRANSFORM_RANK", "KroneckerLowRank", "DPQ_EXACT_SHARE", "default_exact_share",
           "SecondMoment", "count_tokens", "metric_root", "token_weights", "DEFAULT_PRIOR",
           "DEFAULT_CAP", "DPQ_RESIDUAL_SHARE", "default_residual_share", "ResidualRows",
           "allocate_bits", "TT_RESIDUAL_SHARE", "rank_prior", "SAMPLED_PRIOR", "check_prior",
           "SAMPLED_UNIFORM_PRIOR", "default_prior", "shrinkage_scale", "ROW_SCALE_POWER",
           "default_row_scale", "DPQ_SAMPLED_RESIDUAL_SHARE", "default_row_order",
           "TT_SAMPLED_RESIDUAL_SHARE", "default_rotation"]
