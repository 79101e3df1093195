"""Corpus BLEU computed by sacrebleu (compemb_hf copy, loadable offline)."""
import datasets
import evaluate
import sacrebleu

_DESCRIPTION = "Corpus-level BLEU (sacrebleu's corpus_bleu, default 13a tokenisation)."
_KWARGS = """
Args:
    predictions (list of str): system outputs, one per segment.
    references (list of list of str): the references of each segment (same count for all).
    tokenize (str): sacrebleu tokeniser (default "13a"); lowercase (bool).
Returns:
    score, counts, totals, precisions, bp, sys_len, ref_len.
"""


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=[datasets.Features({"predictions": datasets.Value("string"),
                                         "references": datasets.Sequence(datasets.Value("string"))}),
                      datasets.Features({"predictions": datasets.Value("string"),
                                         "references": datasets.Value("string")})])

    def _compute(self, predictions, references, tokenize="13a", lowercase=False):
        if references and isinstance(references[0], str):
            references = [[r] for r in references]
        counts = {len(r) for r in references}
        if len(counts) > 1:
            raise ValueError(f"every prediction needs the same number of references, got {counts}")
        transposed = [list(refs) for refs in zip(*references)]
        out = sacrebleu.corpus_bleu(predictions, transposed, tokenize=tokenize,
                                    lowercase=lowercase)
        return {"score": out.score, "counts": out.counts, "totals": out.totals,
                "precisions": out.precisions, "bp": out.bp, "sys_len": out.sys_len,
                "ref_len": out.ref_len}
