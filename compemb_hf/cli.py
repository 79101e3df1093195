"""The ``compemb`` command line.

    compemb compress MODEL_DIR --method tt --rank 16 [--output tied|untied|dense] --out DIR
    compemb compress MODEL_DIR --method dpq --num-codes 32 --num-groups 32 [--export] --out DIR
    compemb report MODEL_DIR [--json]
    compemb plan --vocab 30522 --dim 384 --method tt --ratio 50
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import List, Optional

__all__ = ["main"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx")


def _load(model_dir: str):
    """The model in ``model_dir`` with the class its config.json names (else AutoModel)."""
    import transformers

    import compemb_hf  # noqa: F401  (registers the compressed checkpoint format)

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"{model_dir} has no config.json: give a folder written by "
                         f"save_pretrained")
    with open(os.path.join(model_dir, "config.json")) as f:
        architectures = json.load(f).get("architectures") or []
    cls = next((getattr(transformers, a) for a in architectures if hasattr(transformers, a)),
               transformers.AutoModel)
    return cls.from_pretrained(model_dir)


def _ints(text: Optional[str]):
    if text is None:
        return None
    parts = [int(p) for p in text.split(",")]
    return parts[0] if len(parts) == 1 else parts


def _config_from_args(args: argparse.Namespace):
    from .config import CompressedEmbeddingConfig

    options = dict(rank=_ints(args.rank), num_factors=args.num_factors,
                   num_codes=args.num_codes, num_groups=args.num_groups, variant=args.variant)
    if args.shape:
        options["shape"] = json.loads(args.shape)
    if args.shared_subspace:
        options["shared_subspace"] = True
    return CompressedEmbeddingConfig(
        args.method, **{k: v for k, v in options.items() if v is not None},
        modules=args.modules.split(",") if args.modules else None, output=args.output,
        init=args.init)


def cmd_compress(args: argparse.Namespace) -> int:
    import compemb

    from .surgery import compress, export_codebooks

    config = _config_from_args(args)  # checks the settings before the model is read
    if os.path.abspath(args.out) == os.path.abspath(args.model_dir):
        raise ValueError("--out must be another folder than MODEL_DIR")
    model = _load(args.model_dir)
    compress(model, config, progress=not args.quiet)
    if args.export:
        export_codebooks(model)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    for name in os.listdir(args.model_dir):  # tokenizer and other side files
        src = os.path.join(args.model_dir, name)
        if (os.path.isfile(src) and not name.endswith(_WEIGHT_SUFFIXES)
                and not os.path.exists(os.path.join(args.out, name))):
            shutil.copy2(src, os.path.join(args.out, name))
    if not args.quiet:
        print(compemb.compression_report(model))
        print(f"saved to {args.out}")
    return 0


def _disk_bytes(model_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(model_dir, n)) for n in os.listdir(model_dir)
               if n.endswith(".safetensors"))


def cmd_report(args: argparse.Namespace) -> int:
    import compemb

    model = _load(args.model_dir)
    report = compemb.compression_report(model)
    if args.json:
        data = report.to_dict()
        data["totals"]["weights_bytes_on_disk"] = _disk_bytes(args.model_dir)
        print(json.dumps(data, indent=2))
    else:
        print(report)
        print(f"weights on disk:   {_disk_bytes(args.model_dir):,} bytes")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import torch

    import compemb
    from compemb.plan import plan

    spec = plan(args.vocab, args.dim, args.method, args.ratio)
    with torch.device("meta"):
        storage = compemb.build_embedding(spec, args.vocab, args.dim).storage()
    if args.json:
        print(json.dumps({"spec": spec.to_dict(), "ratio": storage.ratio,
                          "stored_bytes": storage.stored_bytes,
                          "dense_bytes": storage.dense_bytes}))
    else:
        options = " ".join(f"{k}={v}" for k, v in spec.to_dict().items() if k != "method")
        print(f"{args.method} for {args.vocab} x {args.dim}: {options}")
        print(f"  {storage.shape}: {storage.stored_bytes:,} bytes stored vs "
              f"{storage.dense_bytes:,} dense, ratio {storage.ratio:.1f}x")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compemb", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="compress a saved transformers model")
    c.add_argument("model_dir")
    c.add_argument("--out", required=True, help="folder for the compressed checkpoint")
    c.add_argument("--method", required=True, help="tt, tr or dpq")
    c.add_argument("--rank", help="TT/TR rank, or comma-separated ranks")
    c.add_argument("--shape", help='TT/TR shape as JSON, e.g. "[[30,32,32],[4,8,12]]"')
    c.add_argument("--num-factors", type=int)
    c.add_argument("--num-codes", type=int)
    c.add_argument("--num-groups", type=int)
    c.add_argument("--variant", choices=["sx", "vq"])
    c.add_argument("--shared-subspace", action="store_true")
    c.add_argument("--modules", help="comma-separated embedding module names "
                                     "(default: the input embedding)")
    c.add_argument("--output", choices=["tied", "untied", "dense"])
    c.add_argument("--init", choices=["pretrained", "random"])
    c.add_argument("--export", action="store_true",
                   help="DPQ: store the codebook form (packed codes and values)")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_compress)
    r = sub.add_parser("report", help="what a model's compressed layers store")
    r.add_argument("model_dir")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_report)
    p = sub.add_parser("plan", help="settings that reach a compression ratio")
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--dim", type=int, required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--ratio", type=float, required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"compemb {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
