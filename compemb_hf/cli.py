"""The ``compemb`` command line.

    compemb compress MODEL_DIR --method dpq|tt --ratio R [--calibration-text FILE_OR_DIR ...]
                     [--calibration-minutes M] [--sample-tokens N] [--sample-start random|bos]
                     [--sample-openers]
                     --out DIR
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


def _check_out(out: str, model_dir: str) -> str:
    out = os.path.abspath(out)
    if out == os.path.abspath(model_dir):
        raise ValueError("--out must be another folder than MODEL_DIR")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"--out {out} already exists and is not an empty folder; choose a new "
                         f"folder (the result is written elsewhere first and renamed into place)")
    return out


def _save(model, model_dir: str, out: str) -> None:
    """Write the checkpoint and the side files into a sibling temporary folder, then rename
    it to ``out``: an interrupted run leaves no half-written ``out``."""
    import tempfile

    parent = os.path.dirname(out) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".part-", dir=parent)
    try:
        model.save_pretrained(tmp)
        for name in os.listdir(model_dir):  # tokenizer and other side files
            src = os.path.join(model_dir, name)
            if (os.path.isfile(src) and not name.endswith(_WEIGHT_SUFFIXES)
                    and not os.path.exists(os.path.join(tmp, name))):
                shutil.copy2(src, os.path.join(tmp, name))
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked before any work)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_HEAD_CLASSES = ("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForConditionalGeneration")


def _transform_rank(value: str) -> Optional[int]:
    """``--transform-rank``: an int >= 0, or ``full`` (``None``: the whole matrix)."""
    if value == "full":
        return None
    try:
        rank = int(value)
    except ValueError:
        rank = -1
    if rank < 0:
        raise ValueError(f"--transform-rank must be an int >= 0 or 'full', got {value!r}")
    return rank


def _dense_table_shape(model_dir: str):
    """``(vocab, hidden, bytes per value, has an LM head)`` from config.json, or None where
    it does not say."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    head = any(a.endswith(_HEAD_CLASSES) for a in cfg.get("architectures") or [])
    cfg = cfg.get("text_config", cfg)
    v, d = cfg.get("vocab_size"), cfg.get("hidden_size", cfg.get("d_model"))
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    size = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}.get(str(dtype), 4)
    return (v, d, size, head) if isinstance(v, int) and isinstance(d, int) else None


