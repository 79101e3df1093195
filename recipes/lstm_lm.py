"""LSTM language model on PTB with compressed embedding and softmax (DPQ paper's LM table;
the README demo runs a short version of it).

    accelerate launch -m recipes.lstm_lm --method tt --rank 16 --scale small --out runs/lstm_tt
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import compemb

from .common.ptb import Vocab, load_ptb_text
from .common.run import (TrainingState, add_method_args, add_resume_args, add_run_args,
                         apply_run_args, base_result, preflight, write_results)
from .models.lstm_lm import LSTMLanguageModel

SCALES = {
    # embedding_dim, hidden, layers, dropout, batch, bptt, epochs (fractional: a budget), lr
    "smoke": dict(dim=64, hidden=64, layers=1, dropout=0.0, batch=16, bptt=20, epochs=0.02, lr=3e-3),
    "small": dict(dim=200, hidden=200, layers=2, dropout=0.2, batch=20, bptt=35, epochs=6, lr=2e-3),
    "paper": dict(dim=650, hidden=650, layers=2, dropout=0.5, batch=20, bptt=35, epochs=39, lr=1e-3),
}


def batchify(ids: List[int], batch: int) -> Tensor:
    """``[N] -> [batch, N // batch]`` contiguous streams, as in the usual PTB setup."""
    n = len(ids) // batch
    return torch.tensor(ids[: n * batch], dtype=torch.long).view(batch, n)


@torch.no_grad()
def perplexity(model: LSTMLanguageModel, data: Tensor, bptt: int) -> float:
    """Perplexity over ``data [B, N]``, carrying the LSTM state across segments."""
    model.eval()
    total, count, state = 0.0, 0, None
    for i in range(0, data.size(1) - 1, bptt):
        x = data[:, i: i + bptt]
        y = data[:, i + 1: i + 1 + bptt]
        x = x[:, : y.size(1)]
        logits, state = model(x, state)
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                 reduction="sum").item()
        count += y.numel()
    model.train()
    return math.exp(total / count)


def train(spec: compemb.EmbeddingSpec, output: str, scale: Dict, *, max_steps: Optional[int] = None,
          seed: int = 0, log_every: int = 100, progress: bool = True, out: Optional[Path] = None,
          resume: bool = False, checkpoint_every: int = 200) -> Dict:
    """Train on PTB train, report valid/test perplexity. Returns the results dict.

    With ``out``, the training state is saved to ``out/train_state.pt`` every
    ``checkpoint_every`` steps; ``resume`` continues from it (the same steps as an
    uninterrupted run)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    text = load_ptb_text()
    vocab = Vocab(text["train"])
    accelerator = Accelerator()
    model = LSTMLanguageModel(len(vocab), scale["dim"], scale["hidden"], scale["layers"], spec,
                              output=output, dropout=scale["dropout"])
    report = compemb.compression_report(model)
    # data parallel: each process trains on its own scale["batch"] of the batch * processes
    # streams (one process: all of them), so an epoch takes 1/processes of the steps
    streams = batchify(vocab.encode(text["train"]), scale["batch"] * accelerator.num_processes)
    train_data = streams[accelerator.process_index::accelerator.num_processes]
    bptt = scale["bptt"]
    steps_per_epoch = (train_data.size(1) - 1) // bptt
    total_steps = max_steps or max(1, int(scale["epochs"] * steps_per_epoch))
    optimizer = torch.optim.Adam(model.parameters(), lr=scale["lr"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    saver = None
    if out is not None:
        saver = TrainingState(out, {"task": "ptb-lm-lstm", "spec": spec.to_dict(), "output": output,
                                    "scale": scale, "total_steps": total_steps, "seed": seed,
                                    "processes": accelerator.num_processes},
                              accelerator, every=checkpoint_every, resume=resume)
    start = time.time()
    state, step, pos = None, 0, 0
    restored = saver.load(model, optimizer, scheduler) if saver is not None else None
    if restored is not None:
        step, pos = restored["step"], restored["pos"]
        state = tuple(t.to(accelerator.device) for t in restored["state"]) if restored["state"] else None
    bar = tqdm(total=total_steps, initial=step, disable=not progress or not accelerator.is_main_process,
               desc=f"{spec.method}/{output}")
    while step < total_steps:
        if pos + bptt + 1 > train_data.size(1):
            pos, state = 0, None
        x = train_data[:, pos: pos + bptt].to(accelerator.device)
        y = train_data[:, pos + 1: pos + 1 + bptt].to(accelerator.device)
        pos += bptt
        if state is not None:
            state = tuple(s.detach() for s in state)
        logits, state = model(x, state)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        bar.update(1)
        if step % log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", ppl=f"{math.exp(min(loss.item(), 20)):.1f}")
        if saver is not None and step < total_steps:
            saver.maybe_save(step, model, optimizer, scheduler,
                             {"pos": pos, "state": [t.detach().cpu() for t in state]})
    bar.close()
    train_time = time.time() - start
    model = accelerator.unwrap_model(model)
    valid = perplexity(model, batchify(vocab.encode(text["valid"]), 10), bptt)
    test = perplexity(model, batchify(vocab.encode(text["test"]), 10), bptt)
    result = base_result("ptb-lm-lstm", "ptb", "-", spec, model, report, "test_ppl", test,
                         higher_is_better=False, wall_time_s=train_time, valid_ppl=valid,
                         output=output, steps=total_steps,
                         train_tokens=total_steps * scale["batch"] * bptt * accelerator.num_processes)
    result.update(model=model, report_obj=report, training_state=saver)
    return result


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_method_args(parser)
    parser.add_argument("--output", default="tied", choices=["tied", "untied", "dense"],
                        help="the softmax: the input table (tied), a second table of the same "
                             "method (untied) or a plain dense layer")
    parser.add_argument("--lr", type=float, help="Adam learning rate (default: the scale's)")
    add_run_args(parser, SCALES)
    add_resume_args(parser)
    args = parser.parse_args(argv)
    scale = apply_run_args(args, SCALES)
    if args.lr is not None:
        if not args.lr > 0:
            parser.error(f"argument --lr: must be > 0, got {args.lr}")
        scale["lr"] = args.lr
    def prepare(spec):
        vocab = Vocab(load_ptb_text()["train"])
        return LSTMLanguageModel(len(vocab), scale["dim"], scale["hidden"], scale["layers"], spec,
                                 output=args.output), None

    checked = preflight(parser, args, 10000, scale["dim"], prepare)
    if checked is None:
        return
    spec, _ = checked
    result = train(spec, args.output, scale, max_steps=args.max_steps, seed=args.seed,
                   progress=not args.no_progress, out=args.out, resume=args.resume,
                   checkpoint_every=args.checkpoint_every)
    model, report, saver = result.pop("model"), result.pop("report_obj"), result.pop("training_state")
    result.update(dataset="ptb", scale=args.scale, higher_is_better=False, lr=scale["lr"],
                  epochs=scale["epochs"])
    print(report)
    print(f"valid ppl {result['valid_ppl']:.2f}  test ppl {result['value']:.2f}")
    write_results(args.out, result, model)
    saver.finish()


if __name__ == "__main__":
    main()
