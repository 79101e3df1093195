"""DPQEmbedding: straight-through training, distance normalisation (incl. synchronised
across processes), export, from_dense, planning, errors, round trips."""
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from compemb.dpq import CODEBOOK_LOSS_WEIGHT, CodebookEmbedding, DPQConfig, DPQEmbedding, plan_dpq
from compemb.dpq.math import dpq_ratio, kmeans
from compemb.registry import get_method
from compemb.spec import EmbeddingSpec, build_embedding, compress_embedding

VARIANTS = [("sx", False), ("sx", True), ("vq", False), ("vq", True)]


def _layer(variant="sx", shared=False, V=40, d=12, K=6, D=3, **kw):
    torch.manual_seed(0)
    return DPQEmbedding(V, d, K, D, variant=variant, shared_subspace=shared, **kw)


def _ids(V=40, shape=(5, 9), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(V, shape, generator=g)


def _reference(layer, idx, target, stats=None):
    """The method written out plainly, token by token (no de-duplication): scores, batch
    normalisation over the tokens (or by ``stats = (mean, var)``, constants), argmax,
    straight-through output, the VQ codebook loss added to the task loss. Returns
    (output, total loss)."""
    D, K = layer.num_groups, layer.num_codes
    keep = (idx != layer.padding_idx) if layer.padding_idx is not None else torch.ones_like(idx, dtype=torch.bool)
    flat, keepf = idx.reshape(-1), keep.reshape(-1)
    q = layer.query[flat].view(len(flat), D, -1)  # [N, D, s]
    vals = layer.values.expand(D, -1, -1)
    keys = layer.keys.expand(D, -1, -1)
    if layer.variant == "sx":
        scores = torch.einsum("nds,dks->ndk", q, keys)
    else:
        scores = -((q.unsqueeze(2) - keys.unsqueeze(0)) ** 2).sum(-1)
    if layer.running_mean is not None:
        if stats is None:
            sel = scores[keepf]
            mean, var = sel.mean(0), sel.var(0, unbiased=False)
        else:
            mean, var = (t.detach().clone() for t in stats)
        scores = (scores - mean) / torch.sqrt(var + layer.eps)
    codes = scores.argmax(-1)  # [N, D]
    onehot = F.one_hot(codes, K).to(scores.dtype)
    hard_rows = torch.einsum("ndk,dks->nds", onehot, vals)
    extra = 0.0
    if layer.variant == "sx":
        p = torch.softmax(scores / layer.config.temperature, -1)
        w = p - (p - onehot).detach()
        out = torch.einsum("ndk,dks->nds", w, vals)
    else:
        out = q + (hard_rows - q).detach()
        n = keepf.sum() * layer.embedding_dim
        extra = (CODEBOOK_LOSS_WEIGHT * ((hard_rows - q.detach()) ** 2)[keepf].sum() / n
                 + layer.config.commitment * ((hard_rows.detach() - q) ** 2)[keepf].sum() / n)
    out = out.reshape(len(flat), -1) * keepf.unsqueeze(1)
    out = out.view(*idx.shape, -1)
    return out, (out * target).sum() + extra


@pytest.mark.parametrize("variant,shared", VARIANTS)
@pytest.mark.parametrize("padding", [None, 3])
def test_training_forward_and_gradients_match_the_method(variant, shared, padding):
    layer = _layer(variant, shared, padding_idx=padding, commitment=0.25 if variant == "vq" else 0.0)
    idx = _ids()
    idx[0, :3] = 3  # repeats, and padding tokens when padding=3
    target = torch.randn(*idx.shape, layer.embedding_dim, generator=torch.Generator().manual_seed(2))
    ref_out, ref_loss = _reference(layer, idx, target)
    ref_grads = torch.autograd.grad(ref_loss, list(layer.parameters()))
    out = layer(idx)
    # forward: exactly codebook rows (zero for padding)
    rows = out.reshape(-1, layer.num_groups, layer.embedding_dim // layer.num_groups)
    for book in range(layer.num_groups):
        table = layer.values[0 if shared else book]
        match = (rows[:, book].unsqueeze(1) == table.unsqueeze(0)).all(-1).any(1)
        if padding is not None:
            match |= (idx.reshape(-1) == padding)
        assert match.all()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    (out * target).sum().backward()  # a plain backward: the VQ codebook loss is injected
    names = [n for n, _ in layer.named_parameters()]
    for name, p, g in zip(names, layer.parameters(), ref_grads):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5, msg=name)
    expected = {"sx": {"query", "values", "key_weight"}, "vq": {"query", "values"}}[variant]
    assert set(names) == expected
    if padding is not None:
        assert layer.query.grad[padding].abs().sum() == 0
        assert (out[idx == padding] == 0).all()


@pytest.mark.parametrize("variant,shared", VARIANTS)
@pytest.mark.parametrize("padding", [None, 3])
def test_training_logits_train_the_codes_as_eval_scores_them(variant, shared, padding):
    """A softmax in training (tied or untied; ``logits`` or ``materialize``, as an adaptive
    softmax uses): the table is the layer's training output
    for every symbol with the codes eval uses (running statistics, left unchanged), and
    the gradient reaches the queries and keys, not only the values."""
    layer = _layer(variant, shared, padding_idx=padding, commitment=0.25 if variant == "vq" else 0.0)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for step in range(3):  # running statistics away from their start
        opt.zero_grad()
        layer(_ids(seed=10 + step)).pow(2).mean().backward()
        opt.step()
    opt.zero_grad()
    stats = (layer.running_mean.clone(), layer.running_var.clone())
    hidden = torch.randn(7, layer.embedding_dim, generator=torch.Generator().manual_seed(5))
    grad = torch.randn(7, layer.num_embeddings, generator=torch.Generator().manual_seed(6))
    ids = torch.arange(layer.num_embeddings)
    ref_table, ref_loss = _reference(layer, ids, grad.t() @ hidden, stats=stats)
    ref_grads = torch.autograd.grad(ref_loss, list(layer.parameters()))
    torch.testing.assert_close(layer.materialize(), ref_table, rtol=1e-6, atol=1e-6)  # the same table
    logits = layer.logits(hidden)
    assert torch.equal(layer.running_mean, stats[0]) and torch.equal(layer.running_var, stats[1])
    torch.testing.assert_close(logits, hidden @ ref_table.t(), rtol=1e-5, atol=1e-5)
    (logits * grad).sum().backward()
    for (name, p), g in zip(layer.named_parameters(), ref_grads):
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5, msg=name)
    if padding is not None:
        assert (logits[:, padding] == 0).all() and layer.query.grad[padding].abs().sum() == 0
    layer.eval()  # eval scores with the same codes: the same logits, by per-group products
    with torch.no_grad():
        torch.testing.assert_close(layer.logits(hidden), logits.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant,shared", [("sx", False), ("sx", True), ("vq", False)])
@pytest.mark.parametrize("distance_norm,temperature", [(False, 1.0), (True, 0.5), (False, 0.3)])
def test_gradients_without_normalisation_and_with_temperature(variant, shared, distance_norm,
                                                              temperature):
    if variant == "vq":  # DPQ-VQ has no temperature (any other value is refused)
        temperature = 1.0
    layer = _layer(variant, shared, padding_idx=3, distance_norm=distance_norm,
                   temperature=temperature)
    idx = _ids()
    idx[1, :4] = 3
    target = torch.randn(*idx.shape, 12, generator=torch.Generator().manual_seed(4))
    ref_out, ref_loss = _reference(layer, idx, target)
    ref_grads = torch.autograd.grad(ref_loss, list(layer.parameters()))
    out = layer(idx)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    (out * target).sum().backward()
    for (name, p), g in zip(layer.named_parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("variant,shared", VARIANTS)
def test_group_blocks_give_the_same_result(variant, shared, monkeypatch):
    """Scores are processed a few groups at a time; one group per block must give what
    the method gives (outputs, gradients, running statistics)."""
    import compemb.dpq.layer as layer_module
    monkeypatch.setattr(layer_module, "_CHUNK_ELEMENTS", 1)
    layer = _layer(variant, shared, padding_idx=3, D=4, d=16)
    idx = _ids()
    target = torch.randn(*idx.shape, 16, generator=torch.Generator().manual_seed(4))
    ref_out, ref_loss = _reference(layer, idx, target)
    ref_grads = torch.autograd.grad(ref_loss, list(layer.parameters()))
    twin = _layer(variant, shared, padding_idx=3, D=4, d=16)
    twin(idx)  # one block (the default size holds all groups here)
    out = layer(idx)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    (out * target).sum().backward()
    for (name, p), g in zip(layer.named_parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(layer.running_mean, twin.running_mean)
    torch.testing.assert_close(layer.running_var, twin.running_var)
    layer.eval()
    monkeypatch.setattr(layer_module, "_CHUNK_ELEMENTS", 1 << 20)
    one_block = layer.codes()
    monkeypatch.setattr(layer_module, "_CHUNK_ELEMENTS", 1)
    assert torch.equal(layer.codes(), one_block)


def test_vq_values_learn_only_through_the_injected_codebook_loss():
    layer = _layer("vq")
    idx = _ids()
    out = layer(idx)
    out.sum().backward()  # task loss gives values nothing directly (straight-through)
    q = layer.query.detach()[idx.reshape(-1)].view(-1, 3, 4)
    vc = out.detach().reshape(-1, 3, 4)
    expected = torch.zeros_like(layer.values)
    n = idx.numel() * layer.embedding_dim
    for g in range(3):  # d/dV of mean ||V[c] - q||^2
        hit = (vc[:, g].unsqueeze(1) == layer.values.detach()[g].unsqueeze(0)).all(-1)  # [N, K]
        expected[g] = 2 * hit.float().t() @ (vc[:, g] - q[:, g]) / n
    torch.testing.assert_close(layer.values.grad, CODEBOOK_LOSS_WEIGHT * expected)
    torch.testing.assert_close(layer.codebook_loss, ((vc - q) ** 2).mean())


@pytest.mark.parametrize("variant", ["sx", "vq"])
def test_deduplicated_and_tokenwise_paths_agree(variant, monkeypatch):
    a, b = _layer(variant, padding_idx=0), _layer(variant, padding_idx=0)
    idx = _ids(shape=(8, 16))
    idx[:, :4] = 7
    idx[0, 0] = 0
    out_a = a(idx)
    monkeypatch.setattr(DPQEmbedding, "_dedup", staticmethod(lambda flat: False))
    out_b = b(idx)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    out_a.pow(2).sum().backward()
    out_b.pow(2).sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.running_mean, b.running_mean)
    torch.testing.assert_close(a.running_var, b.running_var)


def test_running_statistics_follow_the_batch_and_drive_eval():
    layer = _layer("sx")
    idx = _ids(shape=(200,))
    layer(idx)
    q = layer.query.detach()[idx].view(200, 3, 4)
    scores = torch.einsum("nds,dks->ndk", q, layer.keys.detach())
    torch.testing.assert_close(layer.running_mean, 0.1 * scores.mean(0))
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * scores.var(0, unbiased=True))
    layer.eval()
    normed = (scores - layer.running_mean) / torch.sqrt(layer.running_var + layer.eps)
    torch.testing.assert_close(layer.codes()[idx], normed.argmax(-1), rtol=0, atol=0)
    assert "running_mean" in layer.state_dict() and "running_var" in layer.state_dict()


@pytest.mark.parametrize("variant,shared", VARIANTS)
@pytest.mark.parametrize("distance_norm", [True, False])
def test_export_forward_equals_eval_forward_exactly(variant, shared, distance_norm):
    layer = _layer(variant, shared, V=60, d=16, K=16, D=4, padding_idx=5,
                   distance_norm=distance_norm)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for step in range(3):  # move the parameters and the running statistics
        opt.zero_grad()
        layer(_ids(60, (4, 10), seed=step)).pow(2).mean().backward()
        opt.step()
    layer.eval()
    exported = layer.export()
    assert isinstance(exported, CodebookEmbedding)
    assert exported.packed_codes.dtype == torch.uint8
    assert exported.packed_codes.numel() == 60 * 4 * 4 // 8
    idx = torch.arange(60).view(6, 10)
    assert torch.equal(exported(idx), layer(idx))
    assert torch.equal(exported.codes(), layer.codes())
    assert torch.equal(exported.materialize(), layer.materialize())
    assert exported.storage().stored_bytes == layer.storage().stored_bytes
    hidden = torch.randn(3, 7, 16)
    torch.testing.assert_close(layer.logits(hidden), hidden @ layer.materialize().T)
    torch.testing.assert_close(exported.logits(hidden), hidden @ exported.materialize().T)


def test_codes_shape_and_range():
    layer = _layer("vq", V=37, K=5)
    codes = layer.codes()
    assert codes.shape == (37, 3) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 5


@pytest.mark.parametrize("V,d,K,D,shared", [(1000, 64, 16, 8, False), (500, 30, 7, 5, False),
                                            (1000, 64, 256, 16, True), (3, 4, 2, 4, False)])
def test_storage_ratio_formula(V, d, K, D, shared):
    layer = DPQEmbedding(V, d, K, D, shared_subspace=shared)
    bits = (K - 1).bit_length()
    values = (1 if shared else D) * K * (d // D)
    expected_bytes = -(-V * D * bits // 8) + 4 * values
    s = layer.storage()
    assert s.stored_bytes == expected_bytes and s.dense_bytes == 4 * V * d
    assert s.stored_parameters == values and s.method == "dpq-sx"
    assert s.ratio == pytest.approx(dpq_ratio(V, d, K, D, shared))
    if (V * D * bits) % 8 == 0 and not shared:  # METHODS.md: 32Vd / (V D log2 K + 32 K d)
        assert s.ratio == pytest.approx(32 * V * d / (V * D * bits + 32 * K * d))
    assert layer.export().storage().stored_bytes == s.stored_bytes


def test_kmeans_is_deterministic_and_finds_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(2, 4, 3, generator=g) * 10
    labels = torch.randint(4, (2, 200), generator=g)
    points = centres.gather(1, labels.unsqueeze(-1).expand(-1, -1, 3)) + 0.01 * torch.randn(2, 200, 3, generator=g)
    c1, a1 = kmeans(points, 4, generator=torch.Generator().manual_seed(5))
    c2, a2 = kmeans(points, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(c1, c2) and torch.equal(a1, a2)
    for b in range(2):  # every true centre recovered
        dist = torch.cdist(centres[b], c1[b]).min(1).values
        assert (dist < 0.1).all()
    c3, _ = kmeans(points[:, :3], 4, init="random", generator=torch.Generator().manual_seed(1))
    assert c3.shape == (2, 4, 3)  # fewer points than clusters still works


@pytest.mark.parametrize("variant,shared", VARIANTS)
def test_from_dense_beats_random_codebooks(variant, shared):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 16, generator=g) @ torch.randn(16, 16, generator=g)
    layer = DPQEmbedding.from_dense(weight, num_codes=16, num_groups=4, variant=variant,
                                    shared_subspace=shared, padding_idx=0,
                                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(layer.query.detach(), weight)
    layer.eval()
    err = (layer.materialize() - weight)[1:].pow(2).sum()
    # the eval codes are the nearest centroids (k-means assignment)
    sub = weight.view(300, 4, 4)
    books = layer.values.detach().expand(4, -1, -1)
    nearest = torch.cdist(sub.transpose(0, 1), books).argmin(-1).t()
    assert torch.equal(layer.codes()[1:], nearest[1:])
    # random codebooks (rows drawn from the table), nearest assignment
    pick = torch.randperm(300, generator=g)[:16]
    rand_books = sub[pick].transpose(0, 1) if not shared else sub.reshape(-1, 4)[pick].unsqueeze(0).expand(4, -1, -1)
    rand_codes = torch.cdist(sub.transpose(0, 1), rand_books).argmin(-1)  # [D, V]
    rand_rows = torch.stack([rand_books[k][rand_codes[k]] for k in range(4)], 1).reshape(300, 16)
    rand_err = (rand_rows - weight)[1:].pow(2).sum()
    assert err < 0.8 * rand_err
    assert (layer.materialize()[0] == 0).all()


def test_padding_row_is_zero_and_gets_no_gradient():
    layer = _layer("sx", padding_idx=2)
    idx = torch.tensor([[2, 1, 2, 4]])
    out = layer(idx)
    assert (out[0, 0] == 0).all() and (out[0, 2] == 0).all() and out[0, 1].abs().sum() > 0
    out.sum().backward()
    assert (layer.query.grad[2] == 0).all()
    layer.eval()
    assert (layer(idx)[0, 0] == 0).all() and (layer.export()(idx)[0, 0] == 0).all()
    assert DPQEmbedding(10, 4, 2, 2, padding_idx=-1).padding_idx == 9


@pytest.mark.parametrize("variant", ["sx", "vq"])
def test_empty_and_all_padding_batches_leave_statistics_alone(variant):
    layer = _layer(variant, padding_idx=0)
    before = layer.running_mean.clone(), layer.running_var.clone()
    empty = layer(torch.zeros(0, 3, dtype=torch.long))
    assert empty.shape == (0, 3, 12)
    out = layer(torch.zeros(2, 5, dtype=torch.long))
    assert (out == 0).all()
    (out.sum() + empty.sum()).backward()
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])
    assert (layer.query.grad == 0).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_codes=1), "num_codes must be an integer >= 2"),
    (dict(num_groups=5), r"num_groups=5 must divide embedding_dim=12; divisors .*\[1, 2, 3, 4, 6, 12\]"),
    (dict(variant="gumbel"), r"variant must be one of \['sx', 'vq'\]"),
    (dict(temperature=0.0), "temperature must be a number > 0"),
    (dict(temperature=-1.0), "temperature must be a number > 0"),
    (dict(commitment=-0.1, variant="vq"), "commitment must be a number >= 0"),
    # options the variant ignores are refused, naming the option
    (dict(variant="vq", temperature=0.5), r"temperature=0.5 has no effect with variant='vq'"),
    (dict(commitment=0.25), r"commitment=0.25 has no effect with variant='sx'"),
    (dict(padding_idx=40), "padding_idx must be an integer in"),
])
def test_bad_arguments(kwargs, match):
    args = dict(num_embeddings=40, embedding_dim=12, num_codes=4, num_groups=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        DPQEmbedding(**args)


def test_bad_indices():
    layer = _layer()
    with pytest.raises(ValueError, match="integer tensor"):
        layer(torch.tensor([1.0, 2.0]))
    with pytest.raises(IndexError, match="out of range"):
        layer(torch.tensor([0, 40]))
    with pytest.raises(IndexError, match="out of range"):
        layer(torch.tensor([-1]))


def test_state_dict_and_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file
    layer = _layer("vq", padding_idx=1)
    layer(_ids())  # running statistics move
    state = layer.state_dict()
    assert set(state) == {"query", "values", "running_mean", "running_var"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "dpq.safetensors"))
    other = DPQEmbedding(40, 12, 6, 3, variant="vq", padding_idx=1)
    other.load_state_dict(load_file(str(tmp_path / "dpq.safetensors")))
    layer.eval(), other.eval()
    idx = _ids()
    assert torch.equal(layer(idx), other(idx))
    assert torch.equal(other.running_mean, layer.running_mean)


