"""Training-step time of whole models with dense against compressed embeddings.

    OMP_WAIT_POLICY=PASSIVE python -m bench.train_step --threads 1
    python -m bench.train_step --device cuda --size big      # Transformer-big dims, on a GPU

One step = forward + backward + Adam step (+ ``zero_grad``), timed after warm-up steps
as the median of ``--repeats`` steps per case, the cases interleaved round-robin (as in
``bench.lookup``) so that load changes on a shared machine hit every case alike; on CUDA
every step ends with a synchronisation. Models, built from configs (nothing downloaded):

* ``marian``: a transformers ``MarianMTModel`` (encoder-decoder, shared source/target
  table tied to the softmax). ``--size small``: d_model 256, 3+3 layers, 4 heads, FFN
  1024, vocab 8000; ``--size big``: Transformer-big (d_model 1024, 6+6 layers, 16 heads,
  FFN 4096, vocab 32768, the TT paper's NMT model, TT shape (32,32,32)x(8,8,16)).
  Batch: 32 source and 32 target sequences of 32 tokens (``--batch``, ``--seq-len``).
* ``transfo_xl``: this project's Transformer-XL (``compemb_hf.transfo_xl``), full
  softmax. ``--size small``: 4 layers, d 256, 4 heads, inner 1024, vocab 10000,
  tgt_len = mem_len = 35, batch 16; ``--size big``: the TT paper's WikiText-103 dims
  (16 layers, d 512, 8 heads, inner 2048, vocab 267735, tgt_len = mem_len = 128, TT shape
  (60,60,75)x(8,8,8)), batch 16. Each step carries the previous step's memories.

Methods (``compemb_hf.compress`` with ``init="random"``, softmax tied to the compressed
table): ``dense``, ``tt`` (rank ``--tt-rank``, 16), ``dpq-sx`` and ``dpq-vq``
(``--dpq-codes`` 32 codes, ``--dpq-groups`` 32 groups). The table prints ms/step, the
ratio to the same model's dense step, the peak memory of a step on CUDA
(``torch.cuda.max_memory_allocated`` over one step, the model and Adam state included)
and the embedding compression ratio from ``compemb.compression_report``. The TT paper's
own figure (Transformer-big on GPU, mixed precision: iteration time 1.14 -> 1.23, +8%)
is printed beside ours, labelled as the paper's.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench.lookup

import argparse  # noqa: E402
import gc  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable, Dict, List, Optional, Sequence  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import compemb  # noqa: E402
import compemb_hf  # noqa: E402
from compemb_hf import CompressedEmbeddingConfig  # noqa: E402

from .lookup import Case, run  # noqa: E402

# The TT paper (Hrinchuk et al., ICLR 2020, Table 2 and section 4.2): Transformer-big on
# WMT'14 En-De, V100 GPUs, mixed precision; iteration time 1.14 dense, 1.22-1.23 with TT.
PAPER_TT_OVERHEAD = 1.23 / 1.14 - 1.0
PAPER_LABEL = (f"the TT paper's figure (Transformer-big, WMT'14, GPU, mixed precision): "
               f"{PAPER_TT_OVERHEAD:+.0%} per iteration (1.14 -> 1.23)")

MODELS = ("marian", "transfo_xl")
METHODS = ("dense", "tt", "dpq-sx", "dpq-vq")


@dataclass(frozen=True)
class ModelDims:
    """The sizes of one benchmarked model. ``tt_shape``: the TT factorisation
    ``((I1..IN), (J1..JN))`` or None (the automatic choice)."""

    vocab: int
    d_model: int
    layers: int
    heads: int
    ffn: int
    batch: int
    seq_len: int
    tt_shape: Optional[tuple] = None


SIZES: Dict[str, Dict[str, ModelDims]] = {
    "small": {
        "marian": ModelDims(vocab=8000, d_model=256, layers=3, heads=4, ffn=1024, batch=32, seq_len=32),
        "transfo_xl": ModelDims(vocab=10000, d_model=256, layers=4, heads=4, ffn=1024, batch=16,
                                seq_len=35),
    },
    "big": {
        "marian": ModelDims(vocab=32768, d_model=1024, layers=6, heads=16, ffn=4096, batch=32, seq_len=32,
                            tt_shape=((32, 32, 32), (8, 8, 16))),
        "transfo_xl": ModelDims(vocab=267735, d_model=512, layers=16, heads=8, ffn=2048, batch=16,
                                seq_len=128, tt_shape=((60, 60, 75), (8, 8, 8))),
    },
}


def method_config(method: str, dims: ModelDims, tt_rank: int = 16, dpq_codes: int = 32,
                  dpq_groups: int = 32) -> Optional[CompressedEmbeddingConfig]:
    """The ``compemb_hf`` config of a method (None for ``dense``): a fresh (random)
    compressed table with the softmax tied to it."""
    if method == "dense":
        return None
    if method == "tt":
        return CompressedEmbeddingConfig("tt", rank=tt_rank, shape=dims.tt_shape, output="tied",
                                         init="random")
    if method in ("dpq-sx", "dpq-vq"):
        return CompressedEmbeddingConfig("dpq", num_codes=dpq_codes, num_groups=dpq_groups,
                                         variant=method.split("-")[1], output="tied", init="random")
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def build_marian(dims: ModelDims) -> nn.Module:
    """``MarianMTModel`` from a config: shared source/target table, tied softmax."""
    from transformers import MarianConfig, MarianMTModel

    config = MarianConfig(
        vocab_size=dims.vocab, decoder_vocab_size=dims.vocab, d_model=dims.d_model,
        encoder_layers=dims.layers, decoder_layers=dims.layers,
        encoder_attention_heads=dims.heads, decoder_attention_heads=dims.heads,
        encoder_ffn_dim=dims.ffn, decoder_ffn_dim=dims.ffn, max_position_embeddings=max(512, dims.seq_len),
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, forced_eos_token_id=1)
    return MarianMTModel(config)


def build_transfo_xl(dims: ModelDims) -> nn.Module:
    """This project's Transformer-XL with a full softmax (``cutoffs=[]``)."""
    from compemb_hf.transfo_xl import TransfoXLConfig, TransfoXLLMHeadModel

    config = TransfoXLConfig(
        vocab_size=dims.vocab, cutoffs=[], div_val=1, d_model=dims.d_model, d_embed=dims.d_model,
        n_head=dims.heads, d_head=dims.d_model // dims.heads, d_inner=dims.ffn, n_layer=dims.layers,
        tgt_len=dims.seq_len, mem_len=dims.seq_len, same_length=False,
        dropout=0.1, dropatt=0.0, eos_token_id=None)
    return TransfoXLLMHeadModel(config)


