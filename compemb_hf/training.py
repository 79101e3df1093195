"""Training support: auxiliary losses of compressed layers (DPQ-VQ's codebook loss) added
to the model's loss with no change to the training loop."""
from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["install_aux_loss_hook", "auxiliary_loss"]


def auxiliary_loss(model: nn.Module):
    """Sum of the auxiliary losses the compressed layers produced in the last forward
    (``None`` when there are none)."""
    from .surgery import compressed_layers

    total = None
    for layer in compressed_layers(model).values():
        fn = getattr(layer, "auxiliary_loss", None)
        loss = fn() if callable(fn) else None
        if loss is not None:
            total = loss if total is None else total + loss
    return total


def _add_aux_loss(module: nn.Module, args: Any, output: Any) -> Any:
    if not module.training:
        return output
    loss = getattr(output, "loss", None) if not isinstance(output, dict) else output.get("loss")
    if loss is None:
        return output
    aux = auxiliary_loss(module)
    if aux is None:
        return output
    output["loss"] = loss + aux.to(loss.dtype)
    return output


def install_aux_loss_hook(model: nn.Module) -> None:
    if getattr(model, "_compemb_aux_hook", None) is None:
        model._compemb_aux_hook = model.register_forward_hook(_add_aux_loss)
