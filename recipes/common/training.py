"""The training loop the classification recipes share: Accelerate, a progress bar with the
running loss, one validation pass per epoch, and the weights of the best validation epoch
restored at the end."""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["fit", "accuracy"]


def fit(accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, train_dl,
        loss_fn: Callable[[nn.Module, object], Tensor], validate: Callable[[], Dict[str, float]],
        select: str, total_steps: int, *, scheduler=None, clip_norm: Optional[float] = None,
        progress: bool = True, desc: str = "", log_every: int = 50, training_state=None,
        generator: Optional[torch.Generator] = None) -> Tuple[List[Dict], int, int]:
    """Train ``model`` (already prepared) for ``total_steps`` optimizer steps of
    ``loss_fn(model, batch)``, calling ``validate()`` after every epoch (and after the
    last step); the weights of the epoch with the highest ``validate()[select]`` (NaN
    counts as worst) are loaded back at the end.

    ``training_state`` (a :class:`recipes.common.run.TrainingState`): the state is saved
    every ``training_state.every`` steps and, with ``--resume``, restored first (model,
    optimizer, scheduler, step, history, best epoch and weights). With ``generator``, the
    one that shuffles ``train_dl``, the resumed run sees the same batches in the same
    order (the generator's state at the start of the epoch under way is saved, and that
    epoch's batches already made are drawn again and skipped); randomness the batches
    draw from torch's global generator while they are skipped (BERT's masks) is drawn
    anew, so such a run is not bit-identical to an uninterrupted one.

    Returns ``(history, best_epoch, steps)``; ``history`` has one dict per epoch
    (epoch, step, train_loss and the validation metrics)."""
    from tqdm.auto import tqdm

    epochs = -(-total_steps // len(train_dl))
    bar = tqdm(total=total_steps, disable=not progress or not accelerator.is_main_process, desc=desc)
    best, best_state, best_epoch, step, history = -math.inf, None, 0, 0, []
    loss = torch.tensor(float("nan"))
    first_epoch, skip = 0, 0
    restored = (training_state.load(model, optimizer, scheduler)
                if training_state is not None else None)
    if restored is not None:
        step, history, first_epoch, skip = (restored[k] for k in ("step", "history", "epoch",
                                                                  "batch"))
        best_state, best_epoch = restored["best_state"], restored["best_epoch"]
        best = restored["best"] if restored["best"] is not None else -math.inf
        if generator is not None:
            generator.set_state(restored["generator"])
        bar.update(step)
    for epoch in range(first_epoch, epochs):
        epoch_start = generator.get_state() if generator is not None else None
        done = 0
        for batch in train_dl:
            if skip:  # resumed: this epoch's batches made before the save
                skip, done = skip - 1, done + 1
                if not skip:  # the global generator as it was at the save
                    torch.set_rng_state(restored["rng_after_skip"])
                continue
            if step >= total_steps:
                break
            done += 1
            loss = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if clip_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), clip_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            bar.update(1)
            if step % log_every == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if training_state is not None and step < total_steps:
                training_state.maybe_save(step, model, optimizer, scheduler, {
                    "history": history, "epoch": epoch, "batch": done,
                    "best_state": best_state, "best_epoch": best_epoch,
                    "best": None if math.isinf(best) else best,
                    "generator": epoch_start, "rng_after_skip": torch.get_rng_state()})
        metrics = validate()
        history.append({"epoch": epoch + 1, "step": step, "train_loss": float(loss.item()), **metrics})
        accelerator.print(f"epoch {epoch + 1}/{epochs}  step {step}  loss {loss.item():.4f}  " +
                          "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        score = metrics[select]
        if best_state is None or (not math.isnan(score) and score > best):
            best, best_epoch = (score if not math.isnan(score) else -math.inf), epoch + 1
            best_state = copy.deepcopy(accelerator.unwrap_model(model).state_dict())
    bar.close()
    accelerator.unwrap_model(model).load_state_dict(best_state)
    return history, best_epoch, step


@torch.no_grad()
def accuracy(model: nn.Module, loader, accelerator,
             logits: Callable[[nn.Module, object], Tensor]) -> float:
    """Share of ``loader``'s examples whose argmax of ``logits(model, batch)`` (``[B, C]``)
    is ``batch["labels"]``, gathered over processes; the model is put back in training mode."""
    model.eval()
    correct = total = 0
    for batch in loader:
        pred = logits(model, batch).argmax(-1)
        pred, labels = accelerator.gather_for_metrics((pred, batch["labels"]))
        correct += int((pred == labels).sum())
        total += labels.numel()
    model.train()
    return correct / max(total, 1)
