"""Decode speed: greedy ``model.generate`` of compressed causal LMs against the dense model.

    python -m bench.decode [--models smollm,minilm] [--batches 1,8] [--new-tokens 32]

Models are built from a config with random weights (decode speed does not depend on the
trained values): ``smollm`` is SmolLM-135M's shape (Llama, hidden 576, 30 layers, 9 heads,
3 kv heads, intermediate 1536, vocabulary 49152, tied head), ``minilm`` a decoder of
all-MiniLM-L6-v2's size (hidden 384, 6 layers, 12 heads, intermediate 1536, vocabulary
30522, tied head; MiniLM itself is an encoder, which does not generate). Each is compressed
with ``compemb_hf.compress`` (input table and tied head):

* ``dpq``: the DPQ inference form, K=256 codes, 144 groups (smollm; 96 for minilm, 4
  dims per group), ``form="codebook"``;
* ``tt``: Tensor-Train rank 64;
* ``dpq-10x`` / ``tt-10x``: what ``compemb compress MODEL --method dpq|tt --ratio 10`` makes,
  in the form a user loads: ``compemb_hf.compress_pretrained`` with its defaults for a
  model given no text (DPQ: the planner's codes, 128 in groups of 3 dimensions at SmolLM's
  size since residual rows took 0.2 of the bytes, plus residual rows, a
  Kronecker-plus-low-rank transform, a logit bias and a row scale; TT: a small-rank TT,
  the planner's choice, plus residual rows, with the stored row order, fitted in a
  rotated space), fitted to 16 windows of random tokens with no
  head fit (the structure, not the fit, sets the speed), saved with ``save_pretrained``
  and loaded back with ``AutoModelForCausalLM.from_pretrained`` after ``import compemb_hf``.

Speed: all models of one size are in memory together and every repeat runs each of them
once in turn (interleaved, so that they see the same machine load); the table gives the
median tokens/s (batch x new tokens / wall time of ``generate``, prompt of 16 tokens,
exactly ``--new-tokens`` new tokens, KV cache on) and its ratio to dense, and the same per
second of the process's CPU time (all its threads), which moves less with the load that
other jobs put on a shared machine. Memory: each
model is built again in a fresh process, whose peak RSS is reset (``/proc/self/clear_refs``)
after the build and read after one ``generate``: the peak resident memory while generating,
weights included. ``--logits`` adds the head alone: logits of one and eight hidden states
(and 1024 for TT) at V=32768, d=512 against the dense GEMV/GEMM.

The header prints the load average: on a shared machine compare ratios, not absolute times.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/lookup.py

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Callable, Dict, List  # noqa: E402

import torch  # noqa: E402

MODELS = {
    "smollm": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                   max_position_embeddings=2048, tie_word_embeddings=True),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                   num_key_value_heads=12, intermediate_size=1536, vocab_size=30522,
                   max_position_embeddings=512, tie_word_embeddings=True),
}
METHODS = ("dense", "dpq", "tt")
FITTED = ("dpq-10x", "tt-10x")
PROMPT = 16


def build(model_name: str, method: str, seed: int = 0):
    """The model of ``model_name`` with random weights, compressed by ``method``, in eval."""
    import transformers as tf

    import compemb_hf
    from compemb_hf import CompressedEmbeddingConfig as Cfg

    def make_model():
        torch.manual_seed(seed)
        config = tf.LlamaConfig(**MODELS[model_name], bos_token_id=1, eos_token_id=2,
                                pad_token_id=0)
        return tf.LlamaForCausalLM(config).eval()

    if method in FITTED:  # loaded from its folder, the dense model never built here
        return _compressed_pretrained(model_name, make_model, method.split("-")[0], seed).eval()
    model = make_model()
    config = model.config
    hidden = config.hidden_size
    if method == "dpq":
        groups = hidden // 4
        compemb_hf.compress(model, Cfg("dpq", num_codes=256, num_groups=groups,
                                       form="codebook", init="random"))
    elif method == "tt":
        compemb_hf.compress(model, Cfg("tt", rank=64, init="random"))
    elif method != "dense":
        raise ValueError(f"method must be one of {METHODS + FITTED}, got {method!r}")
    return model.eval()


#: where the ``dpq-10x`` / ``tt-10x`` models are saved: a folder that :func:`main` makes for
#: the run and hands to its peak-RSS processes (so each fit is made once per run, with the
#: code of the run); a process that calls :func:`build` by itself makes its own
FITTED_DIR_ENV = "COMPEMB_BENCH_DECODE_DIR"


def _fitted_folder(model_name: str, method: str, seed: int) -> str:
    import tempfile

    root = os.environ.get(FITTED_DIR_ENV)
    if not root:
        root = os.environ[FITTED_DIR_ENV] = tempfile.mkdtemp(prefix="compemb-bench-decode-")
    return os.path.join(root, f"{model_name}-{method}-10x-seed{seed}")


def _compressed_pretrained(model_name: str, make_model: Callable, method: str, seed: int):
    """The model ``make_model()`` builds, through ``compress_pretrained`` (ratio 10, the
    defaults for a model given no text, no head fit), saved, and loaded back as a user
    would: from the folder, with ``AutoModelForCausalLM.from_pretrained``. The folder
    (:func:`_fitted_folder`) is made once and reused, so that the peak-RSS process only
    loads it, as a user's process would, and carries nothing of the fit."""
    import shutil
    import tempfile

    import transformers as tf

    import compemb_hf  # noqa: F401 - registers the loading of compressed checkpoints
    from compemb_hf.calibration import CalibrationSource

    folder = _fitted_folder(model_name, method, seed)
    if not os.path.isdir(folder):
        model = make_model()
        g = torch.Generator().manual_seed(seed)
        windows = torch.randint(3, model.config.vocab_size, (16, 128), generator=g)
        compemb_hf.compress_pretrained(model, method, 10.0, sample=0, head_steps=0, seed=seed,
                                       sources=[CalibrationSource("sampled", windows,
                                                                  sampled=True)],
                                       progress=False)
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(folder))
        try:
            model.save_pretrained(tmp)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return tf.AutoModelForCausalLM.from_pretrained(folder)


