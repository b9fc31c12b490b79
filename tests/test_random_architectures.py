"""Random architectures (tests/random_models.py) go through MSQ end to end.

For a random small model mixing conv1d / conv2d (plain, grouped, depthwise), linear layers,
nn.MultiheadAttention (self- and cross-attention), tied weights, functional weight uses,
residual adds, branches, BatchNorm and LayerNorm, under a random weight-scale mode, first/last
policy and activation width (float, 8 or 4 bits):

* prepare quantizes every weight Parameter the model has, a tied one once under all its names;
* one training step (task loss + the controller's penalty, backward, SGD) gives a finite loss
  and finite weights;
* a forced prune (interval 1, alpha = 1) drops the LSB of exactly the prunable groups whose
  beta is below 1 and leaves the others as they were;
* the converted model's eval outputs equal the fake-quant model's exactly;
* the converted model saved and loaded into a skeleton gives exactly the same outputs.

The default run takes 100 examples (derandomized, so CI runs the same ones every time); the
``slow`` test runs the same property on 1,000 (``pytest -m slow``). Add
``--hypothesis-show-statistics`` to see how often each block kind occurred.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings

import msq_fx
from conftest import eval_output
from random_models import Recipe, build, example_batch, kinds, recipes, weight_fqns

settings.register_profile("random-architectures", max_examples=100, deadline=None,
                          derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("random-architectures-slow", parent=settings.get_profile(
    "random-architectures"), max_examples=1000)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config_of(recipe: Recipe) -> msq_fx.MSQConfig:
    """Prunes at epoch 1 with alpha = 1 (every group with a zero LSB somewhere loses one), a
    cheap Hessian, and the recipe's scale mode, first/last policy and activation width."""
    return msq_fx.MSQConfig(
        quantization={"scale": recipe.scale, "first_last": recipe.first_last,
                      "act_bits": recipe.act_bits},
        pruning={"interval": 1, "threshold": 1.0, "bn_recalibration_batches": 1},
        hessian={"max_samples": 2, "min_samples": 2})


def end_to_end(recipe: Recipe, directory) -> None:
    for kind in sorted(kinds(recipe)):
        event(kind)
    event(f"scale={recipe.scale}")
    event(f"first_last={recipe.first_last}")
    event(f"act_bits={recipe.act_bits}")
    model = build(recipe)
    inputs, targets = example_batch(recipe)
    config = config_of(recipe)

    qmodel = msq_fx.prepare(model, inputs, config)
    layers = msq_fx.report(qmodel).layers
    assert {frozenset((row.name, *row.shared_with)) for row in layers} == weight_fqns(model), \
        "prepare: not every weight is quantized, once"

    controller = msq_fx.MSQController(qmodel, config)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.01)
    loss = F.cross_entropy(qmodel(inputs), targets) + controller.regularization()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item()), "training step: the loss is not finite"
    assert all(torch.isfinite(p).all() for p in qmodel.parameters()), \
        "training step: a parameter is not finite"

    before = controller.bit_widths()
    records = controller.epoch_end(1, [(inputs, targets)], F.cross_entropy)
    prunable = {g.name for g in controller.groups if g.prunable}
    assert {r.group for r in records} == prunable
    assert {r.group: r.bits_after for r in records} == {
        r.group: before[r.group] - (r.beta < 1.0) for r in records}, \
        "prune: not exactly the groups with beta < alpha lost one LSB"
    assert {g: bits for g, bits in controller.bit_widths().items() if g not in prunable} == {
        g: bits for g, bits in before.items() if g not in prunable}

    qmodel.eval()
    int_model = msq_fx.convert(qmodel)
    fake_quant = eval_output(qmodel, inputs)
    assert torch.isfinite(fake_quant).all()
    assert torch.equal(eval_output(int_model, inputs), fake_quant), \
        "convert: the converted outputs differ from the fake-quant ones"

    path = directory / "model.msq"
    msq_fx.save(int_model, path)
    skeleton = msq_fx.convert(msq_fx.prepare(build(recipe, seed=recipe.seed + 1), inputs,
                                             msq_fx.saved_config(path)))
    loaded = msq_fx.load(path, model=skeleton)
    assert torch.equal(eval_output(loaded, inputs), fake_quant), \
        "save / load: the loaded outputs differ"


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    return tmp_path_factory.mktemp("random_architectures")


@settings(settings.get_profile("random-architectures"))
@given(recipe=recipes())
def test_a_random_architecture_prepares_trains_prunes_converts_and_saves_exactly(recipe,
                                                                                  directory):
    """Every stage of the module docstring's list holds for 100 random architectures."""
    end_to_end(recipe, directory)


@pytest.mark.slow
@settings(settings.get_profile("random-architectures-slow"))
@given(recipe=recipes())
def test_a_random_architecture_goes_through_msq_exactly_1000_examples(recipe, directory):
    """The same property on 1,000 random architectures."""
    end_to_end(recipe, directory)
