"""msq_fx.fine_tune: quantizing a trained network in one call, resumable."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

import msq_fx
from msq_fx import FineTuneConfig, MSQConfig, fine_tune


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(288, 10))


def batches(count: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 1, 8, 8, generator=generator),
             torch.randint(0, 10, (16,), generator=generator)) for _ in range(count)]


#: Prunes every 2 steps, every layer pruned (alpha 1): decisions that do not wait for LSBs
#: to empty, so a few steps reach the target.
EVERY_LAYER = {"interval": 2, "threshold": 1.0}


def test_the_preset_for_the_target_is_what_trains_by_default():
    tuned = fine_tune(small_net(), batches()[0][0], batches(), target=16.0,
                      schedule=FineTuneConfig(epochs=1))
    assert tuned.controller.config == MSQConfig.fine_tuning(16.0)


def test_the_model_given_is_left_as_it_was():
    net = small_net()
    before = {name: value.clone() for name, value in net.state_dict().items()}
    fine_tune(net, batches()[0][0], batches(), target=8.0, schedule=FineTuneConfig(epochs=1))
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_the_target_step_is_the_optimizer_step_of_the_prune_that_reached_it():
    config = MSQConfig.fine_tuning(8.0, pruning=EVERY_LAYER)  # from 5 bits: one prune to 4
    tuned = fine_tune(small_net(), batches()[0][0], batches(), config=config,
                      schedule=FineTuneConfig(epochs=2))
    assert tuned.controller.done and tuned.target_step == 2
    assert [record.step for record in tuned.controller.history] == [2, 2]  # conv and linear
    assert [record["compression"] for record in tuned.epochs] == [8.0, 8.0]


def test_a_target_not_reached_in_the_budget_has_no_target_step():
    config = MSQConfig.fine_tuning(8.0, pruning={"interval": 100})
    tuned = fine_tune(small_net(), batches()[0][0], batches(), config=config,
                      schedule=FineTuneConfig(epochs=1))
    assert not tuned.controller.done and tuned.target_step is None


def test_a_target_the_layers_cannot_reach_has_no_target_step_and_the_run_completes(tmp_path):
    # The first conv and the last linear held at 8 bits, a middle conv alone pruned to its
    # floor: 7.15x at most, short of 8x.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(64, 10))
    config = MSQConfig.fine_tuning(8.0, quantization={"first_last": "fixed"},
                                   pruning=EVERY_LAYER)
    tuned = fine_tune(net, batches()[0][0], batches(), config=config,
                      schedule=FineTuneConfig(epochs=2), checkpoint=tmp_path / "run.ckpt")
    assert tuned.controller.done and tuned.controller.compression() < 8.0
    assert tuned.target_step is None
    assert [record["epoch"] for record in tuned.epochs] == [1, 2]


def test_a_model_with_no_layer_to_prune_trains_its_budget_and_writes_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    config = MSQConfig.fine_tuning(8.0, quantization={"first_last": "fixed"},
                                   pruning=EVERY_LAYER)
    tuned = fine_tune(net, batches()[0][0], batches(), config=config,
                      schedule=FineTuneConfig(epochs=1), checkpoint=tmp_path / "run.ckpt")
    assert tuned.target_step is None and tuned.controller.history == []
    assert (tmp_path / "run.ckpt").exists()


def test_the_trained_model_converts_to_the_same_outputs():
    config = MSQConfig.fine_tuning(8.0, pruning=EVERY_LAYER)
    tuned = fine_tune(small_net(), batches()[0][0], batches(), config=config,
                      schedule=FineTuneConfig(epochs=1))
    inputs = batches()[0][0]
    tuned.model.eval()
    with torch.no_grad():
        assert torch.equal(tuned.model(inputs), msq_fx.convert(tuned.model)(inputs))


def test_each_epoch_records_the_loss_widths_and_what_evaluate_returned():
    seen_modes = []

    def evaluate(model):
        seen_modes.append(model.training)
        return len(seen_modes) * 10.0

    tuned = fine_tune(small_net(), batches()[0][0], batches(), target=8.0,
                      schedule=FineTuneConfig(epochs=2), evaluate=evaluate)
    assert [record["metric"] for record in tuned.epochs] == [10.0, 20.0]
    assert [record["epoch"] for record in tuned.epochs] == [1, 2]
    assert all(record["bits"] == tuned.controller.bit_widths() for record in tuned.epochs[-1:])
    assert all(record["loss"] > 0 for record in tuned.epochs)
    assert tuned.model.training


class Crash(RuntimeError):
    pass


class CountedPasses:
    """``items`` iterated afresh each time, counting the passes run to their end (an
    epoch's; the prune batches are the first few of a pass left unfinished)."""

    def __init__(self, items: list) -> None:
        self.items, self.count = items, 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        yield from self.items
        self.count += 1


def test_a_run_stopped_by_a_crash_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    config = MSQConfig.fine_tuning(8.0, pruning={"interval": 3})
    schedule = FineTuneConfig(epochs=3)
    whole = fine_tune(small_net(), batches()[0][0], batches(), config=config, schedule=schedule)

    def crash_in_epoch_2(model):
        if crash_in_epoch_2.calls == 1:
            raise Crash
        crash_in_epoch_2.calls += 1
    crash_in_epoch_2.calls = 0
    path = tmp_path / "run.ckpt"
    with pytest.raises(Crash):
        fine_tune(small_net(), batches()[0][0], batches(), config=config, schedule=schedule,
                  evaluate=crash_in_epoch_2, checkpoint=path)
    scored, passes = [], CountedPasses(batches())
    resumed = fine_tune(small_net(), batches()[0][0], passes, config=config,
                        schedule=schedule, checkpoint=path,
                        evaluate=lambda model: scored.append(model) or "scored")
    # Epoch 2 had trained and was saved before its evaluation failed: it is scored, not
    # trained again, then epoch 3 trains: one whole pass.
    assert len(scored) == 2 and passes.count == 1
    assert [record["epoch"] for record in resumed.epochs] == [1, 2, 3]
    assert [record["metric"] for record in resumed.epochs] == [None, "scored", "scored"]
    assert resumed.target_step == whole.target_step
    assert resumed.controller.bit_widths() == whole.controller.bit_widths()
    expected = whole.model.state_dict()
    assert all(torch.equal(value, expected[name])
               for name, value in resumed.model.state_dict().items())


def dropout_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Dropout(0.3), nn.Flatten(),
                         nn.Linear(288, 10))


