"""Fine-tune a BERT pretrained by recipes/bert_mlm.py (its compressed word embedding as
pretrained) on movie-review sentiment: does the compressed embedding carry meaning? The
metric is test accuracy at the epoch with the best validation accuracy. ``--init random``
fine-tunes the same architecture (same tokenizer, same compressed layers) from random
weights instead: the baseline without pretraining (results under the task
``bert-sentiment-no-pretraining``); ``--init embedding`` loads only the pretrained word
embedding (task ``bert-sentiment-embedding-only``).

    recipes/bert_mlm.sh --method tt --rank 16 --scale small --out runs/bert_tt16
    recipes/bert_sentiment.sh --pretrained runs/bert_tt16 --scale small --out runs/bert_tt16_sent
    python -m recipes.bert_sentiment --pretrained runs/bert_dense --init random \\
        --scale small --out runs/bert_dense_scratch --threads 1

Small scale: the Rotten Tomatoes snippets of recipes/sentiment.py (recipes/DATA.md);
paper scale: IMDB / SST through `datasets`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader

import compemb
from accelerate import PartialState

from .common.run import add_run_args, apply_run_args, base_result, preflight, write_results
from .common.sentiment_data import DATASETS, load_sentiment, num_classes
from .common.training import accuracy, fit
from .sentiment import LengthBuckets, _limit

SCALES: Dict[str, Dict] = {
    # max_len: tokens per text ([CLS] and [SEP] included); train_limit: examples used
    "smoke": dict(dataset="rt", max_len=32, batch=16, epochs=1, lr=1e-3, warmup=0.1, train_limit=128),
    # ~1 min on one unloaded CPU thread with the small bert_mlm model
    "small": dict(dataset="rt", max_len=64, batch=32, epochs=2, lr=5e-4, warmup=0.1, train_limit=None),
    "paper": dict(dataset="imdb", max_len=512, batch=32, epochs=3, lr=2e-5, warmup=0.1, train_limit=None),
}
INITS = ("pretrained", "embedding", "random")
#: results.json task per --init
TASKS = {"pretrained": "bert-sentiment", "embedding": "bert-sentiment-embedding-only",
         "random": "bert-sentiment-no-pretraining"}
CHECKPOINT_FILES = ("config.json", "tokenizer.json", "embedding_spec.json")


def check_pretrained(path: Path) -> Optional[str]:
    """Why ``path`` is not a bert_mlm output folder, or None when it is one."""
    if not path.is_dir():
        return f"--pretrained {path} is not a folder (give the --out folder of recipes/bert_mlm.py)"
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if missing:
        return (f"--pretrained {path} lacks {', '.join(missing)}: not a finished recipes/bert_mlm.py "
                f"run (its --out folder holds config.json, the weights, the tokenizer and "
                f"embedding_spec.json)")
    if not any((path / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        return f"--pretrained {path} has no weights (model.safetensors)"
    return None


def load_classifier(path: Path, num_labels: int, init: str = "pretrained"):
    """``BertForSequenceClassification`` over the bert_mlm checkpoint in ``path``: its
    encoder and compressed word embedding loaded (``init="pretrained"``; the MLM head is
    dropped, the pooler and classifier start random), only its word embedding loaded and
    the rest random (``init="embedding"``), or the same architecture with random weights
    (``init="random"``)."""
    import compemb_hf
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig.from_pretrained(path, num_labels=num_labels)
    quant = getattr(config, "quantization_config", None)
    if quant is not None:
        quant = dict(quant) if isinstance(quant, dict) else quant.to_dict()
        quant["output"] = None  # a classifier has no LM head to tie or compress
    if init != "random" and quant is not None:
        config.quantization_config = quant
    pretrained = (BertForSequenceClassification.from_pretrained(path, config=config)
                  if init != "random" else None)
    if init == "pretrained":
        return pretrained
    config = BertConfig.from_pretrained(path, num_labels=num_labels)
    if quant is not None:
        del config.quantization_config
    model = BertForSequenceClassification(config)
    if quant is not None:
        compemb_hf.compress(model, compemb_hf.CompressedEmbeddingConfig.from_dict({**quant, "init": "random"}))
    if pretrained is not None:  # init="embedding"
        model.get_input_embeddings().load_state_dict(pretrained.get_input_embeddings().state_dict())
    return model


def encode(tokenizer, data: Dict[str, List], max_len: int) -> Dict[str, List]:
    """``{split: [(ids, label)]}``: ``[CLS] text [SEP]`` ids cut at ``max_len``."""
    out = {}
    for split, examples in data.items():
        ids = tokenizer([t for t, _ in examples], truncation=True, max_length=max_len)["input_ids"]
        out[split] = [(seq, label) for seq, (_, label) in zip(ids, examples)]
    return out


def collate(items: List[tuple], pad_id: int) -> Dict[str, Tensor]:
    """``[(ids, label)] -> {"input_ids", "attention_mask" [B, T] (padded with pad_id), "labels" [B]}``."""
    longest = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(items), longest, dtype=torch.long)
    for row, (ids, _) in enumerate(items):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask,
            "labels": torch.tensor([label for _, label in items])}


def _logits(model, batch: Dict) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def finetune(spec: compemb.EmbeddingSpec, pretrained: Path, init: str, scale: Dict, tokenizer,
             data: Dict[str, List], *, classes: int = 2, dataset: str = "custom",
             scale_name: str = "custom", max_steps: Optional[int] = None, seed: int = 0,
             progress: bool = True, log_every: int = 20) -> Dict:
    """Fine-tune on ``data["train"]`` (``(text, label)`` pairs), pick the epoch by
    ``data["valid"]`` accuracy, report ``data["test"]`` accuracy. Returns the results dict
    with the model under ``"model"``."""
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    enc = encode(tokenizer, _limit(data, scale), scale["max_len"])
    model = load_classifier(pretrained, classes, init)
    report = compemb.compression_report(model)
    accelerator = Accelerator()

    def loader(split: str, shuffle: bool) -> DataLoader:
        sampler = LengthBuckets([len(x) for x, _ in enc[split]], scale["batch"], shuffle, seed)
        return DataLoader(enc[split], batch_sampler=sampler,
                          collate_fn=lambda items: collate(items, tokenizer.pad_token_id))

    train_dl, valid_dl, test_dl = loader("train", True), loader("valid", False), loader("test", False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=scale["lr"], weight_decay=0.01)
    model, optimizer, train_dl, valid_dl, test_dl = accelerator.prepare(
        model, optimizer, train_dl, valid_dl, test_dl)
    total_steps = max_steps or scale["epochs"] * len(train_dl)
    scheduler = get_linear_schedule_with_warmup(optimizer, max(1, int(scale["warmup"] * total_steps)),
                                                total_steps)
    start = time.time()
    history, best_epoch, step = fit(
        accelerator, model, optimizer, train_dl, lambda m, b: m(**b).loss,
        lambda: {"valid_accuracy": accuracy(model, valid_dl, accelerator, _logits)}, "valid_accuracy",
        total_steps, scheduler=scheduler, clip_norm=1.0, progress=progress,
        desc=f"bert-sentiment {spec.method} ({init})", log_every=log_every)
    test = accuracy(model, test_dl, accelerator, _logits)
    wall = time.time() - start
    model = accelerator.unwrap_model(model)
    pretraining = {}
    if (pretrained / "results.json").is_file():
        source = json.loads((pretrained / "results.json").read_text())
        pretraining = {k: source.get(k) for k in ("metric", "value", "steps", "output", "wall_time_s")}
    result = base_result(
        TASKS[init], dataset, scale_name, spec, model, report, "test_accuracy", test, True, wall,
        init=init, pretrained=str(pretrained), pretraining=pretraining,
        valid_accuracy=history[best_epoch - 1]["valid_accuracy"], best_epoch=best_epoch, steps=step,
        history=history, vocab_size=len(tokenizer), hyperparameters=scale,
        examples={k: len(v) for k, v in enc.items()})
    result["model"] = model
    return result


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", type=Path, required=True,
                        help="the --out folder of recipes/bert_mlm.py (checkpoint and tokenizer)")
    parser.add_argument("--init", default="pretrained", choices=INITS,
                        help="start from the pretrained weights, from the pretrained word embedding only "
                             "(the encoder random), or from random weights (the baseline)")
    parser.add_argument("--dataset", choices=DATASETS, help="default: rt (smoke, small), imdb (paper)")
    add_run_args(parser, SCALES)
    parser.add_argument("--lr", type=float, help="override the scale's learning rate")
    args = parser.parse_args(argv)
    scale = apply_run_args(args, SCALES)
    if args.lr is not None:
        scale["lr"] = args.lr
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dataset = args.dataset or scale["dataset"]
    problem = check_pretrained(args.pretrained)
    if problem:
        parser.error(problem)
    from transformers import BertConfig, PreTrainedTokenizerFast
    try:
        bert = BertConfig.from_pretrained(args.pretrained)
    except (OSError, ValueError) as err:
        parser.error(f"--pretrained {args.pretrained}: cannot read its config.json ({err})")
    args.config = args.pretrained / "embedding_spec.json"  # the spec comes from the checkpoint

    def prepare(spec):
        data = load_sentiment(dataset)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(args.pretrained)
        return load_classifier(args.pretrained, num_classes(dataset), args.init), (tokenizer, data)

    checked = preflight(parser, args, bert.vocab_size, bert.hidden_size, prepare)
    if checked is None:
        return
    spec, (tokenizer, data) = checked
    result = finetune(spec, args.pretrained, args.init, scale, tokenizer, data,
                      classes=num_classes(dataset), dataset=dataset, scale_name=args.scale,
                      max_steps=args.max_steps, seed=args.seed, progress=not args.no_progress)
    model = result.pop("model")
    if not PartialState().is_main_process:
        return
    print(compemb.compression_report(model))
    print(f"test accuracy {result['value']:.4f} (valid {result['valid_accuracy']:.4f}, "
          f"epoch {result['best_epoch']}), {result['wall_time_s']:.0f}s")
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    write_results(args.out, dict(result, checkpoint="."))


if __name__ == "__main__":
    main(sys.argv[1:])
