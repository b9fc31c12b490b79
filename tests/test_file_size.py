"""A saved .msq file is about the size its bits promise: packed codes plus the float tensors."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import msq_fx
from conftest import eval_output
from msq_fx.io import saved_sizes
from msq_fx.modules import WeightFakeQuant

#: The CIFAR-10 run's ResNet-20 (docs/cifar10_resnet20.md), saved in the previous format.
CIFAR10_FILE = Path(__file__).resolve().parent.parent / "results" / "cifar10" / "resnet20_msq.msq"

INPUTS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def resnet20(bits: int | None) -> nn.Module:
    """ResNet-20 converted at ``bits`` everywhere but the last layer (one more), as the
    CIFAR-10 run ended (2 and 3 bits); None keeps init_bits (8)."""
    torch.manual_seed(0)
    qmodel = msq_fx.prepare(msq_fx.resnet20(), INPUTS)
    quantizers = [m for m in qmodel.modules() if isinstance(m, WeightFakeQuant)]
    if bits is not None:
        for quantizer in quantizers:
            quantizer.bits.fill_(bits)
        quantizers[-1].bits.fill_(bits + 1)
    return msq_fx.convert(qmodel.eval())


@pytest.fixture(scope="module")
def fixed_cost(tmp_path_factory) -> int:
    """The bytes of a file that holds almost no tensors (one 1x1 linear layer: 21 bytes of them):
    torch.save's own records and directory (about 1.7 KB), the payload's framing and report, and
    the compressed header with the config and the structure of one module. Every file pays
    this, whatever its model, so it is not part of the 10 % the model's own overhead may take."""
    path = tmp_path_factory.mktemp("fixed") / "linear.msq"
    msq_fx.save(msq_fx.convert(msq_fx.prepare(nn.Linear(1, 1))), path)
    sizes = saved_sizes(path)
    assert sizes.code_bytes + sizes.tensor_bytes < 32
    return sizes.file_bytes


def test_the_fixed_cost_of_a_file_is_a_few_kilobytes(fixed_cost):
    assert fixed_cost < 5000


@pytest.mark.parametrize("bits", [2, None], ids=["2-bit", "8-bit"])
def test_a_resnet20_file_takes_at_most_1_1x_its_tensors_beyond_the_fixed_cost(tmp_path, bits,
                                                                              fixed_cost):
    msq_fx.save(resnet20(bits), tmp_path / "model.msq")
    sizes = saved_sizes(tmp_path / "model.msq")
    assert sizes.structure
    assert sizes.file_bytes <= 1.1 * (sizes.code_bytes + sizes.tensor_bytes) + fixed_cost, sizes


@pytest.mark.parametrize("bits", [2, None], ids=["2-bit", "8-bit"])
def test_a_resnet20_file_without_its_structure_takes_at_most_1_1x_its_tensors(tmp_path, bits):
    msq_fx.save(resnet20(bits), tmp_path / "model.msq", structure=False)
    sizes = saved_sizes(tmp_path / "model.msq")
    assert sizes.file_bytes <= 1.1 * (sizes.code_bytes + sizes.tensor_bytes), sizes


def test_the_packed_codes_take_n_bits_per_weight_and_every_other_tensor_its_own_size(tmp_path):
    int_model = resnet20(2)
    msq_fx.save(int_model, tmp_path / "model.msq")
    sizes = saved_sizes(tmp_path / "model.msq")
    rows = msq_fx.report(int_model).layers
    assert sizes.code_bytes == sum(-(-row.params * row.bits // 8) for row in rows)
    codes = {id(m.codes) for m in int_model.modules() if hasattr(m, "codes")}
    others = [t for t in int_model.state_dict(keep_vars=True).values() if id(t) not in codes]
    assert sizes.tensor_bytes == sum(t.numel() * t.element_size() for t in others)


@pytest.mark.parametrize("how", ["trusted", "model"])
def test_a_resnet20_round_trip_is_exact(tmp_path, how):
    int_model = resnet20(2)
    msq_fx.save(int_model, tmp_path / "model.msq")
    if how == "trusted":
        loaded = msq_fx.load(tmp_path / "model.msq", trusted=True)
    else:
        torch.manual_seed(1)  # other weights: everything must come from the file
        skeleton = msq_fx.convert(msq_fx.prepare(msq_fx.resnet20(), INPUTS,
                                                 msq_fx.saved_config(tmp_path / "model.msq")))
        loaded = msq_fx.load(tmp_path / "model.msq", model=skeleton)
    saved, restored = int_model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    for key, value in saved.items():
        assert value.dtype == restored[key].dtype and torch.equal(value, restored[key]), key
    assert torch.equal(eval_output(loaded, INPUTS), eval_output(int_model, INPUTS))


@pytest.mark.skipif(not CIFAR10_FILE.exists(), reason="results/cifar10 is not in this checkout")
def test_the_cifar10_file_of_the_previous_format_loads_and_saved_again_is_within_1_1x(tmp_path):
    before = saved_sizes(CIFAR10_FILE)
    old = msq_fx.load(CIFAR10_FILE, trusted=True)
    msq_fx.save(old, tmp_path / "again.msq")
    after = saved_sizes(tmp_path / "again.msq")
    assert (after.code_bytes, after.tensor_bytes) == (before.code_bytes, before.tensor_bytes)
    assert after.file_bytes <= 1.1 * (after.code_bytes + after.tensor_bytes) < before.file_bytes
    again = msq_fx.load(tmp_path / "again.msq", trusted=True)
    assert torch.equal(eval_output(again, INPUTS), eval_output(old, INPUTS))
    torch.manual_seed(1)
    skeleton = msq_fx.convert(msq_fx.prepare(msq_fx.resnet20(), INPUTS,
                                             msq_fx.saved_config(CIFAR10_FILE)))
    from_old = msq_fx.load(CIFAR10_FILE, model=skeleton)
    assert torch.equal(eval_output(from_old, INPUTS), eval_output(old, INPUTS))
    assert os.path.getsize(CIFAR10_FILE) == before.file_bytes