def shuffled_loader() -> torch.utils.data.DataLoader:
    inputs, targets = (torch.cat(parts) for parts in zip(*batches()))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets),
                                       batch_size=16, shuffle=True)


def test_a_run_with_dropout_and_a_shuffling_loader_resumes_to_the_same_weights(tmp_path):
    # Both draw from torch's random state, which the checkpoint carries across the crash.
    config = MSQConfig.fine_tuning(8.0, pruning={"interval": 100})
    schedule = FineTuneConfig(epochs=2)
    torch.manual_seed(7)
    whole = fine_tune(dropout_net(), batches()[0][0], shuffled_loader(), config=config,
                      schedule=schedule)

    def crash(model):
        raise Crash
    path = tmp_path / "run.ckpt"
    torch.manual_seed(7)
    with pytest.raises(Crash):
        fine_tune(dropout_net(), batches()[0][0], shuffled_loader(), config=config,
                  schedule=schedule, checkpoint=path, evaluate=crash)
    torch.manual_seed(123)  # whatever ran between the crash and the resume
    resumed = fine_tune(dropout_net(), batches()[0][0], shuffled_loader(), config=config,
                        schedule=schedule, checkpoint=path)
    assert [record["loss"] for record in resumed.epochs] == \
        [record["loss"] for record in whole.epochs]
    expected = whole.model.state_dict()
    assert all(torch.equal(value, expected[name])
               for name, value in resumed.model.state_dict().items())


def test_named_tuple_scores_are_kept_as_dicts_and_their_checkpoint_resumes(tmp_path):
    from collections import namedtuple
    Scores = namedtuple("Scores", "top1 top5")
    path = tmp_path / "run.ckpt"
    first = fine_tune(small_net(), batches()[0][0], batches(), target=8.0,
                      schedule=FineTuneConfig(epochs=1), checkpoint=path,
                      evaluate=lambda model: Scores(torch.tensor(0.5), (0.75, 0.5)))
    assert first.epochs[0]["metric"] == {"top1": 0.5, "top5": (0.75, 0.5)}
    resumed = fine_tune(small_net(), batches()[0][0], batches(), target=8.0,
                        schedule=FineTuneConfig(epochs=1), checkpoint=path)
    assert resumed.epochs == first.epochs


