"""Specification of msq_fx.training's helpers (the loop shared by the demo and the examples)."""

from __future__ import annotations

import pytest
import torch

import msq_fx
import msq_fx.owners
from conftest import count_calls
from msq_fx.training import accuracy, distillation_loss

X = torch.randn(12, 1, 16, 16, generator=torch.Generator().manual_seed(3))
Y = torch.randint(0, 10, (12,), generator=torch.Generator().manual_seed(4))


def prepared_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    model = msq_fx.SmallCNN(in_channels=1, width=8)
    return msq_fx.prepare(model, X[:2])


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(X[i:i + 4], Y[i:i + 4]) for i in range(0, 12, 4)]


def test_accuracy_is_the_percentage_of_correct_top1_predictions_in_eval_mode():
    qmodel = prepared_cnn()
    with torch.no_grad():
        predictions = qmodel.eval()(X).argmax(1)
    qmodel.train()
    assert accuracy(qmodel, batches()) == 100.0 * float((predictions == Y).sum()) / 12


def test_accuracy_restores_the_training_mode():
    qmodel = prepared_cnn().train()
    accuracy(qmodel, batches())
    assert qmodel.training


def test_accuracy_quantizes_each_weight_once_for_all_batches(monkeypatch):
    qmodel = prepared_cnn()
    weights = len(list(msq_fx.owners.iter_quantized_weights(qmodel)))
    calls = count_calls(monkeypatch, "fake_quantize")
    accuracy(qmodel, batches())
    assert calls[0] == weights


def step_counted(interval: int) -> tuple[torch.nn.Module, msq_fx.MSQController]:
    torch.manual_seed(0)
    config = msq_fx.MSQConfig(target_compression=16.0, pruning={
        "interval": interval, "interval_unit": "step", "threshold": 1.0})
    qmodel = msq_fx.prepare(msq_fx.SmallCNN(in_channels=1, width=8), X[:2], config)
    return qmodel, msq_fx.MSQController(qmodel, config)


def test_train_epoch_counts_optimizer_steps_for_a_step_schedule():
    from msq_fx.training import train_epoch
    qmodel, controller = step_counted(interval=2)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.01)
    train_epoch(qmodel, batches(), optimizer, controller)
    assert controller.last_step == 3
    assert {record.step for record in controller.history} == {2}


def test_train_epoch_prunes_on_the_given_batches():
    from msq_fx.training import train_epoch
    qmodel, controller = step_counted(interval=1)
    seen = []
    loss_fn = torch.nn.functional.cross_entropy

    def recording_loss(outputs, targets):
        seen.append(len(targets))
        return loss_fn(outputs, targets)

    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.01)
    hessian_batch = [(X[:5], Y[:5])]
    train_epoch(qmodel, batches()[:1], optimizer, controller, loss_fn=recording_loss,
                prune_batches=hessian_batch)
    assert 5 in seen  # the prune's loss ran on the given batch, not the step's batch of 4


def test_the_distillation_loss_is_zero_where_student_and_teacher_agree():
    logits = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    assert distillation_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_the_distillation_loss_is_the_teachers_kl_to_the_student_times_t_squared(temperature):
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 10, generator=generator), torch.randn(6, 10,
                                                                             generator=generator)
    p = torch.softmax(teacher / temperature, dim=1)
    q = torch.softmax(student / temperature, dim=1)
    expected = (p * (p.log() - q.log())).sum(1).mean() * temperature ** 2
    assert distillation_loss(student, teacher, temperature).item() == pytest.approx(
        expected.item(), rel=1e-5)


def test_the_distillation_loss_sends_no_gradient_to_the_teacher():
    student = torch.randn(4, 10, requires_grad=True)
    teacher = torch.randn(4, 10, requires_grad=True)
    distillation_loss(student, teacher).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("student_shape, temperature, message", [
    ((4, 10), 0.0, "temperature must be > 0"), ((3, 10), 1.0, "differ in shape")])
def test_the_distillation_loss_refuses_a_bad_temperature_or_mismatched_logits(
        student_shape, temperature, message):
    with pytest.raises(ValueError, match=message):
        distillation_loss(torch.zeros(student_shape), torch.zeros(4, 10), temperature)