def test_state_dict_of_another_shape_names_both_shapes():
    layer = _layer("sx")
    other = DPQEmbedding(40, 12, 8, 3)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"values has shape \(3, 6, 4\) in the checkpoint but \(3, 8, 4\)"):
        other.load_state_dict(layer.state_dict())
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("variant", ["sx", "vq"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_computes_in_float32(variant, dtype):
    layer = _layer(variant)
    idx = _ids()
    ref = layer(idx)
    layer2 = _layer(variant)
    with torch.autocast("cpu", dtype=dtype):
        out = layer2(idx)
        logits = layer2.logits(torch.randn(2, 12))
    assert out.dtype == torch.float32 and logits.dtype == torch.float32
    assert torch.equal(out, ref)
    out.sum().backward()
    assert layer2.query.grad is not None


@pytest.mark.parametrize("variant", ["sx", "vq"])
def test_torch_compile_matches_eager(variant):
    layer = _layer(variant, padding_idx=0)
    twin = _layer(variant, padding_idx=0)
    idx = _ids(shape=(3, 5))
    idx[0, 0] = 0
    compiled = torch.compile(twin, backend="aot_eager")
    out_e, out_c = layer(idx), compiled(idx)
    torch.testing.assert_close(out_c, out_e)
    out_e.pow(2).sum().backward()
    out_c.pow(2).sum().backward()
    for pe, pc in zip(layer.parameters(), twin.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-5)
    layer.eval(), twin.eval()
    torch.testing.assert_close(compiled(idx), layer(idx))


def test_registered_with_config_and_plan():
    method = get_method("dpq")
    assert method.config_cls is DPQConfig and method.layer_cls is DPQEmbedding
    spec = EmbeddingSpec("dpq", {"num_codes": 16, "num_groups": 4, "variant": "vq"})
    layer = build_embedding(spec, 50, 8, padding_idx=0)
    assert isinstance(layer, DPQEmbedding) and layer.variant == "vq" and layer.padding_idx == 0
    assert EmbeddingSpec.from_json(spec.to_json()).config == spec.config
    dense = torch.randn(50, 8)
    assert compress_embedding(spec, dense).query.detach().equal(dense)
    with pytest.raises(ValueError, match="variant must be one of"):
        EmbeddingSpec("dpq", {"variant": "xx"})
    for target in (4, 20, 64, 150):
        cfg = method.plan(32768, 1024, target)
        assert dpq_ratio(32768, 1024, cfg.num_codes, cfg.num_groups) >= target
        assert cfg.num_codes & (cfg.num_codes - 1) == 0 and 1024 % cfg.num_groups == 0
    # most code bits: no admissible setting with more bits per symbol reaches the target
    cfg = plan_dpq(32768, 1024, 50)
    bits = cfg.num_groups * (cfg.num_codes - 1).bit_length()
    for D in (8, 16, 32, 64, 128, 256, 512):
        for b in range(1, 9):
            if D * b > bits:
                assert dpq_ratio(32768, 1024, 2 ** b, D) < 50
    with pytest.raises(ValueError, match="largest reachable"):
        plan_dpq(100, 8, 1000)


# --------------------------------------------------------------------------- two processes

def _worker(rank, world, init_file, result_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for variant in ("sx", "vq"):
            torch.manual_seed(0)
            layer = DPQEmbedding(40, 12, 6, 3, variant=variant, padding_idx=0)
            model = DDP(layer)
            idx, target = _sync_batch()
            half = idx.shape[0] // world
            mine = slice(rank * half, (rank + 1) * half)
            out = model(idx[mine])
            loss = (out * target[mine]).sum(-1).mean()
            loss.backward()
            # the inference form under DDP: uint8 packed codes are broadcast without trouble
            layer.eval()
            exported = DDP(layer.export())
            rows = exported(idx[mine])
            torch.save({"out": out.detach(), "grads": [p.grad for p in layer.parameters()],
                        "mean": layer.running_mean, "var": layer.running_var,
                        "rows": rows.detach()},
                       os.path.join(result_dir, f"{variant}{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _sync_batch():
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(40, (8, 6), generator=g)
    idx[0, :4] = 0  # padding, unevenly spread over the two processes
    idx[5, :3] = 7
    return idx, torch.randn(8, 6, 12, generator=g)


def test_distance_norm_is_synchronised_across_processes():
    """Two processes (gloo, DDP) on halves of a batch give the outputs, gradients and
    running statistics of one process on the whole batch, for SX and VQ (whose codebook
    loss is a mean over the global batch's tokens)."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        runs = {v: [torch.load(os.path.join(tmp, f"{v}{r}.pt")) for r in range(2)]
                for v in ("sx", "vq")}
    for variant, results in runs.items():
        torch.manual_seed(0)
        layer = DPQEmbedding(40, 12, 6, 3, variant=variant, padding_idx=0)
        idx, target = _sync_batch()
        out = layer(idx)  # one process, the whole batch
        (out * target).sum(-1).mean().backward()
        torch.testing.assert_close(torch.cat([r["out"] for r in results]), out.detach(),
                                   rtol=1e-5, atol=1e-6)
        for r in results:  # DDP averaged the gradients: every process holds the global ones
            for g, p in zip(r["grads"], layer.parameters()):
                torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(r["mean"], layer.running_mean)
            torch.testing.assert_close(r["var"], layer.running_var)
        layer.eval()
        torch.testing.assert_close(torch.cat([r["rows"] for r in results]),
                                   layer.export()(idx), rtol=0, atol=0)


def test_reset_parameters_with_a_std_scales_the_tables_and_keeps_padding():
    torch.manual_seed(0)
    layer = DPQEmbedding(2000, 32, num_codes=16, num_groups=8, padding_idx=3)
    layer.reset_parameters(std=0.05)
    for p in (layer.query, layer.values, layer.key_weight):
        assert abs(p.detach().std().item() - 0.05) < 0.005
    assert torch.all(layer.query[3] == 0)
    with pytest.raises(ValueError, match="std must be > 0"):
        layer.reset_parameters(std=0.0)


def test_options_the_variant_uses_are_accepted_at_their_defaults():
    """The defaults (what saved configs hold for every option) pass for both variants."""
    assert DPQConfig(variant="vq", temperature=1.0, commitment=0.5).commitment == 0.5
    assert DPQConfig(variant="sx", temperature=0.5, commitment=0.0).temperature == 0.5
    assert DPQConfig(variant="vq", temperature=1).variant == "vq"


# ---------------------------------------------------------------------- eval code cache

def _fresh_codes(layer):
    return layer._compute_codes(8192)


@pytest.mark.parametrize("variant", ["sx", "vq"])
def test_eval_codes_are_cached_until_a_parameter_changes(variant, monkeypatch):
    layer = _layer(variant, commitment=0.0).eval()
    calls = []
    compute = DPQEmbedding._compute_codes
    monkeypatch.setattr(DPQEmbedding, "_compute_codes",
                        lambda self, chunk: calls.append(1) or compute(self, chunk))
    hidden = torch.randn(4, 12)
    first = layer.logits(hidden)
    codes = layer.codes()
    layer.materialize()
    assert len(calls) == 1 and layer.codes() is codes  # one computation for all of them
    # an optimizer step in eval mode (in place: version counters) invalidates it
    opt = torch.optim.SGD(layer.parameters(), lr=5.0)
    layer.zero_grad()
    layer.query.grad = torch.randn_like(layer.query)
    layer.values.grad = torch.zeros_like(layer.values)
    if layer.key_weight is not None:
        layer.key_weight.grad = torch.randn_like(layer.key_weight)
    opt.step()
    after = layer.codes()
    assert len(calls) == 2 and torch.equal(after, compute(layer, 8192))
    assert not torch.equal(after, codes)  # the step did move some codes
    torch.testing.assert_close(layer.logits(hidden), layer.export().logits(hidden))
    assert not torch.allclose(layer.logits(hidden), first)


def test_eval_code_cache_is_dropped_by_train_load_state_dict_and_to():
    layer = _layer().eval()
    codes = layer.codes()
    layer.train()
    assert "_codes_cache" not in layer.__dict__
    # training-mode forwards move the running statistics; eval codes follow them
    for seed in range(3):
        layer(_ids(seed=seed))
    layer.eval()
    assert torch.equal(layer.codes(), _fresh_codes(layer))
    other = _layer()
    with torch.no_grad():
        other.query.mul_(-1)
    other.eval()
    layer.codes()
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer.codes(), _fresh_codes(other))
    assert not torch.equal(layer.codes(), codes)
    cached = layer.codes()
    layer.double()
    assert layer.codes() is not cached and torch.equal(layer.codes(), cached)


def test_no_code_cache_in_training_mode():
    layer = _layer().train()
    with torch.no_grad():
        a = layer.codes()
    assert "_codes_cache" not in layer.__dict__ and layer.codes() is not a