BUILDERS: Dict[str, Callable[[ModelDims], nn.Module]] = {
    "marian": build_marian, "transfo_xl": build_transfo_xl}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model_name: str, model: nn.Module, dims: ModelDims, device: torch.device,
              seed: int = 0) -> Callable[[], Tensor]:
    """One training step of ``model`` on a fixed random batch: returns a callable doing
    forward, backward, ``Adam.step`` and ``zero_grad`` (then a CUDA sync), returning the
    (detached) loss. Marian: ``input_ids`` / ``labels`` ``[batch, seq_len]``;
    Transformer-XL: one ``[batch, seq_len]`` segment per step with the previous step's
    memories."""
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    # ids 2.. (0 pad / decoder start, 1 eos for Marian)
    source = torch.randint(2, dims.vocab, (dims.batch, dims.seq_len), generator=g).to(device)
    target = torch.randint(2, dims.vocab, (dims.batch, dims.seq_len), generator=g).to(device)
    mems: List[Optional[List[Tensor]]] = [None]

    def step() -> Tensor:
        if model_name == "marian":
            loss = model(input_ids=source, attention_mask=torch.ones_like(source), labels=target).loss
        else:
            out = model(source, mems=mems[0], labels=source)
            loss, mems[0] = out.loss, out.mems
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return loss.detach()

    return step


@dataclass
class Row:
    """One measured (model, method): the timing case and the embedding compression ratio."""

    model: str
    method: str
    case: Case
    embedding_ratio: float
    peak_mib: Optional[float] = None