def cmd_compress_ratio(args: argparse.Namespace) -> int:
    """``--ratio``: post-training compression fitted to the model (compress_pretrained)."""
    import compemb
    from compemb.fit import (default_residual_share, default_row_order, default_row_scale,
                             plan_fit)

    from .calibration import SAMPLE_OPENERS, can_sample, read_sources, sources_from_texts
    from .pretrained import compress_pretrained

    if args.method not in ("dpq", "tt", "tr"):
        raise ValueError(f"--ratio needs --method dpq, tt or tr, got {args.method!r}")
    explicit = [f for f in ("rank", "shape", "num_factors", "num_codes", "num_groups", "variant")
                if getattr(args, f) is not None]
    if explicit or args.export or args.init or args.modules:
        raise ValueError(f"--ratio chooses the settings itself; drop "
                         f"{['--' + f.replace('_', '-') for f in explicit] or '--export/--init/--modules'}")
    if args.calibration_minutes is not None and not args.calibration_minutes > 0:
        raise ValueError(f"--calibration-minutes must be > 0, got {args.calibration_minutes}")
    if args.head_steps is not None and args.head_steps < 0:
        raise ValueError(f"--head-steps must be >= 0 (0: no head fit), got {args.head_steps}")
    transform_rank = _transform_rank(args.transform_rank)
    out = _check_out(args.out, args.model_dir)
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        raise ValueError(f"{args.model_dir} has no config.json: give a folder written by "
                         f"save_pretrained")
    # every check that needs no model, before any work starts
    texts = read_sources(args.calibration_text) if args.calibration_text else None
    row_scale = (default_row_scale(not args.calibration_text, args.method)
                 if args.row_scale is None else args.row_scale)
    residual_share = (default_residual_share(args.method, not args.calibration_text)
                      if args.residual_share is None else args.residual_share)
    row_order = default_row_order(args.method) if args.row_order is None else args.row_order
    shape = _dense_table_shape(args.model_dir)
    if shape is not None:  # the planner's budget as compress_pretrained will count it
        plan_fit(shape[0], shape[1], args.method, args.ratio, element_size=shape[2],
                 transform=shape[3], logit_bias=shape[3], row_order=row_order,
                 transform_rank=transform_rank, exact_share=args.exact_share,
                 residual_share=residual_share,
                 row_scale=shape[3] and row_scale)
    sources = tokenizer = None
    if texts is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        sources = sources_from_texts(tokenizer, texts)  # too short for a window: refused now
    else:  # sampling: special tokens are not drawn as starts, the openers are tokenized
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        except (OSError, ValueError):  # a folder without tokenizer files
            tokenizer = None
    if args.sample_openers and tokenizer is None:
        raise ValueError(f"--sample-openers needs a tokenizer in {args.model_dir} (save it "
                         f"there with tokenizer.save_pretrained), or leave the flag out")
    model = _load(args.model_dir)
    if texts is None and not can_sample(model):
        raise ValueError(f"{type(model).__name__} cannot generate text to calibrate on: give "
                         f"--calibration-text FILE (or a folder of .txt files)")
    result = compress_pretrained(
        model, args.method, args.ratio, sources=sources, tokenizer=tokenizer,
        random_start=args.sample_start == "random",
        openers=SAMPLE_OPENERS if args.sample_openers else (),
        sample=args.sample_tokens if can_sample(model) else 0,
        calibration_minutes=args.calibration_minutes, seed=args.seed,
        progress=not args.quiet, row_order=row_order,
        head_steps=args.head_steps, transform_rank=transform_rank,
        exact_share=args.exact_share, residual_share=residual_share,
        token_prior=args.token_prior, row_scale=row_scale)
    if not args.quiet:
        print(f"planner: {result.plan.describe()}")
        print("calibration text: " + ", ".join(f"{k} ({v:,} tokens)" for k, v in result.sources.items()))
        print(f"token weights: {args.token_prior} prior, {result.prior:g} of the weight")
        if result.head_fit is not None:
            f = result.head_fit
            print(f"head fit: {f.steps} steps, held-out KL {f.heldout_before:.4f} -> "
                  f"{f.heldout_after:.4f}")
        if result.calibration is not None:
            c = result.calibration
            print(f"calibration: {c.steps} steps, held-out loss {c.heldout_before:.4f} -> "
                  f"{c.heldout_after:.4f}")
        print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result.seconds.items()))
    _save(model, args.model_dir, out)
    if not args.quiet:
        print(compemb.compression_report(model))
        print(f"saved to {out}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    import compemb

    from .surgery import compress, export_codebooks

    if args.ratio is not None:
        return cmd_compress_ratio(args)
    if args.calibration_text or args.calibration_minutes is not None:
        raise ValueError("--calibration-text and --calibration-minutes go with --ratio")
    config = _config_from_args(args)  # checks the settings before the model is read
    out = _check_out(args.out, args.model_dir)
    model = _load(args.model_dir)
    compress(model, config, progress=not args.quiet)
    if args.export:
        export_codebooks(model)
    _save(model, args.model_dir, out)
    if not args.quiet:
        print(compemb.compression_report(model))
        print(f"saved to {out}")
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
    from compemb.fit import DEFAULT_TRANSFORM_RANK

    from .pretrained import TOKEN_PRIORS

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
    c.add_argument("--ratio", type=float,
                   help="post-training compression to this ratio over the vocabulary tables "
                        "(embedding plus head), settings chosen by the planner and fitted to "
                        "the model")
    c.add_argument("--calibration-text", action="append", metavar="FILE_OR_DIR",
                   help="calibration text (a .txt file or a folder of them; repeat for "
                        "several sources, each weighing the same); blended with text "
                        "sampled from a causal LM")
    c.add_argument("--calibration-minutes", type=float,
                   help="budget for sampling, statistics and the distillation (default: "
                        "no distillation, only the data-aware fit)")
    c.add_argument("--sample-tokens", type=int, default=None,
                   help="tokens sampled from the model itself (causal LMs; default 8192)")
    c.add_argument("--sample-start", choices=["random", "bos"], default="random",
                   help="each sampled window starts from a random token (default: text of "
                        "many kinds) or from BOS (the model's favourite genre)")
    c.add_argument("--sample-openers", action="store_true",
                   help="half the sampled windows begin with an opener (code, markup, formal "
                        "prose, ...: compemb_hf.calibration.SAMPLE_OPENERS)")
    c.add_argument("--head-steps", type=int, default=None,
                   help="steps of the head fit, which tunes the compressed tables to the "
                        "dense head's softmax on the calibration text's head inputs "
                        "(default 200; 0: none)")
    c.add_argument("--exact-share", type=float, default=None,
                   help="share of the bytes reserved for rows kept exactly (default: none)")
    c.add_argument("--residual-share", type=float, default=None,
                   help="share of the bytes for residual rows: the rows that cost most get "
                        "the base's residual at 2-8 bits per dimension (default: 0.05 for "
                        "dpq, 0.2 without --calibration-text; 0.93 for tt/tr)")
    c.add_argument("--token-prior", choices=TOKEN_PRIORS, default=TOKEN_PRIORS[0],
                   help="what the calibration text's token counts are blended with, so that "
                        "tokens it lacks keep a usable row: 'rank' (default) assumes lower "
                        "token ids are more frequent, as tokenizers number their tokens; "
                        "'uniform' gives every token the same floor")
    c.add_argument("--row-scale", action=argparse.BooleanOptionalAction, default=None,
                   help="a per-token row factor at 8 bits in the head's table, against the "
                        "quantised rows' shrinkage (default: on for dpq without "
                        "--calibration-text, off with it, where the head fit tunes the rows "
                        "to that text, and off for tt/tr)")
    c.add_argument("--row-order", action=argparse.BooleanOptionalAction, default=None,
                   help="TT/TR: reorder rows so that similar ones share index prefixes (a "
                        "stored permutation, 4 bytes a row; default: on for tt/tr, where it "
                        "lowers the fit's error by about 40%%)")
    c.add_argument("--transform-rank", default=str(DEFAULT_TRANSFORM_RANK),
                   help="each table's d x d transform is stored as a Kronecker product plus "
                        f"this rank (default {DEFAULT_TRANSFORM_RANK}); 'full': the whole "
                        "matrix")
    c.add_argument("--seed", type=int, default=0)
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
