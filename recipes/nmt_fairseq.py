"""The NMT recipe through fairseq: the same data, BPE, scales and results.json as
recipes/nmt.py, with the model trained by ``fairseq-train --user-dir fairseq_plugin`` (the
``compemb_transformer`` architectures) and decoded by ``fairseq-generate``.

    python -m recipes.nmt_fairseq --method tt --rank 16 --scale small --threads 1 \\
        --out runs/small/nmt-fairseq/tt-r16

Steps, all in ``--out``: the joint sentencepiece BPE (``spm.model``), the BPE'd text
(``bpe/{train,valid,test}.{en,de}``), ``fairseq-preprocess --joined-dictionary``
(``data-bin/``), ``fairseq-train`` (``checkpoints/``: Adam, inverse-sqrt warm-up,
label-smoothed cross-entropy 0.1, the validation nll selects nothing: the last checkpoint
is decoded), ``fairseq-generate --post-process sentencepiece`` (``gen/generate-test.txt``)
and sacrebleu on the detokenised hypotheses (``results.json``). The fairseq entry points
run in this process (their ``main`` functions, as the console scripts call them).

Architectures: smoke ``compemb_transformer_tiny``; small ``compemb_transformer_base``
with the small scale's widths and depths (recipes/nmt.py SCALES); paper
``compemb_transformer_wmt_en_de_big`` (Transformer-big). ``--output tied`` is
``--share-all-embeddings`` (one table for encoder, decoder and softmax, as in the HF
recipe); ``--output untied`` is ``--softmax untied`` without sharing, which in fairseq
gives the encoder, the decoder and the softmax a table each (three tables, all
compressed), where the HF recipe shares the input table between encoder and decoder.
"""
from __future__ import annotations

import argparse
import logging
import math
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import compemb

from .common.bible_data import Pair
from .common.run import METHOD_FLAGS, add_method_args, add_run_args, apply_run_args, preflight, write_results
from .nmt import (LABEL_SMOOTHING, SCALES, add_data_args, bpe_and_pairs, build_model, corpus_bleu, load_checked_pairs,
                  translation_result)

ARCHS = {"smoke": "compemb_transformer_tiny", "small": "compemb_transformer_base",
         "paper": "compemb_transformer_wmt_en_de_big"}
# compemb spec option -> fairseq_plugin flag (fairseq_plugin/flags.py)
FAIRSEQ_FLAGS = {"rank": "--emb-rank", "num_factors": "--emb-num-factors", "num_codes": "--emb-codes",
                 "num_groups": "--emb-groups", "variant": "--emb-variant",
                 "shared_subspace": "--emb-shared-subspace", "temperature": "--emb-temperature",
                 "commitment": "--emb-commitment", "distance_norm": "--emb-no-distance-norm"}
LANGS = ("en", "de")


def fairseq_method_flags(spec: compemb.EmbeddingSpec) -> List[str]:
    """``--emb-method`` and the ``--emb-*`` flags of the settings given in ``spec``.
    ``ValueError`` for a setting the fairseq plugin has no flag for."""
    flags = ["--emb-method", spec.method]
    for option, value in spec.options.items():
        if value is None:
            continue
        if option not in FAIRSEQ_FLAGS:
            cli = {v: k for k, v in METHOD_FLAGS.items()}.get(option, option)
            raise ValueError(f"{cli} has no fairseq_plugin flag (it takes "
                             f"{', '.join(sorted(FAIRSEQ_FLAGS.values()))}); use recipes/nmt.py "
                             f"for it, or drop it")
        if option == "distance_norm":  # on by default; the flag turns it off
            if value is False:
                flags.append(FAIRSEQ_FLAGS[option])
        elif value is True:
            flags.append(FAIRSEQ_FLAGS[option])
        elif value is not False:
            flags += [FAIRSEQ_FLAGS[option], str(value)]
    return flags


