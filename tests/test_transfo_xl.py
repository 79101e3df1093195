"""Transformer-XL for transformers 5 (compemb_hf.transfo_xl): memories, relative attention
against a slow reference, the transformers 4.35 checkpoint fixture, save/load, generate,
evaluation, training (plain, Trainer, Accelerate) and the compressed variants."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compemb
from compemb_hf.transfo_xl import (
    TransfoXLConfig, TransfoXLLMHeadModel, TransfoXLModel, evaluate_perplexity,
)
from compemb_hf.transfo_xl.modeling import (
    PositionalEmbedding, RelPartialLearnableMultiHeadAttn, build_attention_mask, rel_shift,
    relative_positions,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "transfo_xl_4x")

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**over):
    kw = dict(vocab_size=40, cutoffs=[10, 24], d_model=16, d_embed=16, n_head=2, d_head=8,
              d_inner=32, div_val=2, n_layer=2, mem_len=8, clamp_len=0, same_length=False,
              dropout=0.0, dropatt=0.0, eos_token_id=None)
    kw.update(over)
    return TransfoXLConfig(**kw)


def tiny_model(seed=0, noise=0.3, **over):
    """A tiny model; ``noise`` moves every weight away from the init (whose outputs are
    near uniform) so that equality checks compare non-trivial values."""
    torch.manual_seed(seed)
    model = TransfoXLLMHeadModel(tiny_config(**over)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    return model


# ----------------------------------------------------------------------------- the 4.x fixture

@pytest.mark.parametrize("name", ["adaptive", "shared"])
def test_loads_transformers_4x_checkpoint_with_same_logits_and_mems(name):
    path = os.path.join(FIXTURES, name)
    model, info = TransfoXLLMHeadModel.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model.eval()
    exp = torch.load(os.path.join(path, "expected.pt"))
    with torch.no_grad():
        # 4.x started from mem_len zero memories when mems was None: init_mems gives those
        o1 = model(exp["seg1"], mems=model.init_mems(exp["seg1"].shape[0]))
        o2 = model(exp["seg2"], mems=o1.mems)
        o3 = model(exp["seg2"], mems=o1.mems, labels=exp["seg2"])
    torch.testing.assert_close(o1.logits, exp["scores1"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o2.prediction_scores, exp["scores2"], atol=1e-5, rtol=1e-5)
    for got, want in zip(o1.mems + o2.mems, exp["mems1"] + exp["mems2"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o3.losses, exp["losses2"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o3.loss, exp["loss2"], atol=1e-5, rtol=1e-5)


def test_4x_checkpoint_keeps_its_ties_and_resaves_in_the_same_layout(tmp_path):
    from transformers import AutoModelForCausalLM

    # model_type "transfo-xl" (transformers 4.x) is registered: the Auto classes open it
    model = AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, "adaptive"))
    assert isinstance(model, TransfoXLLMHeadModel) and model.config.model_type == "transfo-xl"
    emb, crit = model.transformer.word_emb, model.crit
    assert all(crit.out_layers[i].weight is emb.emb_layers[i].weight for i in range(3))
    assert crit.out_projs[0] is not emb.emb_projs[0]  # tie_projs = [False, True, True]
    assert crit.out_projs[1] is emb.emb_projs[1] and crit.out_projs[2] is emb.emb_projs[2]
    shared = TransfoXLLMHeadModel.from_pretrained(os.path.join(FIXTURES, "shared"))
    assert all(layer.dec_attn.r_w_bias is shared.transformer.r_w_bias for layer in shared.transformer.layers)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    saved = load_file(os.path.join(tmp_path, "model.safetensors"))
    original = load_file(os.path.join(FIXTURES, "adaptive", "model.safetensors"))
    assert set(saved) == set(original)
    for key in saved:
        torch.testing.assert_close(saved[key], original[key])


# ----------------------------------------------------------------------------- attention

def test_rel_shift_aligns_each_query_with_its_distances():
    qlen, mlen = 4, 3
    klen = qlen + mlen
    x = torch.randn(qlen, klen, 2)
    y = rel_shift(x)
    for i in range(qlen):
        for j in range(i + mlen + 1):
            # column c of x is distance klen-1-c; y[i, j] is distance i+mlen-j
            assert torch.equal(y[i, j], x[i, klen - 1 - (i + mlen - j)])


def _sinusoid(dist, d):
    inv = [1.0 / (10000 ** (2 * k / d)) for k in range(d // 2)]
    return torch.tensor([math.sin(dist * f) for f in inv] + [math.cos(dist * f) for f in inv])


def slow_relative_attention(attn, w, mems, clamp_len, mem_len, same_length):
    """Dai et al. (2019) eq. of section 3.3, one score at a time."""
    qlen, bsz, d = w.shape
    mlen = mems.shape[0]
    cat = torch.cat([mems, w], 0)
    n, dh = attn.n_head, attn.d_head
    wq, wk, wv = attn.qkv_net.weight.chunk(3, 0)
    wr = attn.r_net.weight
    out = torch.zeros(qlen, bsz, n * dh)
    for b in range(bsz):
        for h in range(n):
            hs = slice(h * dh, (h + 1) * dh)
            for i in range(qlen):
                q = wq[hs] @ cat[mlen + i, b]
                scores, values = [], []
                for j in range(mlen + qlen):
                    dist = i + mlen - j
                    if dist < 0 or (same_length and dist >= mem_len):
                        continue
                    k = wk[hs] @ cat[j, b]
                    rk = wr[hs] @ _sinusoid(min(dist, clamp_len) if clamp_len > 0 else dist, d)
                    scores.append(((q + attn.r_w_bias[h]) @ k + (q + attn.r_r_bias[h]) @ rk) / math.sqrt(dh))
                    values.append(wv[hs] @ cat[j, b])
                p = torch.softmax(torch.stack(scores), 0)
                out[i, b, hs] = (p[:, None] * torch.stack(values)).sum(0)
    return attn.layer_norm(w + attn.o_net(out))


@pytest.mark.parametrize("clamp_len,same_length", [(0, False), (3, True)])
def test_relative_attention_matches_slow_reference(clamp_len, same_length):
    torch.manual_seed(0)
    cfg = tiny_config(clamp_len=clamp_len, same_length=same_length)
    attn = RelPartialLearnableMultiHeadAttn(cfg).eval()
    with torch.no_grad():
        attn.r_w_bias.normal_()
        attn.r_r_bias.normal_()
    qlen, mlen, mem_len = 4, 3, 5
    w, mems = torch.randn(qlen, 2, 16), torch.randn(mlen, 2, 16)
    pos = PositionalEmbedding(16)(relative_positions(qlen + mlen, clamp_len))
    mask = build_attention_mask(qlen, mlen, mem_len, same_length)
    with torch.no_grad():
        fast, _ = attn(w, pos, mask, mems=mems)
        slow = slow_relative_attention(attn, w, mems, clamp_len, mem_len, same_length)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- memories

def test_outputs_with_memories_equal_the_concatenated_segment():
    model = tiny_model(mem_len=9)
    x = torch.randint(0, 40, (3, 9))
    a, b, c = x[:, :4], x[:, 4:7], x[:, 7:]
    with torch.no_grad():
        full = model(x, output_hidden_states=True)
        oa = model(a)
        ob = model(b, mems=oa.mems)
        oc = model(c, mems=ob.mems)
    torch.testing.assert_close(oa.logits, full.logits[:, :4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ob.logits, full.logits[:, 4:7], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(oc.logits, full.logits[:, 7:], atol=1e-5, rtol=1e-5)
    # memories: each layer's input for the last positions, [mlen, batch, d_model]
    assert len(oc.mems) == 2 and oc.mems[0].shape == (9, 3, 16)
    assert oa.mems[0].shape == (4, 3, 16) and ob.mems[0].shape == (7, 3, 16)
    for layer, mem in enumerate(oc.mems):
        torch.testing.assert_close(mem.transpose(0, 1), full.hidden_states[layer], atol=1e-5, rtol=1e-5)
    assert not oc.mems[0].requires_grad


def test_memory_length_bounds_the_memories_and_the_context():
    model = tiny_model(mem_len=3)
    x = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        o1 = model(x[:, :5], output_hidden_states=True)
        o2 = model(x[:, 5:], mems=o1.mems, output_hidden_states=True)
    assert o1.mems[0].shape == (3, 2, 16) and o2.mems[0].shape == (3, 2, 16)
    for layer in range(2):
        # the memory is each layer's input at the last mem_len positions
        torch.testing.assert_close(o1.mems[layer], o1.hidden_states[layer][:, 2:].transpose(0, 1))
        torch.testing.assert_close(o2.mems[layer], torch.cat(
            [o1.mems[layer][2:], o2.hidden_states[layer].transpose(0, 1)]))
    # the first layer's memory is the embedding of the last 3 tokens
    torch.testing.assert_close(o1.mems[0], model.transformer.word_emb(x[:, 2:5].t()), atol=1e-6, rtol=1e-6)
    # the second segment sees the first only through the memories
    y = x.clone()
    y[:, 4] = (y[:, 4] + 1) % 40
    with torch.no_grad():
        o1y = model(y[:, :5])
        assert not torch.allclose(model(y[:, 5:], mems=o1y.mems).logits, o2.logits, atol=1e-4)
        torch.testing.assert_close(model(y[:, 5:], mems=o1.mems).logits, o2.logits)
    assert model(x, mems=None).mems is not None
    assert tiny_model(mem_len=0)(x).mems is None


@pytest.mark.parametrize("form", ["div_val=2", "div_val=1 tt"])
def test_adaptive_softmax_is_a_distribution_and_losses_match_it(form):
    if form == "div_val=2":
        model = tiny_model()
    else:  # one compressed table, sliced per cluster
        import compemb.tt  # noqa: F401
        model = tiny_model(div_val=1, compressed_embedding={"method": "tt", "rank": 4})
        assert isinstance(model.crit.out_layers[0], compemb.OutputLayer)
    x = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        logp = model(x).logits
        out = model(x, labels=x)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2, 6), atol=1e-5, rtol=1e-5)
    as_tuple = model(x, return_dict=False)  # (logits, mems)
    torch.testing.assert_close(as_tuple[0], logp)
    assert len(as_tuple[1]) == 2
    want = -logp[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(out.losses, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, want.mean(), atol=1e-5, rtol=1e-5)
    labels = x.clone()
    labels[0, 3] = -100
    masked = model(x, labels=labels)
    assert masked.losses[0, 2] == 0
    torch.testing.assert_close(masked.loss, (want.sum() - want[0, 2]) / 9, atol=1e-5, rtol=1e-5)


def test_full_softmax_without_cutoffs():
    model = tiny_model(cutoffs=[], div_val=1, d_embed=12)
    crit = model.crit
    assert crit.n_clusters == 0 and len(model.transformer.word_emb.emb_layers) == 1
    h = torch.randn(5, 16)
    with torch.no_grad():
        want = F.log_softmax(F.linear(h @ crit.out_projs[0], crit.out_layers[0].weight, crit.out_layers[0].bias), -1)
        torch.testing.assert_close(crit(h), want)


# ----------------------------------------------------------------------------- save / load / auto

def test_save_load_round_trip_and_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    model = tiny_model(untie_r=False, tgt_len=5)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "compemb-transfo-xl"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, TransfoXLLMHeadModel) and loaded.config.tgt_len == 5
    x = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        a, b = model(x), loaded(x)
    torch.testing.assert_close(a.logits, b.logits)
    for m1, m2 in zip(a.mems, b.mems):
        torch.testing.assert_close(m1, m2)
    assert loaded.crit.out_layers[0].weight is loaded.transformer.word_emb.emb_layers[0].weight
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, TransfoXLModel)
    torch.testing.assert_close(base.eval()(x).last_hidden_state,
                               model.transformer(x).last_hidden_state)


# ----------------------------------------------------------------------------- evaluation, generate

def test_perplexity_segment_by_segment_equals_one_pass():
    model = tiny_model(mem_len=20)
    text = torch.randint(0, 40, (2, 14))
    with torch.no_grad():
        whole = model(text, labels=text).loss
    res = evaluate_perplexity(model, text, tgt_len=4)
    assert res["tokens"] == 2 * 13
    assert res["loss"] == pytest.approx(float(whole), rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(float(whole)), rel=1e-5)
    # a shorter memory changes the result and is restored afterwards
    short = evaluate_perplexity(model, text[0], tgt_len=4, mem_len=2, clamp_len=3, same_length=True)
    assert short["tokens"] == 13 and short["loss"] != pytest.approx(
        evaluate_perplexity(model, text[0], tgt_len=4)["loss"], rel=1e-4)
    core = model.transformer
    assert (core.mem_len, core.clamp_len, core.same_length) == (20, 0, False)
    with pytest.raises(ValueError, match="tgt_len"):
        evaluate_perplexity(model, text, tgt_len=0)
    with pytest.raises(ValueError, match="tgt_len"):
        evaluate_perplexity(model, text)  # config.tgt_len is None
    with pytest.raises(ValueError, match="mem_len"):
        evaluate_perplexity(model, text, tgt_len=4, mem_len=-1)


def test_generate_with_memories_equals_full_recompute():
    model = tiny_model(mem_len=32)
    prompt = torch.randint(0, 40, (2, 5))
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)
    torch.manual_seed(0)
    sampled = model.generate(prompt, max_new_tokens=4, do_sample=True, top_k=5)
    assert sampled.shape == (2, 9) and torch.equal(sampled[:, :5], prompt)
    nomem = tiny_model(mem_len=0)
    assert nomem.generate(prompt, max_new_tokens=3, do_sample=False).shape == (2, 8)


# ----------------------------------------------------------------------------- bad input

def test_bad_configs_name_the_argument():
    with pytest.raises(ValueError, match="cutoffs"):
        tiny_config(cutoffs=[10, 40])
    with pytest.raises(ValueError, match="cutoffs"):
        tiny_config(cutoffs=[24, 10])
    with pytest.raises(ValueError, match="div_val"):
        tiny_config(div_val=8)
    with pytest.raises(ValueError, match="mem_len"):
        tiny_config(mem_len=-1)
    with pytest.raises(ValueError, match="tgt_len"):
        tiny_config(tgt_len=0)
    with pytest.raises(ValueError, match="tie_projs"):
        tiny_config(tie_projs=[False, True])
    with pytest.raises(ValueError, match="unknown method"):
        tiny_config(compressed_embedding={"method": "nope"})
    with pytest.raises(ValueError, match="output"):
        tiny_config(compressed_embedding={"method": "dense", "output": "shared"})
    with pytest.raises(ValueError, match="mem_len"):
        tiny_model().reset_memory_length(-2)
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_model().resize_token_embeddings(50)


def test_bad_mems_and_inputs_name_the_argument():
    model = tiny_model()
    x = torch.randint(0, 40, (2, 4))
    mems = model(x).mems
    with pytest.raises(ValueError, match="mems must be a list of n_layer=2"):
        model(x, mems=mems[:1])
    with pytest.raises(ValueError, match=r"mems\[0\] has batch size 2 but the input has batch size 3"):
        model(torch.randint(0, 40, (3, 4)), mems=mems)
    with pytest.raises(ValueError, match=r"mems\[1\] must be a tensor \[mlen, batch, d_model=16\]"):
        model(x, mems=[mems[0], mems[1][..., :8]])
    with pytest.raises(ValueError, match="labels"):
        model(x, labels=x[:, :3])
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="input_ids"):
        model(x[0])


# ----------------------------------------------------------------------------- training

def _periodic(length, period=5, streams=4, vocab=40):
    """Streams of a repeating pattern (different phase per stream)."""
    pattern = torch.tensor([3, 17, 8, 30, 12, 25, 1][:period])
    idx = torch.arange(length)[None] + torch.arange(streams)[:, None]
    return pattern[idx % period]


def _train_with_memories(model, data, steps, tgt_len=6, lr=3e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    mems, pos = None, 0
    for _ in range(steps):
        if pos + tgt_len + 1 > data.shape[1]:
            mems, pos = None, 0
        seg = data[:, pos:pos + tgt_len + 1]
        out = model(seg, mems=mems, labels=seg)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        mems, pos = out.mems, pos + tgt_len  # the next segment starts at the last target
    model.eval()


def test_tiny_model_learns_a_toy_sequence():
    model = tiny_model(mem_len=6, noise=0.0)
    data = _periodic(60)
    before = evaluate_perplexity(model, data, tgt_len=6)["perplexity"]
    _train_with_memories(model, data, steps=50, lr=1e-2)
    after = evaluate_perplexity(model, data, tgt_len=6)["perplexity"]
    assert before > 20 and after < 1.3, (before, after)
    # the model continues the pattern
    gen = model.generate(data[:1, :7], max_new_tokens=5, do_sample=False)
    assert torch.equal(gen[0, 7:], data[0, 7:12])


def test_trainer_trains_the_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model(noise=0.0)
    data = _periodic(8, streams=32)
    rows = [{"input_ids": r, "labels": r} for r in data]
    with torch.no_grad():
        before = float(model(data, labels=data).loss)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8,
                             learning_rate=2e-2, report_to=[], save_strategy="no", use_cpu=True,
                             logging_steps=10, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows).train()
    model.eval()
    with torch.no_grad():
        after = float(model(data, labels=data).loss)
    assert after < 0.5 * before, (before, after)


def test_accelerate_training_with_memories():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = tiny_model(mem_len=6, noise=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    model, opt = accelerator.prepare(model, opt)
    data = _periodic(40)
    before = evaluate_perplexity(accelerator.unwrap_model(model), data, tgt_len=6)["loss"]
    model.train()
    for _ in range(3):
        mems = None
        for pos in range(0, 36, 6):
            seg = data[:, pos:pos + 7]
            out = model(seg, mems=mems, labels=seg)
            accelerator.backward(out.loss)
            opt.step()
            opt.zero_grad()
            mems = out.mems
    after = evaluate_perplexity(accelerator.unwrap_model(model), data, tgt_len=6)["loss"]
    assert after < 0.5 * before, (before, after)


# ----------------------------------------------------------------------------- compressed variants

import compemb.dpq  # noqa: E402,F401  (register the methods)
import compemb.tr  # noqa: E402,F401
import compemb.tt  # noqa: E402,F401

VARIANTS = {
    "tt": {"method": "tt", "rank": 4},
    "tr": {"method": "tr", "rank": 4},
    "dpq-sx": {"method": "dpq", "num_codes": 8, "num_groups": 4},
    "dpq-vq": {"method": "dpq", "num_codes": 8, "num_groups": 4, "variant": "vq"},
}


def _loss_drops(make_model, steps=30, seeds=(0, 1, 2), factor=0.6):
    """Train ``make_model(seed)`` on the periodic data for each seed: the held-out loss
    must fall for every seed, and on average below ``factor`` x its start (a start near
    uniform over the vocabulary). Averaging over seeds keeps the check about the layer,
    not about one lucky (or unlucky) random stream."""
    data = _periodic(40)
    ratios = []
    for seed in seeds:
        model = make_model(seed)
        before = evaluate_perplexity(model, data, tgt_len=6)["loss"]
        _train_with_memories(model, data, steps=steps, lr=1e-2)
        after = evaluate_perplexity(model, data, tgt_len=6)["loss"]
        ratios.append(after / before)
    assert max(ratios) < 1 and sum(ratios) / len(ratios) < factor, ratios


@pytest.mark.parametrize("method", ["tt", "tr"])
def test_fresh_tt_and_tr_tables_start_at_the_models_init_std(method):
    """The core's init rule: a fresh TT / TR table starts at the std the model gives its
    dense word tables (``config.init_std``), its cores keeping the structure of eq. (2)
    (scaled by one factor; they started at the Glorot std before), and the model's weight
    init leaves them alone (before that, it drew them at proj_init_std like the adaptive
    projections, which made a 10000 x 256 TT table 400 times too small at the start)."""
    torch.manual_seed(0)
    vocab, dim = 2000, 64
    model = TransfoXLLMHeadModel(tiny_config(vocab_size=vocab, cutoffs=[], div_val=1, d_model=dim, d_embed=dim,
                                             compressed_embedding={"method": method, "rank": 8,
                                                                   "output": "untied"}))
    init_std = model.config.init_std
    for table in (model.transformer.word_emb.emb_layers[0], model.crit.out_layers[0].table):
        with torch.no_grad():
            assert float(table.materialize().std()) == pytest.approx(init_std, rel=0.02)
    # the projections (ParameterLists too) are still drawn at proj_init_std
    adaptive = TransfoXLLMHeadModel(tiny_config(compressed_embedding={"method": method, "rank": 2}))
    projs = [p for n, p in adaptive.named_parameters() if "_projs." in n]
    assert projs and all(torch.isfinite(p).all() for p in projs)
    std = float(torch.cat([p.detach().flatten() for p in projs]).std())
    assert 0.7 * adaptive.config.proj_init_std < std < 1.3 * adaptive.config.proj_init_std


@pytest.mark.parametrize("output", ["tied", "untied"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compressed_embedding_and_softmax_train(variant, output):
    """The paper's form: one compressed table over the vocabulary, full softmax."""
    spec = {**VARIANTS[variant], "output": output}
    model = tiny_model(noise=0.0, vocab_size=64, cutoffs=[], div_val=1, compressed_embedding=spec)
    table = model.transformer.word_emb.emb_layers[0]
    out = model.crit.out_layers[0]
    assert isinstance(out, compemb.OutputLayer) and out.tied == (output == "tied")
    assert (out.table is table) == (output == "tied")
    assert type(table).__name__ != "Embedding" and table.storage().ratio > 1
    if variant.startswith("dpq"):  # fresh DPQ tables are drawn at the dense tables' init_std
        with torch.no_grad():
            assert 0.2 * 0.02 < float(table.materialize().std()) < 5 * 0.02
    names = [n for n, _ in model.named_parameters()]
    own_table = any(n.startswith("crit.out_layers.0.") and n != "crit.out_layers.0.bias" for n in names)
    assert own_table == (output == "untied")
    # an untied DPQ-VQ softmax learns slowest: words get distinct logits only once their
    # (straight-through) codes move apart (over 9 seeds: 0.31-0.63 of the start in 120 steps)
    slow = (variant, output) == ("dpq-vq", "untied")
    _loss_drops(lambda seed: tiny_model(seed=seed, noise=0.0, vocab_size=64, cutoffs=[], div_val=1,
                                        compressed_embedding=spec),
                steps=120 if slow else 30, factor=0.7 if slow else 0.6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adaptive_form_compresses_each_cluster(variant):
    spec = {**VARIANTS[variant], "output": "tied", "dense_below": 300}
    model = tiny_model(noise=0.0, vocab_size=200, cutoffs=[40, 120], div_val=2,
                       compressed_embedding=spec)
    tables = model.transformer.word_emb.emb_layers
    # clusters: 40 x 16 (640 entries), 80 x 8 (640), 80 x 4 (320): all reach dense_below;
    # a cluster stays dense where the method would not store less than the table, or
    # (a tail cluster) cannot take its shape
    for i, table in enumerate(tables):
        out = model.crit.out_layers[i]
        if type(table) is nn.Embedding:
            assert i > 0 and isinstance(out, nn.Linear) and out.weight is table.weight
            try:
                probe = compemb.build_embedding(VARIANTS[variant], *table.weight.shape)
            except ValueError:
                continue
            assert probe.storage().ratio <= 1
        else:
            assert table.storage().ratio > 1 and out.table is table
    assert type(tables[0]) is not nn.Embedding
    _loss_drops(lambda seed: tiny_model(seed=seed, noise=0.0, vocab_size=200, cutoffs=[40, 120],
                                        div_val=2, compressed_embedding=spec), steps=25)
    small = tiny_model(noise=0.0, vocab_size=200, cutoffs=[40, 120], div_val=2,
                       compressed_embedding={**spec, "dense_below": 641})
    assert all(type(t) is nn.Embedding for t in small.transformer.word_emb.emb_layers)
    if variant == "tt":  # the head cluster must take the method: 40 x 16 in 5 factors cannot
        with pytest.raises(ValueError, match="head cluster of the adaptive input"):
            tiny_model(vocab_size=200, cutoffs=[40, 120], div_val=2,
                       compressed_embedding={"method": "tt", "rank": 2, "num_factors": 5})


def test_apply_compressed_embedding_hook_and_round_trip(tmp_path):
    model = tiny_model()
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="unknown option"):
        model.apply_compressed_embedding({"method": "dpq", "ranks": 3})
    with pytest.raises(ValueError, match="output"):
        model.apply_compressed_embedding(VARIANTS["dpq-sx"], output="both")
    assert model.state_dict().keys() == dense_state.keys()  # unchanged after the errors
    assert all(torch.equal(v, dense_state[k]) for k, v in model.state_dict().items())

    built = model.apply_compressed_embedding(VARIANTS["dpq-sx"], output="untied")
    assert sorted(built) == sorted([f"transformer.word_emb.emb_layers.{i}" for i in range(3)]
                                   + [f"crit.out_layers.{i}.embedding" for i in range(3)])
    assert model.config.compressed_embedding == {**VARIANTS["dpq-sx"], "output": "untied", "dense_below": 0}
    tables = model.transformer.word_emb.emb_layers
    assert type(tables[0]).__name__ == "DPQEmbedding"
    assert model.crit.out_layers[0].table is not tables[0]
    # biases and the rest of the model are kept
    torch.testing.assert_close(model.crit.out_layers[0].bias, dense_state["crit.out_layers.0.bias"])
    with pytest.raises(ValueError, match="already has compressed tables"):
        model.apply_compressed_embedding(VARIANTS["dpq-sx"])

    model.save_pretrained(tmp_path)
    loaded = TransfoXLLMHeadModel.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        a, b = model(x), loaded(x)
    torch.testing.assert_close(a.logits, b.logits)


