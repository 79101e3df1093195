"""Write the inference form of a DPQ checkpoint: ``python -m fairseq_plugin.export IN OUT``.

A model trained with ``--emb-method dpq`` keeps, besides its codebooks, the ``V x d``
query table that training (and resuming) needs. The exported checkpoint replaces every
:class:`compemb.dpq.DPQEmbedding` by its :class:`compemb.dpq.CodebookEmbedding` (codes
packed at ``ceil(log2(K))`` bits, plus the values): the model's tensors are then exactly
what ``compemb.compression_report`` counts, and ``fairseq-generate``, ``fairseq-eval-lm``,
``fairseq-validate`` and ``fairseq-interactive`` give the same results as with the
training checkpoint (the codebook form equals the DPQ layer's eval forward). The
optimizer state is left out: the exported checkpoint is for inference. TT and TR
checkpoints need no export (they hold only their cores).
"""
import argparse
import os
import sys
from typing import Dict, Optional

import torch
from torch import nn

from . import allow_fairseq_checkpoints
from .safe_load import read_checkpoint

__all__ = ["export_checkpoint", "state_tensor_bytes"]


def export_checkpoint(src: str, dst: str, data: Optional[str] = None) -> Dict[str, int]:
    """Read the fairseq checkpoint ``src`` (trained with ``--emb-method dpq``) and write its
    inference form to ``dst``. ``data``: the binarised data folder (for its dictionaries)
    when it is no longer where training read it. Returns
    ``{"tables": n, "bytes_before": .., "bytes_after": ..}``
    (bytes of the model's tensors). ``ValueError`` for a checkpoint without DPQ tables;
    ``dst`` is only written once the export succeeded."""
    from compemb.dpq import DPQEmbedding
    from fairseq import checkpoint_utils

    allow_fairseq_checkpoints()
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("OUT must differ from IN: the training checkpoint is kept for resuming")
    state = read_checkpoint(src)  # safe (weights_only) loading; ValueError if damaged
    model_args = (state.get("cfg") or {}).get("model")
    if isinstance(model_args, dict):  # dataclass-configured models store a plain dict
        model_args = argparse.Namespace(**model_args)
    if getattr(model_args, "emb_method", None) is None:
        raise ValueError(f"{src} was not trained with the fairseq_plugin models "
                         f"(no --emb-method in its model config)")
    if getattr(model_args, "emb_codebook", False):
        raise ValueError(f"{src} is already exported (--emb-codebook)")
    if model_args.emb_method != "dpq":
        raise ValueError(f"{src} was trained with --emb-method {model_args.emb_method}; only "
                         f"--emb-method dpq checkpoints have a separate inference form (TT/TR "
                         f"checkpoints hold only their cores already)")
    models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task(
        [src], arg_overrides={"data": data} if data else None)
    model = models[0].eval()
    before = state_tensor_bytes(model.state_dict())
    exported: Dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, DPQEmbedding):
            if id(module) not in exported:
                exported[id(module)] = module.export()
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, exported[id(module)])
    new_model_state = model.state_dict()
    new_model_state["_extra_state"] = {
        "compemb": dict(new_model_state["_extra_state"]["compemb"], **{"--emb-codebook": True})}
    # keep the record's key order as compression_record writes it (--softmax last)
    record = new_model_state["_extra_state"]["compemb"]
    record["--softmax"] = record.pop("--softmax")
    if isinstance(state["cfg"]["model"], dict):
        state["cfg"]["model"]["emb_codebook"] = True
    else:
        state["cfg"]["model"].emb_codebook = True
    state["model"] = new_model_state
    state.pop("last_optimizer_state", None)
    tmp = dst + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, dst)
    return {"tables": len(exported), "bytes_before": before,
            "bytes_after": state_tensor_bytes(new_model_state)}


def state_tensor_bytes(state: Dict[str, object]) -> int:
    """Bytes of the distinct tensors of a state dict (tied ones once)."""
    seen, total = set(), 0
    for value in state.values():
        if torch.is_tensor(value):
            key = (value.untyped_storage().data_ptr(), value.storage_offset(), value.nbytes)
            if key not in seen:
                seen.add(key)
                total += value.nbytes
    return total


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fairseq_plugin.export",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="checkpoint trained with --emb-method dpq")
    parser.add_argument("dst", help="where to write the inference checkpoint")
    parser.add_argument("--data", help="the binarised data folder (for its dictionaries), "
                                       "if it moved since training")
    args = parser.parse_args(argv)
    try:
        info = export_checkpoint(args.src, args.dst, args.data)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {info['tables']} DPQ table(s): model tensors {info['bytes_before']:,} -> "
          f"{info['bytes_after']:,} bytes; wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