def build_rows(models: Sequence[str], methods: Sequence[str], size: str, device: torch.device,
               warmup: int, tt_rank: int = 16, dpq_codes: int = 32, dpq_groups: int = 32,
               overrides: Optional[Dict[str, int]] = None) -> List[Row]:
    """One :class:`Row` per model and method; each case's ``setup`` builds the model
    (seeded), compresses it and takes ``warmup`` steps before returning the step."""
    rows = []
    for model_name in models:
        dims = SIZES[size][model_name]
        given = {k: v for k, v in (overrides or {}).items() if v}
        if given:  # another vocabulary or width: the automatic TT shape
            reshaped = {"tt_shape": None} if {"vocab", "d_model"} & set(given) else {}
            dims = ModelDims(**{**dims.__dict__, **given, **reshaped})
        for method in methods:
            cfg = method_config(method, dims, tt_rank, dpq_codes, dpq_groups)
            row = Row(model_name, method, Case(method, model_name, lambda: None,
                                               baseline=method == "dense"), float("nan"))

            def setup(model_name=model_name, dims=dims, cfg=cfg, row=row) -> Callable[[], Tensor]:
                torch.manual_seed(0)
                model = BUILDERS[model_name](dims)
                if cfg is not None:
                    compemb_hf.compress(model, cfg)
                row.embedding_ratio = compemb.compression_report(model).embedding_ratio
                step = make_step(model_name, model, dims, device)
                for _ in range(max(warmup - 1, 0)):  # bench.lookup.run takes one more
                    step()
                return step

            row.case.setup = setup
            rows.append(row)
    return rows


def measure_peak_memory(rows: Sequence[Row], device: torch.device) -> None:
    """CUDA only: each case alone, its peak allocated memory over one step after warm-up
    (model, gradients, Adam state and activations), in MiB."""
    if device.type != "cuda":
        return
    for row in rows:
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        step = row.case.setup()
        step()
        torch.cuda.reset_peak_memory_stats(device)
        step()
        row.peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        del step
    gc.collect()
    torch.cuda.empty_cache()


def table(rows: Sequence[Row]) -> str:
    """The results: model, method, ms/step (median and min), ratio to the model's dense
    step, peak MiB (CUDA), embedding compression ratio; then ours beside the paper's."""
    head = (f"{'model':<12}{'method':<9}{'ms/step':>10}{'min ms':>9}{'x dense':>9}"
            f"{'peak MiB':>10}{'emb. ratio':>12}")
    lines = [head, "-" * len(head)]
    dense = {r.model: r.case.median_ms for r in rows if r.method == "dense"}
    for r in rows:
        base = dense.get(r.model)
        rel = f"{r.case.median_ms / base:.2f}" if base else "-"
        peak = "-" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        lines.append(f"{r.model:<12}{r.method:<9}{r.case.median_ms:>10.1f}{1e3 * min(r.case.times):>9.1f}"
                     f"{rel:>9}{peak:>10}{r.embedding_ratio:>11.1f}x")
    lines.append("")
    lines.append(PAPER_LABEL)
    for r in rows:
        if r.method == "tt" and dense.get(r.model):
            lines.append(f"  ours, {r.model} TT: {r.case.median_ms / dense[r.model] - 1:+.0%} per step")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> List[Row]:
    """Run the benchmark and print the table; returns the measured rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="small (CPU) or big (Transformer-big / the paper's Transformer-XL dims)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per case")
    parser.add_argument("--repeats", "--steps", dest="repeats", type=int, default=10,
                        help="timed steps per case (median reported)")
    parser.add_argument("--tt-rank", type=int, default=16)
    parser.add_argument("--dpq-codes", type=int, default=32)
    parser.add_argument("--dpq-groups", type=int, default=32)
    for name in ("vocab", "d-model", "layers", "heads", "ffn", "batch", "seq-len"):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"override the size's {name}")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    for name, given, known in (("--models", models, MODELS), ("--methods", methods, METHODS)):
        bad = [x for x in given if x not in known]
        if bad or not given:
            parser.error(f"{name}: {', '.join(bad) or 'none given'}; choose from {', '.join(known)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch build sees no CUDA device")
    torch.set_num_threads(args.threads)
    overrides = {k: getattr(args, k) for k in ("vocab", "d_model", "layers", "heads", "ffn", "batch",
                                               "seq_len")}
    rows = build_rows(models, methods, args.size, device, args.warmup, args.tt_rank, args.dpq_codes,
                      args.dpq_groups, overrides)
    measure_peak_memory(rows, device)
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"] * 3
    print(f"=== train step (forward + backward + Adam), torch {torch.__version__} on {device}, "
          f"{args.threads} threads (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), size "
          f"{args.size}, {args.warmup} warm-up + {args.repeats} timed steps per case, interleaved "
          f"(load average {' '.join(load)} on {os.cpu_count()} cpus)")
    run([r.case for r in rows], args.repeats, args.threads, memory=False)
    print(table(rows))
    if os.path.exists("/proc/loadavg"):
        print(f"load average at the end: {' '.join(open('/proc/loadavg').read().split()[:3])}")
    return rows


if __name__ == "__main__":
    main()
