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
        progress: bool = True, desc: str = "", log_every: int = 50) -> Tuple[List[Dict], int, int]:
    """Train ``model`` (already prepared) for ``total_steps`` optimizer steps of
    ``loss_fn(model, batch)``, calling ``validate()`` after every epoch (and after the
    last step); the weights of the epoch with the highest ``validate()[select]`` (NaN
    counts as worst) are loaded back at the end.

    Returns ``(history, best_epoch, steps)``; ``history`` has one dict per epoch
    (epoch, step, train_loss and the validation metrics)."""
    from tqdm.auto import tqdm

    epochs = -(-total_steps // len(train_dl))
    bar = tqdm(total=total_steps, disable=not progress or not accelerator.is_main_process, desc=desc)
    best, best_state, best_epoch, step, history = -math.inf, None, 0, 0, []
    loss = torch.tensor(float("nan"))
    for epoch in range(epochs):
        for batch in train_dl:
            if step >= total_steps:
                break
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
