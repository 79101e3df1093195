"""DPQ statistics under torch.distributed (two CPU processes on gloo): a training-mode
forward that only one process runs must not wait for the others when the all-reduce is
off (``sync_statistics=False``) or limited to a group of the processes that run it
(``process_group``); it then equals the same forward in a single process."""
import datetime
import os
import tempfile

import pytest
import torch

from compemb import DPQEmbedding

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)

V, J = 30, 12


def _layer(variant, **kw):
    torch.manual_seed(0)
    return DPQEmbedding(V, J, 6, 3, variant=variant, **kw).train()


def _step(layer):
    """A training forward and backward of a fixed batch: output, gradients, running mean."""
    ids = torch.randint(V, (4, 7), generator=torch.Generator().manual_seed(1))
    out = layer(ids)
    (out * torch.linspace(-1, 1, J)).sum().backward()
    return {"out": out.detach(), "running_mean": layer.running_mean.clone(),
            **{n: p.grad.clone() for n, p in layer.named_parameters()}}


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    # a short timeout: a forward that wrongly all-reduces fails instead of hanging the suite
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=20))
    try:
        only_rank0 = dist.new_group([0])  # every process takes part in creating a group
        results = {}
        if rank == 0:  # rank 1 runs no forward at all
            for variant in ("sx", "vq"):
                layer = _layer(variant, sync_statistics=False)
                assert not layer._synced()
                results[f"{variant}-off"] = _step(layer)
                layer = _layer(variant, process_group=only_rank0)
                assert not layer._synced()
                results[f"{variant}-group"] = _step(layer)
                assert _layer(variant)._synced()  # the default: the world, 2 processes
            torch.save(results, os.path.join(out_dir, "rank0.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_forward_run_by_one_process_only_completes_without_the_all_reduce():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        results = torch.load(os.path.join(tmp, "rank0.pt"))
    for variant in ("sx", "vq"):
        expected = _step(_layer(variant))  # one process, no torch.distributed
        for mode in ("off", "group"):
            got = results[f"{variant}-{mode}"]
            assert sorted(got) == sorted(expected)
            for name, value in expected.items():
                torch.testing.assert_close(got[name], value, msg=f"{variant}-{mode} {name}")


def test_sync_statistics_must_be_a_bool_and_the_group_survives_copies():
    import copy
    import pickle

    with pytest.raises(ValueError, match="sync_statistics must be True"):
        DPQEmbedding(V, J, 6, 3, sync_statistics="no")
    marker = object()  # stands for a process group: not copyable, not picklable
    layer = DPQEmbedding(V, J, 6, 3, process_group=marker)
    assert copy.deepcopy(layer).process_group is marker
    assert pickle.loads(pickle.dumps(layer)).process_group is None
    assert not layer._synced()  # torch.distributed not initialised here
