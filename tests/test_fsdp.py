"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over the compressed layers, two CPU
processes on gloo: training matches one process on the whole batch, whether a table is
part of a larger unit or a unit of its own (what a size-based wrap policy, as in
recipes/accelerate/fsdp.yaml, does to a large table) and whether a softmax is tied to the
input table or has its own."""
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compemb import DPQEmbedding, OutputLayer, TREmbedding, TTEmbedding

dist = pytest.importorskip("torch.distributed")
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not dist.is_available() or not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch build has no FSDP2", allow_module_level=True)

V, J, STEPS = 60, 16, 3


class TwoHeads(nn.Module):
    """TT, TR and DPQ-VQ inputs; a softmax tied to the TT table and an untied DPQ-SX one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tt = TTEmbedding(V, J, 4)
        self.tr = TREmbedding(V, J, 3)
        self.vq = DPQEmbedding(V, J, 8, 4, variant="vq", padding_idx=0)
        self.mix = nn.Linear(J, J)
        self.tied = OutputLayer(self.tt, bias=True, tied=True)
        self.untied = OutputLayer(DPQEmbedding(V, J, 8, 4, variant="sx"), tied=False)

    def forward(self, ids, target):
        h = self.mix(self.tt(ids) + self.tr(ids) + self.vq(ids))
        return (F.cross_entropy(self.tied(h).flatten(0, -2), target.flatten())
                + F.cross_entropy(self.untied(h).flatten(0, -2), target.flatten()))


def _batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(V, (8, 5), generator=g)
    ids[1, :3] = 0  # padding rows of the DPQ table, on one process only
    return ids, torch.randint(V, (8, 5), generator=g)


def _train(model, ids, target):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(STEPS):
        loss = model(ids, target)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _worker(rank, world, init_file, out_dir):
    from torch.distributed.fsdp import fully_shard
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ids, target = _batch()
        mine = slice(rank * 8 // world, (rank + 1) * 8 // world)
        for layout in ("root", "units"):
            model = TwoHeads()
            if layout == "units":
                for unit in (model.tt, model.tr, model.vq, model.untied.embedding, model.mix):
                    fully_shard(unit)
            fully_shard(model)
            _train(model, ids[mine], target[mine])
            state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                     for k, v in model.state_dict().items()}
            if rank == 0:
                torch.save(state, os.path.join(out_dir, f"{layout}.pt"))
        # both ranks done before either tears down: a rank destroying the group while the
        # other's gloo threads still run aborted the other (seen once in CI, SIGABRT)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fully_shard_training_matches_one_process():
    import torch.multiprocessing as mp
    reference = TwoHeads()
    _train(reference, *_batch())
    expected = reference.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        for layout in ("root", "units"):
            state = torch.load(os.path.join(tmp, f"{layout}.pt"))
            assert sorted(state) == sorted(expected), layout
            for name, value in expected.items():
                assert torch.allclose(state[name].float(), value.float(), atol=1e-5, rtol=1e-4), \
                    (layout, name, (state[name].float() - value.float()).abs().max())
    # the steps moved every table (a frozen parameter would match trivially)
    start = TwoHeads().state_dict()
    for name in ("tt.cores.0", "tr.cores.1", "vq.query", "vq.values", "untied.embedding.key_weight"):
        assert not torch.allclose(start[name], expected[name]), name
