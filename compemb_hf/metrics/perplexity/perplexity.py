"""Perplexity from per-token negative log-likelihoods (natural log): ``exp(mean nll)``.

Unlike the Hub's ``perplexity`` (which runs a model itself), this takes the losses your
evaluation loop already has: add one ``nll`` per token with weight 1, or a batch's mean
``nll`` with its token count as weight."""
import math

import datasets
import evaluate

_DESCRIPTION = "Perplexity = exp(sum(weight * nll) / sum(weight)), nll in nats."
_KWARGS = """
Args:
    nll (list of float): negative log-likelihoods in nats (a token's, or a batch's mean).
    weights (list of float): tokens behind each nll (1 for a token's).
Returns:
    perplexity (float), mean_nll (float), tokens (float).
"""


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"nll": datasets.Value("float64"),
                                        "weights": datasets.Value("float64")}))

    def _compute(self, nll, weights):
        if len(weights) != len(nll):
            raise ValueError(f"weights ({len(weights)}) must match nll ({len(nll)})")
        if any(w < 0 for w in weights) or any(x != x for x in nll):
            raise ValueError("weights must be >= 0 and nll must not be NaN")
        total = float(sum(weights))
        if total <= 0:
            raise ValueError("perplexity needs at least one token (sum of weights > 0)")
        mean = sum(w * x for w, x in zip(weights, nll)) / total
        return {"perplexity": math.exp(mean), "mean_nll": mean, "tokens": total}