def test_tensor_and_numpy_scores_are_kept_as_numbers_and_their_checkpoint_resumes(tmp_path):
    path = tmp_path / "run.ckpt"
    first = fine_tune(small_net(), batches()[0][0], batches(), target=8.0,
                      schedule=FineTuneConfig(epochs=1), checkpoint=path,
                      evaluate=lambda model: {"top1": torch.tensor(0.5), "top5": np.float64(0.75),
                                              "per_class": np.array([1, 2])})
    assert first.epochs[0]["metric"] == {"top1": 0.5, "top5": 0.75, "per_class": [1, 2]}
    resumed = fine_tune(small_net(), batches()[0][0], batches(), target=8.0,
                        schedule=FineTuneConfig(epochs=1), checkpoint=path)
    assert resumed.epochs == first.epochs


def test_a_checkpoint_from_other_settings_is_refused_and_left_as_it_was(tmp_path):
    path = tmp_path / "run.ckpt"
    fine_tune(small_net(), batches()[0][0], batches(), target=8.0,
              schedule=FineTuneConfig(epochs=1), checkpoint=path)
    written = path.read_bytes()
    with pytest.raises(ValueError, match=r"run.ckpt was written by a run with other settings "
                                         r"\(what differs: schedule\)"):
        fine_tune(small_net(), batches()[0][0], batches(), target=8.0,
                  schedule=FineTuneConfig(epochs=1, lr=0.05), checkpoint=path)
    assert path.read_bytes() == written


def test_an_optimizer_of_the_users_trains_the_prepared_parameters_from_its_own_peak_rate():
    made, rates = [], []

    class RecordedAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            rates.append(self.param_groups[0]["lr"])
            return super().step(closure)

    def adamw(params):
        made.append(params)
        return RecordedAdamW(params, lr=1e-3)

    config = MSQConfig.fine_tuning(8.0, pruning=EVERY_LAYER)
    tuned = fine_tune(small_net(), batches()[0][0], batches(), config=config,
                      schedule=FineTuneConfig(epochs=1), make_optimizer=adamw)
    assert [id(param) for param in made[0]] == [id(param) for param in tuned.model.parameters()]
    assert tuned.controller.done
    # Its own rate is the cosine's peak, annealed over the budget's 6 steps.
    assert rates == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * step / 6))
                                   for step in range(6)])


def test_a_make_optimizer_that_returns_no_optimizer_is_refused():
    with pytest.raises(TypeError, match="make_optimizer returned list, not a torch.optim"):
        fine_tune(small_net(), batches()[0][0], batches(), target=8.0,
                  make_optimizer=lambda params: params)


def test_a_checkpoint_is_not_resumed_with_another_optimizer(tmp_path):
    path = tmp_path / "run.ckpt"
    fine_tune(small_net(), batches()[0][0], batches(), target=8.0,
              schedule=FineTuneConfig(epochs=1), checkpoint=path)
    with pytest.raises(ValueError, match=r"what differs: optimizer"):
        fine_tune(small_net(), batches()[0][0], batches(), target=8.0,
                  schedule=FineTuneConfig(epochs=1), checkpoint=path,
                  make_optimizer=lambda params: torch.optim.AdamW(params, lr=0.01))


def test_a_run_stopped_eagerly_may_resume_compiled(tmp_path, monkeypatch):
    def crash(model):
        raise Crash

    path = tmp_path / "run.ckpt"
    with pytest.raises(Crash):  # after epoch 1 was saved
        fine_tune(small_net(), batches()[0][0], batches(), target=8.0,
                  schedule=FineTuneConfig(epochs=2), checkpoint=path, evaluate=crash)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **_: compiled.append(model) or model)
    resumed = fine_tune(small_net(), batches()[0][0], batches(), target=8.0,
                        schedule=FineTuneConfig(epochs=2, compile=True), checkpoint=path)
    assert len(compiled) == 1 and [record["epoch"] for record in resumed.epochs] == [1, 2]


def test_a_one_shot_iterator_is_refused_before_anything_trains():
    with pytest.raises(ValueError, match="one-shot iterator"):
        fine_tune(small_net(), batches()[0][0], iter(batches()), target=8.0)


def test_batches_without_a_length_are_refused_with_what_to_pass_instead():
    class Stream:
        def __iter__(self):
            return iter(batches())

    with pytest.raises(ValueError, match=r"\(Stream\) has no len\(\).*pass a DataLoader"):
        fine_tune(small_net(), batches()[0][0], Stream(), target=8.0)


def test_a_target_and_a_config_together_are_refused():
    with pytest.raises(ValueError, match="give target .* or config, not both"):
        fine_tune(small_net(), batches()[0][0], batches(), target=8.0,
                  config=MSQConfig.fine_tuning(8.0))


