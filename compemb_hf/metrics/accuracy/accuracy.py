"""Accuracy: the fraction of predictions equal to their references (compemb_hf copy, loadable
offline with ``evaluate.load(compemb_hf.metrics.path("accuracy"))``)."""
import datasets
import evaluate

_DESCRIPTION = "Accuracy = (number of predictions equal to the reference) / (number of examples)."
_KWARGS = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    normalize (bool): return the fraction (default) or the count of correct predictions.
Returns:
    accuracy (float or int).
"""


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references, normalize=True):
        if len(predictions) != len(references):
            raise ValueError(f"predictions ({len(predictions)}) and references "
                             f"({len(references)}) must have the same length")
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        if not normalize:
            return {"accuracy": correct}
        return {"accuracy": correct / len(predictions) if predictions else float("nan")}
