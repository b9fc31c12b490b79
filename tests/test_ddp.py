"""MSQController under DistributedDataParallel: every rank makes the same decisions.

Two CPU processes (gloo) train one prepared model wrapped in DDP, each on DIFFERENT data, and
run Algorithm 1's pruning on their own Hessian batches. The controller unwraps DDP and averages
each Hutchinson sample across ranks, so traces, Omega, p and bits agree on every rank. DDP runs
with ``forward_sync_buffers=False`` so a rank's bit widths come from its own controller only (with
the default, rank 0's buffers would overwrite the others' at the next forward and hide a
divergence).
Results come back through files in tmp_path.
"""
from __future__ import annotations

import dataclasses
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import msq_fx
import msq_fx.sensitivity
from msq_fx.training import train_epoch

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available")

WORLD_SIZE = 2
EPOCHS = 2
#: min == max samples: every rank draws the same number of probes with or without the all-reduce,
#: so the all-reduced trace is exactly the mean of the per-rank traces.
CONFIG = msq_fx.MSQConfig(target_compression=16.0,
                          pruning=dict(interval=1, threshold=0.6, reg_strength=1e-3),
                          hessian=dict(min_samples=4, max_samples=4))


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16),
                          nn.ReLU(), nn.Linear(16, 4))
    return msq_fx.prepare(model, torch.randn(2, 64), CONFIG)


def rank_batches(rank: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1000 + rank)  # different data on every rank
    return [(torch.randn(32, 64, generator=generator),
             torch.randint(4, (32,), generator=generator)) for _ in range(count)]


def traces(records) -> list[float]:
    return [r.hessian_trace for r in records]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        result: dict = {}
        # 1. DDP training with the controller given the DDP wrapper.
        qmodel = make_model()
        ddp = nn.parallel.DistributedDataParallel(qmodel, forward_sync_buffers=False)
        controller = msq_fx.MSQController(ddp)
        result["unwrapped"] = controller.model is qmodel
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        train_data, hessian_data = rank_batches(rank, 3), rank_batches(rank + 10, 1)
        for epoch in range(1, EPOCHS + 1):
            train_epoch(ddp, train_data, optimizer, controller)
            controller.epoch_end(epoch, hessian_data, F.cross_entropy)
        result["history"] = [dataclasses.asdict(r) for r in controller.history]
        result["bits"] = controller.bit_widths()
        result["prune_steps"] = {n: int(b) for n, b in qmodel.state_dict().items()
                                 if n.endswith("prune_step")}
        result["weights"] = {n: p.detach().clone() for n, p in qmodel.named_parameters()}
        # 2. One prune of an untrained model on this rank's data, with the all-reduce ...
        reduced = msq_fx.MSQController(make_model()).epoch_end(1, hessian_data, F.cross_entropy)
        result["reduced_traces"] = traces(reduced)
        # ... and with the Fisher's trace in place of the Hessian's.
        fisher = msq_fx.MSQController(make_model(), CONFIG.replace(hessian={"curvature": "fisher"}))
        result["fisher_traces"] = traces(fisher.epoch_end(1, hessian_data, F.cross_entropy))
        # ... and a measured finish (4x to 4.5x in one prune), each rank trying the drops on
        # its own data: the all-reduced losses make one choice.
        measured = msq_fx.MSQController(make_model(), CONFIG.replace(
            target_compression=4.5, pruning={"threshold": 1.0, "last_prune": "measured"}))
        result["measured_history"] = [dataclasses.asdict(r) for r in measured.epoch_end(
            1, rank_batches(rank + 20, 4), F.cross_entropy)]
        # ... and without it: each rank estimates from its own data only.
        msq_fx.sensitivity.distributed_mean = lambda: None
        local = msq_fx.MSQController(make_model()).epoch_end(1, hessian_data, F.cross_entropy)
        result["local_traces"] = traces(local)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


def test_the_controller_unwraps_ddp(ranks):
    assert all(r["unwrapped"] for r in ranks)


def test_every_rank_records_identical_decisions(ranks):
    first, second = ranks
    assert {row["epoch"] for row in first["history"]} == set(range(1, EPOCHS + 1))
    assert first["history"] == second["history"]


def test_every_rank_ends_with_identical_bit_widths_and_prune_steps(ranks):
    first, second = ranks
    assert first["bits"] == second["bits"]
    assert first["prune_steps"] == second["prune_steps"]
    assert min(first["bits"].values()) < CONFIG.quantization.init_bits  # decisions were made


def test_every_rank_uses_identical_hessian_traces(ranks):
    first, second = ranks
    assert all(row["hessian_trace"] is not None for row in first["history"])
    assert traces_of(first) == traces_of(second)


def test_every_rank_uses_identical_fisher_traces(ranks):
    first, second = (rank["fisher_traces"] for rank in ranks)
    assert first == second and all(trace > 0 for trace in first)


def test_every_rank_makes_the_same_measured_finish(ranks):
    first, second = (rank["measured_history"] for rank in ranks)
    assert all(row["drop_loss_increase"] is not None for row in first)
    assert any(row["bits_after"] < row["bits_before"] for row in first)
    assert first == second


def test_ddp_keeps_the_weights_identical_across_ranks(ranks):
    first, second = ranks
    assert first["weights"].keys() == second["weights"].keys()
    assert all(torch.equal(first["weights"][n], second["weights"][n]) for n in first["weights"])


def test_without_the_all_reduce_ranks_with_different_data_get_different_traces(ranks):
    first, second = ranks
    assert first["local_traces"] != second["local_traces"]
    assert first["reduced_traces"] == second["reduced_traces"]


def test_the_all_reduced_trace_is_the_mean_of_the_per_rank_traces(ranks):
    local = torch.tensor([r["local_traces"] for r in ranks], dtype=torch.float64)
    reduced = torch.tensor(ranks[0]["reduced_traces"], dtype=torch.float64)
    assert torch.allclose(reduced, local.mean(0), rtol=1e-9, atol=1e-12 * float(local.abs().max()))


def traces_of(rank: dict) -> list[float]:
    return [row["hessian_trace"] for row in rank["history"]]