@pytest.mark.parametrize("field, value", [("epochs", 0), ("epochs", 2.5), ("epochs", True),
                                          ("lr", 0.0), ("lr", "0.01"), ("momentum", 1.0),
                                          ("weight_decay", -1e-4), ("warmup_steps", -1),
                                          ("prune_batches", 0), ("compile", "yes")])
def test_a_schedule_out_of_range_is_refused_by_field(field, value):
    with pytest.raises(ValueError, match=rf"FineTuneConfig\.{field}="):
        FineTuneConfig(**{field: value})


def test_the_schedule_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        FineTuneConfig().epochs = 5


@pytest.mark.slow
def test_a_compiled_run_trains_as_the_eager_one_decides():
    config = MSQConfig.fine_tuning(8.0, pruning=EVERY_LAYER)
    runs = [fine_tune(small_net(), batches()[0][0], batches(), config=config,
                      schedule=FineTuneConfig(epochs=1, compile=compiled))
            for compiled in (False, True)]
    assert runs[0].controller.bit_widths() == runs[1].controller.bit_widths()
    assert runs[0].target_step == runs[1].target_step == 2
    assert runs[1].epochs[0]["loss"] == pytest.approx(runs[0].epochs[0]["loss"], rel=1e-3)


# ------------------------------------------------------------------ under torch.distributed

def _distributed_worker(rank: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result: dict = {}
        own_batches = batches(8)[rank * 4:rank * 4 + 4]  # different data on every rank
        try:
            fine_tune(small_net(), own_batches[0][0], own_batches, target=8.0)
        except ValueError as error:
            result["unwrapped_error"] = str(error)
        config = MSQConfig.fine_tuning(8.0, pruning={"interval": 2})
        # Buffers not broadcast, so each rank's widths come from its own controller.
        tuned = fine_tune(small_net(), own_batches[0][0], own_batches, config=config,
                          schedule=FineTuneConfig(epochs=2, prune_batches=2),
                          checkpoint=os.path.join(out_dir, "run.ckpt"),
                          wrap_model=lambda model: nn.parallel.DistributedDataParallel(
                              model, broadcast_buffers=False))
        result["history"] = [dataclasses.asdict(record) for record in tuned.controller.history]
        # A checkpoint only rank 0 can see (as on a file system that is not shared).
        seen_by_rank_0 = os.path.join(out_dir, "run.ckpt" if rank == 0 else "absent.ckpt")
        try:
            fine_tune(small_net(), own_batches[0][0], own_batches, config=config,
                      schedule=FineTuneConfig(epochs=2, prune_batches=2),
                      checkpoint=seen_by_rank_0,
                      wrap_model=lambda model: nn.parallel.DistributedDataParallel(model))
        except ValueError as error:
            result["unshared_error"] = str(error)
        result["bits"] = tuned.controller.bit_widths()
        result["weights"] = {name: value.detach().clone()
                             for name, value in tuned.model.named_parameters()}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    import socket

    import torch.multiprocessing as mp

    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    out_dir = tmp_path_factory.mktemp("fine_tune_ddp")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_distributed_worker, args=(port, str(out_dir)), nprocs=2, join=True)
    return out_dir, [torch.load(out_dir / f"rank{rank}.pt", weights_only=True)
                     for rank in range(2)]


def test_under_torch_distributed_every_rank_decides_alike_and_trains_the_same_weights(
        two_ranks):
    _, (first, second) = two_ranks
    assert first["history"] and first["history"] == second["history"]
    assert first["bits"] == second["bits"]
    assert all(torch.equal(first["weights"][name], second["weights"][name])
               for name in first["weights"])


def test_under_torch_distributed_one_checkpoint_is_written(two_ranks):
    out_dir, _ = two_ranks
    assert sorted(path.name for path in out_dir.iterdir()) == ["rank0.pt", "rank1.pt",
                                                               "run.ckpt"]


def test_under_torch_distributed_a_checkpoint_not_every_rank_sees_is_refused(two_ranks):
    _, ranks = two_ranks
    assert all(rank["unshared_error"].startswith(
        "fine_tune: the checkpoint ") and "exists on some ranks and not on rank(s) 1" in
        rank["unshared_error"] and "a file system all ranks share" in rank["unshared_error"]
        for rank in ranks)


def test_under_torch_distributed_an_unwrapped_model_is_refused_with_the_fix(two_ranks):
    _, ranks = two_ranks
    assert all("pass wrap_model=lambda m: torch.nn.parallel.DistributedDataParallel(m)"
               in rank["unwrapped_error"] for rank in ranks)