def model_flags(scale_name: str, scale: Dict) -> List[str]:
    """``--arch`` and, at small scale, the widths and depths of the scale."""
    flags = ["--arch", ARCHS.get(scale_name, "compemb_transformer_base")]
    if scale_name == "small":
        for side in ("encoder", "decoder"):
            flags += [f"--{side}-embed-dim", str(scale["d_model"]), f"--{side}-ffn-embed-dim",
                      str(scale["ffn"]), f"--{side}-layers", str(scale["layers"]),
                      f"--{side}-attention-heads", str(scale["heads"])]
    return flags


def write_bpe_text(sp, data: Dict[str, List[Pair]], folder: Path, max_len: int) -> None:
    """``folder/{split}.{en,de}``: BPE pieces separated by spaces, at most ``max_len - 1``
    pieces a line (fairseq appends the end of sentence)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, pairs in data.items():
        for side, lang in enumerate(LANGS):
            pieces = sp.encode([p[side] for p in pairs], out_type=str)
            (folder / f"{split}.{lang}").write_text(
                "".join(" ".join(p[: max_len - 1]) + "\n" for p in pieces), encoding="utf-8")


def read_hypotheses(path: Path, count: int) -> List[str]:
    """The detokenised hypotheses (``D-<id>`` lines) of fairseq-generate, in input order."""
    found = dict((int(i), text) for i, text in
                 re.findall(r"^D-(\d+)\t[^\t]*\t(.*)$", path.read_text(encoding="utf-8"), flags=re.M))
    return [found.get(i, "") for i in range(count)]


def run_fairseq(spec: compemb.EmbeddingSpec, scale: Dict, data: Dict[str, List[Pair]], out: Path, *,
                output: str = "tied", dataset: str = "custom", scale_name: str = "custom",
                max_steps: Optional[int] = None, seed: int = 0, threads: Optional[int] = None) -> Dict:
    """BPE, preprocess, train, generate, BLEU (see the module docstring). Returns the
    results dict, the loaded model under ``"model"``."""
    import torch
    from fairseq import checkpoint_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import generate, preprocess, train

    out = Path(out)
    plugin = str(Path(__file__).resolve().parents[1] / "fairseq_plugin")
    start = time.time()
    sp, data = bpe_and_pairs(data, scale, out)
    write_bpe_text(sp, data, out / "bpe", scale["max_len"])
    bin_dir = out / "data-bin"
    preprocess.main(options.get_preprocessing_parser().parse_args([
        "--source-lang", "en", "--target-lang", "de", "--joined-dictionary",
        "--trainpref", str(out / "bpe" / "train"), "--validpref", str(out / "bpe" / "valid"),
        "--testpref", str(out / "bpe" / "test"), "--destdir", str(bin_dir), "--workers", "1"]))
    steps = max_steps or scale["steps"]
    length = ["--max-epoch", str(scale["epochs"])] if scale.get("epochs") and not max_steps else \
        ["--max-update", str(steps)]
    share = ["--share-all-embeddings"] if output == "tied" else ["--softmax", "untied"]
    save_dir = out / "checkpoints"
    train_argv = [
        str(bin_dir), "--user-dir", plugin, "--task", "translation", "--source-lang", "en",
        "--target-lang", "de", *model_flags(scale_name, scale), *share, *fairseq_method_flags(spec),
        "--dropout", str(scale["dropout"]), "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
        "--adam-eps", "1e-9", "--lr", str(scale["lr"]), "--lr-scheduler", "inverse_sqrt",
        "--warmup-updates", str(scale["warmup"]), "--warmup-init-lr", "1e-7", "--clip-norm", "1.0",
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", str(LABEL_SMOOTHING),
        "--batch-size", str(scale["batch"]), *length, "--seed", str(seed),
        "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--best-checkpoint-metric", "nll_loss",
        "--required-batch-size-multiple", "1", "--num-workers", "0", "--log-format", "simple",
        "--log-interval", "100", "--no-progress-bar", "--skip-invalid-size-inputs-valid-test"]
    if not torch.cuda.is_available():
        train_argv.append("--cpu")
    train.main(convert_namespace_to_omegaconf(
        options.parse_args_and_arch(options.get_training_parser(), train_argv)))
    if threads is not None:  # fairseq's setup may change the thread count
        torch.set_num_threads(threads)
    last = save_dir / "checkpoint_last.pt"
    state = torch.load(last, map_location="cpu")
    updates = state["optimizer_history"][-1]["num_updates"]
    valid_nll = float(state["extra_state"]["val_loss"]) * math.log(2)  # bits -> nats per token
    train_time = time.time() - start
    gen_argv = [str(bin_dir), "--user-dir", plugin, "--path", str(last), "--task", "translation",
                "--source-lang", "en", "--target-lang", "de", "--gen-subset", "test",
                "--beam", str(scale["beam"]), "--batch-size", "64", "--max-len-a", "1.5",
                "--max-len-b", "10", "--post-process", "sentencepiece", "--results-path",
                str(out / "gen"), "--required-batch-size-multiple", "1", "--log-format", "simple"]
    if not torch.cuda.is_available():
        gen_argv.append("--cpu")
    generate.main(convert_namespace_to_omegaconf(
        options.parse_args_and_arch(options.get_generation_parser(), gen_argv)))
    hypotheses = read_hypotheses(out / "gen" / "generate-test.txt", len(data["test"]))
    bleu = corpus_bleu(hypotheses, [t for _, t in data["test"]])
    wall = time.time() - start
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(last)],
                                                                 arg_overrides={"data": str(bin_dir)})
    model = models[0]
    report = compemb.compression_report(model)
    vocab_size = len(model.encoder.dictionary)
    dim = model.encoder.embed_tokens.embedding_dim if hasattr(model.encoder.embed_tokens, "embedding_dim") \
        else scale["d_model"]
    result = translation_result(
        "nmt-fairseq", dataset, scale_name, spec, model, report, bleu, wall, output=output,
        valid_loss=valid_nll, train_time_s=train_time, steps=updates, vocab_size=vocab_size,
        embedding_dim=dim, tables=1 if output == "tied" else 3, scale=scale, data=data,
        hypotheses=hypotheses, checkpoint=str(last.relative_to(out)),
        checkpoint_bytes=last.stat().st_size, fairseq_train_args=train_argv[1:])
    result["model"] = model
    return result


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_method_args(parser)
    add_run_args(parser, SCALES)
    parser.add_argument("--output", default="tied", choices=["tied", "untied"],
                        help="tied: --share-all-embeddings; untied: --softmax untied (see above)")
    add_data_args(parser)
    args = parser.parse_args(argv)
    scale = apply_run_args(args, SCALES)
    dataset = "custom" if args.data_dir else (args.dataset or scale["dataset"])
    try:
        import fairseq  # noqa: F401
    except ImportError:
        parser.error("fairseq is not installed: run scripts/install_fairseq.sh (see fairseq_plugin/README.md)")

    def prepare(spec):
        fairseq_method_flags(spec)  # a setting fairseq has no flag for fails here
        data = load_checked_pairs(dataset, args.data_dir, args.seed)
        # the probe (the HF model of the same size) sizes the free-space check
        return build_model(spec, scale["vocab"], scale, args.output), data

    checked = preflight(parser, args, scale["vocab"], scale["d_model"], prepare)
    if checked is None:
        return
    spec, data = checked
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(name)s | %(message)s")
    result = run_fairseq(spec, scale, data, args.out, output=args.output, dataset=dataset,
                         scale_name=args.scale, max_steps=args.max_steps, seed=args.seed,
                         threads=args.threads)
    model = result.pop("model")
    print(compemb.compression_report(model))
    print(f"test BLEU {result['value']:.2f} (valid nll {result['valid_loss']:.4f}, "
          f"{result['steps']} updates, embedding {result['embedding_ratio']:.1f}x), "
          f"{result['wall_time_s']:.0f}s")
    write_results(args.out, result)


if __name__ == "__main__":
    main(sys.argv[1:])
