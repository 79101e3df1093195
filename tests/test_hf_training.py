"""compemb_hf: compressed models train with Trainer, Accelerate (one and two processes),
gradient checkpointing and torch.compile."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as tf

import compemb_hf
from compemb_hf import CompressedEmbeddingConfig as Cfg
from compemb_hf.testing import dummy_inputs, tiny_model

ROOT = Path(__file__).resolve().parents[1]
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _data(n=16, length=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (n, length), generator=g)
    labels = (ids[:, 0] % 3).long()  # learnable from the first token
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def test_trainer_trains_dpq_vq_codebook(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("bert-cls", **NO_DROPOUT)
    compemb_hf.compress(model, Cfg("dpq", num_codes=4, num_groups=4, variant="vq"))
    layer = model.get_input_embeddings()
    values0, query0 = layer.values.detach().clone(), layer.query.detach().clone()
    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=6, learning_rate=1e-2,
                                per_device_train_batch_size=8, report_to=[], use_cpu=True,
                                save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = tf.Trainer(model=model, args=args, train_dataset=_data())
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    # the codebook (values) moves: the VQ codebook loss reaches it with no change to the loop
    assert not torch.allclose(layer.values, values0)
    assert not torch.allclose(layer.query, query0)
    assert layer.codebook_loss is not None
    trainer.save_model(str(tmp_path / "final"))
    loaded = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    model.eval()
    x = dummy_inputs("bert-cls")
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, model(**x).logits)


def _accelerate_steps(model, data, steps=3, lr=0.1):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model, opt, loader = acc.prepare(model, opt, loader)
    model.train()
    losses = []
    for _ in range(steps):
        for batch in loader:
            loss = model(**batch).loss
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    return acc.unwrap_model(model), losses


@pytest.mark.parametrize("method", ["tt", "dpq"])
def test_accelerate_loop_and_gradient_checkpointing(method):
    cfg = Cfg("tt", rank=4) if method == "tt" else Cfg("dpq", num_codes=4, num_groups=4,
                                                        variant="vq")
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = tiny_model("bert-cls", **NO_DROPOUT)
        compemb_hf.compress(model, cfg)
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
        start = {k: v.clone() for k, v in model.state_dict().items()}
        model, losses = _accelerate_steps(model, _data(), steps=4)
        assert losses[-1] < losses[0]
        results.append(model.state_dict())
    plain, ckpt = results
    layer_keys = [k for k in plain if k.startswith("bert.embeddings.word_embeddings.")]
    assert any(not torch.equal(plain[k], start[k]) for k in layer_keys)
    for k in plain:
        assert torch.allclose(plain[k].float(), ckpt[k].float(), atol=1e-5), k


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = tiny_model("gpt2").eval()
    compemb_hf.compress(model, Cfg("tt", rank=4))
    x = dummy_inputs("gpt2")
    with torch.no_grad():
        eager = model(**x).logits
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(compiled(**x).logits, eager, atol=1e-5)
    model.train()
    loss = compiled(**x, labels=x["input_ids"]).loss
    loss.backward()
    cores = model.get_input_embeddings().cores
    assert all(c.grad is not None and torch.isfinite(c.grad).all() for c in cores)


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    import compemb_hf
    from compemb_hf import CompressedEmbeddingConfig as Cfg
    from compemb_hf.testing import tiny_model

    out = sys.argv[1]
    acc = Accelerator(cpu=True)
    set_seed(0)
    model = tiny_model("bert-cls", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    compemb_hf.compress(model, Cfg("dpq", num_codes=4, num_groups=4, variant="vq"))
    if acc.process_index == 0:
        torch.save(model.state_dict(), f"{out}.init.pt")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 60, (8, 6), generator=g)
    labels = torch.randint(0, 3, (8,), generator=g)
    data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(8)]
    # the same global batch of 8: 8 on one process, 4 + 4 on two
    loader = torch.utils.data.DataLoader(data, batch_size=8 // acc.num_processes)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model, opt, loader = acc.prepare(model, opt, loader)
    model.train()
    for _ in range(3):
        for batch in loader:
            acc.backward(model(**batch).loss)
            opt.step()
            opt.zero_grad()
    state = acc.unwrap_model(model).state_dict()
    torch.save(state, f"{out}.rank{acc.process_index}.of{acc.num_processes}.pt")
""")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_data_parallel_on_cpu_matches_one_process(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = str(tmp_path / "state")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(script), out]
    proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, str(script), out], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    init = torch.load(f"{out}.init.pt")
    rank0, rank1 = torch.load(f"{out}.rank0.of2.pt"), torch.load(f"{out}.rank1.of2.pt")
    single = torch.load(f"{out}.rank0.of1.pt")
    assert set(rank0) == set(rank1) == set(single)
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k
        assert torch.allclose(rank0[k].float(), single[k].float(), atol=1e-5), k
    moved = [k for k in rank0 if not torch.equal(rank0[k], init[k])]
    assert "bert.embeddings.word_embeddings.values" in moved
    assert "bert.embeddings.word_embeddings.query" in moved