def generate(model, batch: int, new_tokens: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (batch, PROMPT), generator=g)
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=0)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(model_name: str, method: str, batch: int, new_tokens: int) -> Dict:
    """Run in a fresh process: build, reset the peak RSS, generate once; bytes."""
    import gc

    model = build(model_name, method)
    generate(model, batch, 2)  # first-use work (kernel load, caches) belongs to the model
    gc.collect()
    try:  # hand freed heap pages (the dense table the surgery replaced) back to the OS
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    generate(model, batch, new_tokens)
    return {"rss_before": before, "peak": _status("VmHWM")}


def measure_memory(model_name: str, method: str, batch: int, new_tokens: int) -> Dict:
    code = (f"import json, bench.decode as d; print(json.dumps(d.memory_child("
            f"{model_name!r}, {method!r}, {batch}, {new_tokens})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__)) or ".")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table_bytes(model) -> int:
    emb = model.get_input_embeddings()
    return sum(t.numel() * t.element_size() for t in list(emb.parameters()) + list(emb.buffers()))


def run_speed(model_name: str, methods: List[str], batches: List[int], new_tokens: int,
              repeats: int) -> Dict:
    models = {m: build(model_name, m) for m in methods}
    outputs = {}
    for m, model in models.items():  # warm-up (kernel build, caches) and a check
        outputs[m] = generate(model, 1, 4)
    times: Dict = {(m, b): [] for m in methods for b in batches}
    cpu: Dict = {(m, b): [] for m in methods for b in batches}
    for _ in range(repeats):
        for b in batches:
            for m, model in models.items():
                t, c = time.perf_counter(), time.process_time()
                out = generate(model, b, new_tokens)
                times[(m, b)].append(time.perf_counter() - t)
                cpu[(m, b)].append(time.process_time() - c)
                assert out.shape == (b, PROMPT + new_tokens)
    result = {}
    for b in batches:
        for m in methods:
            med = statistics.median(times[(m, b)])
            result[(m, b)] = {"tok_s": b * new_tokens / med, "s": med,
                              "cpu_tok_s": b * new_tokens / statistics.median(cpu[(m, b)]),
                              "table_mb": table_bytes(models[m]) / 2**20}
    return result


def _median_ms(fn: Callable, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def run_logits(repeats: int) -> List[str]:
    """Head alone at V=32768, d=512: dense GEMV/GEMM against DPQ (K=256, D=128) inference
    and eval forms and TT rank 64, interleaved."""
    from compemb.dpq import DPQEmbedding
    from compemb.tt import TTEmbedding

    v, d = 32768, 512
    torch.manual_seed(0)
    weight = torch.randn(v, d)
    dpq = DPQEmbedding(v, d, 256, 128).eval()
    codebook = dpq.export()
    dpq_codes = dpq.codes()
    tt = TTEmbedding(v, d, 64).eval()
    rows = []
    from compemb.dpq.codebook import table_logits
    for batch in (1, 8, 1024):
        h = torch.randn(batch, d)
        cases = {"dense": lambda: h @ weight.T, "tt r64": lambda: tt.logits(h)}
        if batch < 1024:
            cases["dpq codebook"] = lambda: codebook.logits(h)
            # eval form with its codes kept (what the issue-14 codes cache gives; without
            # it DPQEmbedding.logits recomputes the codes from the queries every call)
            cases["dpq eval (codes kept)"] = lambda: table_logits(h, dpq.values, dpq_codes)
        ms: Dict[str, List[float]] = {k: [] for k in cases}
        with torch.no_grad():
            for fn in cases.values():
                fn()
            for _ in range(repeats):
                for k, fn in cases.items():
                    ms[k].append(_median_ms(fn, 1))
        dense = statistics.median(ms["dense"])
        for k in cases:
            m = statistics.median(ms[k])
            rows.append(f"| {batch} | {k} | {m:.2f} | {dense / m:.2f}x |")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm,minilm")
    p.add_argument("--methods", default=",".join(METHODS + FITTED))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS processes")
    p.add_argument("--logits", action="store_true", help="also time the head alone")
    args = p.parse_args(argv)
    import shutil
    import tempfile

    torch.set_num_threads(args.threads)
    fitted = tempfile.mkdtemp(prefix="compemb-bench-decode-")
    os.environ[FITTED_DIR_ENV] = fitted
    try:
        _run(args)
    finally:
        shutil.rmtree(fitted, ignore_errors=True)


def _run(args) -> None:
    methods = args.methods.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    load = os.getloadavg()
    print(f"# bench.decode {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"torch {torch.__version__}, {args.threads} threads, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {args.new_tokens} new tokens, "
          f"prompt {PROMPT}, median of {args.repeats}")
    from compemb.dpq.kernels import native_available

    print(f"# native DPQ kernel: {'built' if native_available() else 'not available'}")
    print("| model | batch | method | tokens/s | vs dense | tokens/CPU-s | vs dense | table MB "
          "| peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in [m for m in args.models.split(",") if m]:  # --models "": the head only
        result = run_speed(name, methods, batches, args.new_tokens, args.repeats)
        for b in batches:
            dense = result[("dense", b)] if "dense" in methods else None
            for m in methods:
                r = result[(m, b)]
                peak = "-"
                if not args.no_memory:
                    peak = f"{measure_memory(name, m, b, args.new_tokens)['peak'] / 2**20:.0f}"
                ratio = r["tok_s"] / dense["tok_s"] if dense else float("nan")
                cpu_ratio = r["cpu_tok_s"] / dense["cpu_tok_s"] if dense else float("nan")
                print(f"| {name} | {b} | {m} | {r['tok_s']:.1f} | {ratio:.2f}x | "
                      f"{r['cpu_tok_s']:.1f} | {cpu_ratio:.2f}x | {r['table_mb']:.1f} | "
                      f"{peak} |", flush=True)
    if args.logits:
        print("\n| batch | head (V=32768, d=512) | ms | dense / this |")
        print("| --- | --- | --- | --- |")
        for row in run_logits(max(5, args.repeats)):
            print(row, flush=True)
    load = os.getloadavg()
    print(f"# load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