def test_compemb_hf_compress_takes_the_models_hook(tmp_path):
    """compemb_hf.compress / from_pretrained(compressed_embedding=) go through
    apply_compressed_embedding; the checkpoint reloads compressed."""
    import compemb_hf

    model = tiny_model()
    x = torch.randint(0, 40, (2, 6))
    compemb_hf.compress(model, compemb_hf.CompressedEmbeddingConfig(method="tt", rank=4))
    tables = model.transformer.word_emb.emb_layers
    # 10 x 16 is compressed; 14 x 8 at rank 4 would not be smaller, 16 x 4 has no 3 factors
    assert [type(t).__name__ for t in tables] == ["TTEmbedding", "Embedding", "Embedding"]
    assert model.crit.out_layers[0].table is tables[0]  # output None -> tied
    assert model.crit.out_layers[1].weight is tables[1].weight
    assert model.config.compressed_embedding is None  # recorded as the quantization config
    with torch.no_grad():
        want = model(x).logits
    model.save_pretrained(tmp_path)
    loaded = TransfoXLLMHeadModel.from_pretrained(tmp_path).eval()
    assert type(loaded.transformer.word_emb.emb_layers[0]).__name__ == "TTEmbedding"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, want)
    with pytest.raises(ValueError, match="modules"):
        compemb_hf.compress(tiny_model(), compemb_hf.CompressedEmbeddingConfig(
            method="tt", rank=4, modules=["transformer.word_emb.emb_layers.0"]))


@pytest.mark.parametrize("variant", [None, "tt"])
def test_bf16_autocast_and_bf16_weights(variant):
    spec = None if variant is None else {**VARIANTS[variant], "output": "tied"}
    model = tiny_model(compressed_embedding=spec).train()
    x = torch.randint(0, 40, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = model(x, labels=x)
        second = model(x, mems=first.mems, labels=x)
    second.loss.backward()
    assert torch.isfinite(second.loss) and second.loss.dtype == torch.float32
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    half = tiny_model(compressed_embedding=spec).to(torch.bfloat16)
    with torch.no_grad():
        ref = tiny_model(compressed_embedding=spec)(x).logits
        out = half(x).logits
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.25
