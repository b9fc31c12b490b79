"""Resuming an MSQ run from saved state_dicts reproduces the uninterrupted run bit for bit.

Everything a run depends on lives in three state_dicts (DESIGN.md §7): the model's (latent
weights, BN statistics, each quantizer's bits and prune step), the controller's (epoch counter,
prune count -- which seeds the Hessian probes --, the stop flag and the history) and the
optimizer's (momentum). Data order is seeded per epoch, so it does not depend on where the run
was stopped.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import msq_fx
from msq_fx.data import synthetic_patterns
from msq_fx.training import train_epoch

EPOCHS = 4
DATA = synthetic_patterns(64, classes=4, size=12, seed=0)
HESSIAN_BATCHES = [next(synthetic_patterns(32, classes=4, size=12, seed=1).batches(32))]
#: alpha between the chance betas of p=1 (0.5) and p=2 (0.75), so decisions are mixed; Gamma is
#: reached at epoch 3, so the last epoch is plain QAT and the stop flag must survive a resume.
CONFIG = msq_fx.MSQConfig(target_compression=5.2,
                          # the trajectory the assertions below pin was recorded without BN
                          # recalibration (its Hessian reads the running statistics)
                          pruning=dict(interval=1, threshold=0.6, reg_strength=1e-3,
                                       bn_recalibration_batches=0),
                          hessian=dict(max_samples=4, min_samples=2))

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def fresh_run(seed: int = 0):
    torch.manual_seed(seed)
    model = msq_fx.SmallCNN(in_channels=1, num_classes=4, width=4)
    qmodel = msq_fx.prepare(model, DATA.images[:2], CONFIG)
    controller = msq_fx.MSQController(qmodel)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    return qmodel, controller, optimizer


def train(qmodel, controller, optimizer, epochs) -> None:
    for epoch in epochs:
        order = torch.Generator().manual_seed(epoch)
        train_epoch(qmodel, DATA.batches(32, shuffle=True, generator=order), optimizer, controller)
        controller.epoch_end(epoch, HESSIAN_BATCHES, F.cross_entropy)


def save(tmp_path, qmodel, controller, optimizer) -> None:
    torch.save(qmodel.state_dict(), tmp_path / "model.pt")
    torch.save(controller.state_dict(), tmp_path / "controller.pt")
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")


def resume(tmp_path, load_optimizer: bool = True):
    # A different seed: nothing may leak from the fresh initialisation or the global RNG.
    qmodel, controller, optimizer = fresh_run(seed=1234)
    qmodel.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    controller.load_state_dict(torch.load(tmp_path / "controller.pt", weights_only=True))
    if load_optimizer:
        optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    return qmodel, controller, optimizer


@pytest.fixture(scope="module")
def uninterrupted():
    qmodel, controller, optimizer = fresh_run()
    train(qmodel, controller, optimizer, range(1, EPOCHS + 1))
    return qmodel, controller


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []


def test_the_reference_run_makes_the_decisions_a_resume_must_reproduce(uninterrupted):
    _, controller = uninterrupted
    history = controller.history
    assert {r.epoch for r in history} == {1, 2, 3}            # Gamma reached at epoch 3
    assert controller.done and controller.last_epoch == EPOCHS
    assert any(r.lsbs_dropped == 0 for r in history)           # beta >= alpha somewhere
    assert any(r.next_prune_step == 2 for r in history)        # a Hessian-assigned p = 2
    assert len(set(controller.bit_widths().values())) > 1      # mixed precision


@pytest.mark.parametrize("stop_after", range(1, EPOCHS))
def test_resumed_run_is_bit_identical_to_the_uninterrupted_run(tmp_path, uninterrupted, stop_after):
    reference_model, reference_controller = uninterrupted
    first = fresh_run()
    train(*first, range(1, stop_after + 1))
    save(tmp_path, *first)
    del first

    qmodel, controller, optimizer = resume(tmp_path)
    assert controller.last_epoch == stop_after
    train(qmodel, controller, optimizer, range(stop_after + 1, EPOCHS + 1))

    assert controller.history == reference_controller.history
    assert controller.bit_widths() == reference_controller.bit_widths()
    assert controller.state_dict() == reference_controller.state_dict()
    assert_same_state(qmodel.state_dict(), reference_model.state_dict())


def test_resuming_without_the_optimizer_state_is_not_bit_identical(tmp_path, uninterrupted):
    # The comparison above is sensitive: losing only the momentum buffers changes the weights.
    reference_model, _ = uninterrupted
    first = fresh_run()
    train(*first, range(1, 3))
    save(tmp_path, *first)
    qmodel, controller, optimizer = resume(tmp_path, load_optimizer=False)
    train(qmodel, controller, optimizer, range(3, EPOCHS + 1))
    reference = reference_model.state_dict()
    assert not torch.equal(qmodel.state_dict()["features.0.weight"], reference["features.0.weight"])


def test_controller_state_round_trips_through_a_weights_only_torch_load(tmp_path, uninterrupted):
    _, controller = uninterrupted
    torch.save(controller.state_dict(), tmp_path / "controller.pt")
    restored = msq_fx.MSQController(fresh_run()[0])
    restored.load_state_dict(torch.load(tmp_path / "controller.pt", weights_only=True))
    assert restored.history == controller.history
    assert (restored.last_epoch, restored.prune_count, restored.done) == (
        controller.last_epoch, controller.prune_count, controller.done)
    with pytest.raises(ValueError, match="already processed"):
        restored.epoch_end(controller.last_epoch, HESSIAN_BATCHES, F.cross_entropy)


def test_controller_load_state_dict_names_missing_keys():
    controller = fresh_run()[1]
    with pytest.raises(KeyError, match="prune_count"):
        controller.load_state_dict({"last_epoch": 1, "done": False, "history": []})
