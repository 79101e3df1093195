"""The compression report over a whole model."""
import json

import torch
from torch import nn

import compemb
from compemb.report import LayerStorage


class _Fake(nn.Module):
    """A stand-in compressed layer: 10 x 8 table stored in 20 float32 numbers + 6 bytes."""

    num_embeddings, embedding_dim = 10, 8

    def __init__(self):
        super().__init__()
        self.cores = nn.Parameter(torch.zeros(20))
        self.inner = nn.Linear(2, 2)  # a child: must not be counted as "other"

    def storage(self):
        return LayerStorage("fake", "20 numbers", 10, 8, stored_parameters=20,
                            stored_bytes=20 * 4 + 6, dense_bytes=10 * 8 * 4)


def test_rows_totals_and_tied_tensors_counted_once():
    model = nn.Module()
    model.emb = _Fake()
    model.lin = nn.Linear(8, 3)
    model.head = compemb.OutputLayer(model.emb, tied=True)
    model.register_buffer("buf", torch.zeros(4, dtype=torch.uint8))
    model.register_buffer("table", torch.zeros(100), persistent=False)  # not stored
    rep = compemb.compression_report(model)
    assert [r.name for r in rep.rows] == ["emb"]
    row = rep.rows[0].to_dict()
    assert row["dense_parameters"] == 80 and row["stored_bytes"] == 86
    assert abs(row["ratio"] - 320 / 86) < 1e-9
    assert rep.other_parameters == 8 * 3 + 3
    assert rep.other_bytes == (8 * 3 + 3) * 4 + 4
    assert rep.model_stored_bytes == rep.other_bytes + 86
    assert rep.model_dense_bytes == rep.other_bytes + 320
    d = json.loads(rep.to_json())
    assert d["totals"]["embedding_ratio"] == rep.embedding_ratio
    text = str(rep)
    assert "emb" in text and "fake" in text and "3.7x" in text


def test_model_without_compressed_layers():
    rep = compemb.compression_report(nn.Embedding(10, 4))
    assert rep.rows == [] and rep.embedding_ratio == 1.0 and rep.model_ratio == 1.0
    assert rep.other_bytes == 160
