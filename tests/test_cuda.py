"""The layers on a CUDA device: the outputs, logits and gradients of the CPU (in float64,
where no near-tie can flip a DPQ code), float32 products under bf16/fp16 autocast, the
packed inference form, and torch.compile with inductor.

Collected everywhere, run only where torch sees a GPU (the rest of the suite is the CPU
half of these checks): ``pytest tests/test_cuda.py`` on a GPU machine.
"""
import copy
import subprocess
import sys

import pytest
import torch

from compemb import CodebookEmbedding, DPQEmbedding, OutputLayer, TREmbedding, TTEmbedding

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

V, J, PAD = 1000, 64, 3
NAMES = ["tt", "tr", "dpq-sx", "dpq-vq"]


def _layer(name: str):
    torch.manual_seed(0)
    if name == "tt":
        return TTEmbedding(V, J, 8, padding_idx=PAD)
    if name == "tr":
        return TREmbedding(V, J, 8, padding_idx=PAD)
    return DPQEmbedding(V, J, 16, 8, variant=name[4:], padding_idx=PAD)


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(V, (8, 50), generator=g)
    ids[0, :5] = PAD
    return ids, torch.randn(8, 50, J, generator=g), torch.randn(40, J, generator=g)


def _step(layer, device):
    """Forward, tied logits and backward of one training step on ``device``; returns the
    output, the logits and every parameter's gradient, on the CPU."""
    layer = layer.to(device).train()
    head = OutputLayer(layer, bias=False)
    ids, weight, hidden = (t.to(device) for t in _inputs())
    out = layer(ids)
    logits = head(hidden.to(out.dtype))
    loss = (out * weight.to(out.dtype)).sum() + logits.logsumexp(-1).sum()
    loss.backward()
    return out.cpu(), logits.cpu(), {n: p.grad.cpu() for n, p in layer.named_parameters()}


@pytest.mark.parametrize("name", NAMES)
def test_training_step_matches_cpu_in_float64(name):
    cpu = _layer(name).double()
    gpu = copy.deepcopy(cpu)
    ref, got = _step(cpu, "cpu"), _step(gpu, "cuda")
    torch.testing.assert_close(got[0], ref[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-9, atol=1e-12)
    assert got[2].keys() == ref[2].keys()
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], rtol=1e-8, atol=1e-11, msg=n)
    assert got[0][0, :5].abs().max() == 0  # the padding rows
    for buffer in ("running_mean", "running_var"):
        if hasattr(cpu, buffer):  # DPQ statistics updated alike
            torch.testing.assert_close(getattr(gpu, buffer).cpu(), getattr(cpu, buffer))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_accumulates_in_float32(name, dtype):
    layer = _layer(name).cuda().eval()
    ids, _, hidden = (t.cuda() for t in _inputs())
    ref, ref_logits = layer(ids), layer.logits(hidden)
    with torch.autocast("cuda", dtype=dtype):
        out, logits = layer(ids), layer.logits(hidden)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6)
    assert (logits.float() - ref_logits).abs().max() <= 2e-2 * ref_logits.abs().max()


@pytest.mark.parametrize("variant", ["sx", "vq"])
def test_exported_codebook_on_cuda_equals_the_layer(variant):
    layer = _layer("dpq-" + variant).cuda().eval()
    ids, _, hidden = (t.cuda() for t in _inputs())
    book = layer.export()
    assert isinstance(book, CodebookEmbedding) and book.values.is_cuda
    torch.testing.assert_close(book(ids), layer(ids), rtol=0, atol=0)
    torch.testing.assert_close(book.logits(hidden), layer.logits(hidden), rtol=1e-5, atol=1e-5)
    cpu = copy.deepcopy(book).cpu()
    torch.testing.assert_close(cpu(ids.cpu()), book(ids).cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tt", "dpq-sx"])
def test_torch_compile_inductor_matches_eager(name):
    layer = _layer(name).cuda().eval()
    ids, _, hidden = (t.cuda() for t in _inputs())
    compiled = torch.compile(layer)
    torch.testing.assert_close(compiled(ids), layer(ids), rtol=1e-5, atol=1e-6)
    layer.train()
    out = compiled(ids)
    out.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_out_of_range_index_fails_on_the_device():
    """The range check is an asynchronous device assert (no host sync per call); it
    poisons the CUDA context, hence a child process."""
    code = ("import torch, compemb\n"
            "layer = compemb.TTEmbedding(100, 16, 4).cuda()\n"
            "layer(torch.tensor([5, 100], device='cuda'))\n"
            "torch.cuda.synchronize()\n"
            "print('no error')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no error" not in proc.stdout
    assert "assert" in proc.stderr.lower() or "out of range" in proc.stderr.lower(), proc.stderr[-2000:]
