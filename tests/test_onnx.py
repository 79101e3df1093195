"""ONNX export of the inference forms (DPQ CodebookEmbedding, TT, TR): lookup and logits
through torch.onnx (dynamo exporter) run in onnxruntime and equal eager. Skipped without
the ``onnx`` extra (``pip install compemb[onnx]``)."""
import pytest
import torch

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from compemb.dpq import CodebookEmbedding  # noqa: E402
from compemb.tr import TREmbedding  # noqa: E402
from compemb.tt import TTEmbedding  # noqa: E402


class _Both(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids, hidden):
        return self.inner(ids), self.inner.logits(hidden)


def _layer(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "codebook":
        return CodebookEmbedding(torch.randint(200, (203, 6), generator=g),
                                 torch.randn(6, 200, 2, generator=g), padding_idx=3)
    torch.manual_seed(0)
    cls = TTEmbedding if kind == "tt" else TREmbedding
    return cls(203, 12, 3, padding_idx=3)


@pytest.mark.parametrize("kind", ["codebook", "tt", "tr"])
def test_onnx_export_runs_in_onnxruntime_and_equals_eager(kind, tmp_path):
    module = _Both(_layer(kind).eval())
    ids = torch.tensor([[0, 202, 3], [7, 7, 1]])
    hidden = torch.randn(2, 12, generator=torch.Generator().manual_seed(1))
    path = str(tmp_path / "layer.onnx")
    with torch.no_grad():
        rows, logits = module(ids, hidden)
        torch.onnx.export(module, (ids, hidden), dynamo=True).save(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    out_rows, out_logits = session.run(None, {names[0]: ids.numpy(), names[1]: hidden.numpy()})
    torch.testing.assert_close(torch.from_numpy(out_rows), rows, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(out_logits), logits, rtol=1e-5, atol=1e-5)
    other = torch.tensor([[202, 201, 0], [5, 3, 9]])
    with torch.no_grad():
        expected = module.inner(other)
    got = session.run(None, {names[0]: other.numpy(), names[1]: hidden.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-6, atol=1e-6)
