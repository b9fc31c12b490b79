"""Reliability: non-finite values, damaged files and odd layers are refused or handled, with
MSQError messages that name the culprit, and never leave a model or a controller half changed."""
from __future__ import annotations

import math
import warnings
import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msq_fx
import msq_fx.controller
import msq_fx.precision_groups
from conftest import eval_output
from msq_fx import quant
from msq_fx.modules import LoweredWeight, WeightFakeQuant
from msq_fx.packing import pack_codes


def two_layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def latent(qmodel: nn.Module, index: int) -> nn.Parameter:
    """The float latent of layer ``index`` (``layer.weight`` is the quantized value)."""
    return qmodel[index]._parameters["weight"]


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return [(torch.randn(16, 4, generator=generator),
             torch.randint(0, 2, (16,), generator=generator))]


def pruning_controller(**pruning) -> tuple[nn.Module, msq_fx.MSQController]:
    """A prepared two-layer model and a controller that prunes at every interval."""
    config = msq_fx.MSQConfig(pruning={"interval": 1, "threshold": 1.0, **pruning})
    qmodel = msq_fx.prepare(two_layers(), torch.randn(2, 4), config)
    return qmodel, msq_fx.MSQController(qmodel, config)


def controller_state(qmodel: nn.Module, controller: msq_fx.MSQController) -> tuple:
    """What a refused prune must leave as it was: widths, prune steps and the controller's state."""
    steps = [int(m.prune_step) for m in qmodel.modules() if isinstance(m, WeightFakeQuant)]
    return controller.bit_widths(), steps, controller.state_dict()


# --------------------------------------------------------------------------- non-finite weights

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_prepare_refuses_a_weight_holding_a_non_finite_value_naming_it(value):
    model = two_layers()
    with torch.no_grad():
        model[2].weight[1, 3] = value
    with pytest.raises(msq_fx.MSQError, match=r"2\.weight \(1 (NaN|inf) of 16\)"):
        msq_fx.prepare(model, torch.randn(2, 4))


def test_prepare_names_every_weight_holding_nan_or_inf_with_its_counts():
    model = two_layers()
    with torch.no_grad():
        model[0].weight[0, :3] = math.nan
        model[2].weight[0, 0] = math.inf
        model[2].weight[1, 0] = math.nan
    with pytest.raises(msq_fx.MSQError) as error:
        msq_fx.prepare(model)
    assert "0.weight (3 NaN of 32); 2.weight (1 NaN, 1 inf of 16)" in str(error.value)


def test_prepare_says_how_to_find_where_non_finite_weights_came_from():
    model = two_layers()
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    with pytest.raises(msq_fx.MSQError, match=r"checkpoint.*optimizer step.*"
                                              r"torch\.isfinite\(param\)\.all\(\)"):
        msq_fx.prepare(model)


def test_prepare_in_place_leaves_a_model_with_nan_weights_unchanged():
    model = two_layers()
    with torch.no_grad():
        model[2].weight[0, 0] = math.nan
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(msq_fx.MSQError, match="2.weight"):
        msq_fx.prepare(model, torch.randn(2, 4), inplace=True)
    assert type(model[2]) is nn.Linear and not hasattr(model, "_msq_state")
    assert not any(isinstance(m, WeightFakeQuant) for m in model.modules())
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0, equal_nan=True)


def test_a_weight_left_in_float_may_hold_nan():
    model = two_layers()
    with torch.no_grad():
        model[2].weight[0, 0] = math.nan
    config = msq_fx.MSQConfig(quantization={"exclude": [r"^2\."]})
    qmodel = msq_fx.prepare(model, torch.randn(2, 4), config)
    assert [row.name for row in msq_fx.report(qmodel).layers] == ["0.weight"]


# --------------------------------------------------------------------------- non-finite at a prune

def test_a_nan_latent_stops_the_prune_naming_its_group():
    qmodel, controller = pruning_controller()
    with torch.no_grad():
        latent(qmodel, 2)[0, 0] = math.nan
    with pytest.raises(msq_fx.MSQError, match=r"epoch_end\(epoch=1\).*2\.weight \(latent of "
                                              r"2\.weight: 1 NaN of 16\)"):
        controller.epoch_end(1, batches(), F.cross_entropy)


def test_a_nan_latent_leaves_the_widths_and_the_controller_unchanged():
    qmodel, controller = pruning_controller()
    with torch.no_grad():
        latent(qmodel, 0)[1, 1] = math.nan
    before = controller_state(qmodel, controller)
    with pytest.raises(msq_fx.MSQError):
        controller.epoch_end(1, batches(), F.cross_entropy)
    assert controller_state(qmodel, controller) == before


def test_a_prune_refused_for_a_nan_latent_runs_when_retried_after_the_fix():
    qmodel, controller = pruning_controller()
    good = latent(qmodel, 0)[1, 1].item()
    with torch.no_grad():
        latent(qmodel, 0)[1, 1] = math.nan
    with pytest.raises(msq_fx.MSQError):
        controller.epoch_end(1, batches(), F.cross_entropy)
    with torch.no_grad():
        latent(qmodel, 0)[1, 1] = good
    records = controller.epoch_end(1, batches(), F.cross_entropy)
    assert [(r.bits_before, r.bits_after) for r in records] == [(8, 7), (8, 7)]
    assert controller.last_epoch == 1 and controller.prune_count == 1


def test_a_nan_latent_stops_a_step_counted_prune_too():
    qmodel, controller = pruning_controller(interval_unit="step")
    with torch.no_grad():
        latent(qmodel, 0)[0, 0] = math.inf
    before = controller_state(qmodel, controller)
    with pytest.raises(msq_fx.MSQError, match=r"step_end\(step=1\).*0\.weight"):
        controller.step_end(1, batches(), F.cross_entropy)
    assert controller_state(qmodel, controller) == before


def test_a_nan_learned_scale_stops_the_prune_naming_it():
    config = msq_fx.MSQConfig(quantization={"scale": "channel"},
                              pruning={"interval": 1, "threshold": 1.0})
    qmodel = msq_fx.prepare(two_layers(), torch.randn(2, 4), config)
    controller = msq_fx.MSQController(qmodel, config)
    with torch.no_grad():
        qmodel[2].weight_quantizer.scale[1] = math.nan
    with pytest.raises(msq_fx.MSQError, match=r"2\.weight \(learned scale of 2\.weight: "
                                              r"1 NaN of 2\)"):
        controller.epoch_end(1, batches(), F.cross_entropy)


def test_an_inf_hessian_batch_stops_the_prune_naming_the_hessian():
    _, controller = pruning_controller()
    (inputs, targets), = batches()
    inputs[3, 1] = math.inf
    with pytest.raises(msq_fx.MSQError, match=r"not finite: the Hessian trace of 0\.weight, "
                                              r"2\.weight;.*The Hessian was taken on the "
                                              r"batches given to this call"):
        controller.epoch_end(1, [(inputs, targets)], F.cross_entropy)


def test_a_prune_refused_for_an_inf_hessian_batch_runs_with_finite_batches():
    qmodel, controller = pruning_controller()
    (inputs, targets), = batches()
    bad = inputs.clone()
    bad[0, 0] = math.inf
    before = controller_state(qmodel, controller)
    with pytest.raises(msq_fx.MSQError):
        controller.epoch_end(1, [(bad, targets)], F.cross_entropy)
    assert controller_state(qmodel, controller) == before
    assert len(controller.epoch_end(1, [(inputs, targets)], F.cross_entropy)) == 2


def test_a_non_finite_lsb_rate_stops_the_prune_naming_beta(monkeypatch):
    qmodel, controller = pruning_controller(step_policy="fixed")
    monkeypatch.setattr(msq_fx.precision_groups.PrecisionGroup, "lsb_nonzero_rate",
                        lambda group, min_bits: math.nan)
    before = controller_state(qmodel, controller)
    with pytest.raises(msq_fx.MSQError, match=r"beta of 0\.weight, 2\.weight"):
        controller.epoch_end(1, batches(), F.cross_entropy)
    assert controller_state(qmodel, controller) == before


def test_the_finite_checks_run_only_when_a_prune_is_due(monkeypatch):
    calls = []
    original = msq_fx.controller.non_finite_summary
    monkeypatch.setattr(msq_fx.controller, "non_finite_summary",
                        lambda tensor: calls.append(1) or original(tensor))
    qmodel, controller = pruning_controller(interval=3, interval_unit="step")
    for step in (1, 2):
        controller.regularization()
        controller.step_end(step, batches(), F.cross_entropy)
    assert calls == []
    controller.step_end(3, batches(), F.cross_entropy)
    assert len(calls) == 2


# --------------------------------------------------------------------------- damaged files

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A converted two-layer model saved to a file: (path, the model, an input)."""
    qmodel = msq_fx.prepare(two_layers(), torch.randn(2, 4))
    int_model = msq_fx.convert(qmodel.eval())
    path = tmp_path_factory.mktemp("saved") / "model.msq"
    msq_fx.save(int_model, path)
    return path, int_model, torch.randn(3, 4)


def skeleton() -> nn.Module:
    """A converted model of the saved architecture with other weights."""
    torch.manual_seed(1)
    return msq_fx.convert(msq_fx.prepare(nn.Sequential(nn.Linear(4, 8), nn.ReLU(),
                                                        nn.Linear(8, 2))))


READERS = {
    "load(model=...)": lambda path: msq_fx.load(path, model=skeleton()),
    "load(trusted=True)": lambda path: msq_fx.load(path, trusted=True),
    "saved_config": msq_fx.saved_config,
    "saved_report": msq_fx.saved_report,
}


def damaged_copy(saved, tmp_path, damage) -> str:
    data = bytearray(saved[0].read_bytes())
    path = tmp_path / "damaged.msq"
    path.write_bytes(bytes(damage(data)))
    return str(path)


def flip_bit_in(data: bytearray, needle: bytes) -> bytearray:
    """``data`` with the lowest bit of the middle byte of ``needle`` (found once) flipped."""
    assert data.count(needle) == 1
    data[data.index(needle) + len(needle) // 2] ^= 1
    return data


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_a_truncated_file_is_refused_naming_it(saved, tmp_path, reader, keep):
    path = damaged_copy(saved, tmp_path, lambda data: data[:int(len(data) * keep)])
    with pytest.raises(msq_fx.MSQError, match=f"{path}: truncated or corrupt"):
        READERS[reader](path)


@pytest.mark.parametrize("reader", READERS)
def test_an_empty_file_is_refused_as_truncated(saved, tmp_path, reader):
    path = damaged_copy(saved, tmp_path, lambda data: b"")
    with pytest.raises(msq_fx.MSQError, match=r"truncated or corrupt: the file is empty \(0 "):
        READERS[reader](path)


@pytest.mark.parametrize("reader", READERS)
def test_a_flipped_bit_in_the_codes_fails_the_checksum(saved, tmp_path, reader):
    lowered = saved[1][2].weight_quantizer
    packed = pack_codes(lowered.codes, lowered.num_bits).numpy().tobytes()
    path = damaged_copy(saved, tmp_path, lambda data: flip_bit_in(data, packed))
    with pytest.raises(msq_fx.MSQError, match=f"{path}: checksum mismatch"):
        READERS[reader](path)


@pytest.mark.parametrize("reader", READERS)
def test_a_flipped_bit_in_a_float_tensor_fails_the_checksum(saved, tmp_path, reader):
    bias = saved[1][0].bias.detach().numpy().tobytes()
    path = damaged_copy(saved, tmp_path, lambda data: flip_bit_in(data, bias))
    with pytest.raises(msq_fx.MSQError, match="checksum mismatch"):
        READERS[reader](path)


@pytest.mark.parametrize("reader", READERS)
def test_a_flipped_bit_in_the_pickled_plain_data_is_refused_before_unpickling(saved, tmp_path,
                                                                              reader):
    path = damaged_copy(saved, tmp_path, lambda data: flip_bit_in(data, b"model_compression"))
    with pytest.raises(msq_fx.MSQError, match="truncated or corrupt.*data.pkl.*CRC"):
        READERS[reader](path)


@pytest.mark.parametrize("reader", READERS)
def test_a_plain_torch_save_of_a_dict_is_not_an_msq_fx_file(tmp_path, reader):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "plain.pt")
    with pytest.raises(msq_fx.MSQError, match=r"plain\.pt: not an msq_fx file: torch\.load reads "
                                              r"a dict with keys \['weights'\]"):
        READERS[reader](tmp_path / "plain.pt")


@pytest.mark.parametrize("reader", READERS)
def test_a_text_file_is_not_an_msq_fx_file(tmp_path, reader):
    (tmp_path / "notes.txt").write_text("weights: 0.5 0.25\n")
    with pytest.raises(msq_fx.MSQError, match=r"notes\.txt: not an msq_fx file: it does not "
                                              r"begin as every file torch\.save"):
        READERS[reader](tmp_path / "notes.txt")


@pytest.mark.parametrize("reader", READERS)
def test_a_zip_archive_of_something_else_is_not_an_msq_fx_file(tmp_path, reader):
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "not a model")
    with pytest.raises(msq_fx.MSQError, match=r"other\.zip: not an msq_fx file: a zip archive "
                                              r"that torch\.save did not write"):
        READERS[reader](tmp_path / "other.zip")


def test_a_damaged_file_leaves_the_given_model_unchanged(saved, tmp_path):
    lowered = saved[1][0].weight_quantizer
    packed = pack_codes(lowered.codes, lowered.num_bits).numpy().tobytes()
    path = damaged_copy(saved, tmp_path, lambda data: flip_bit_in(data, packed))
    model = skeleton()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(msq_fx.MSQError):
        msq_fx.load(path, model=model)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())


def test_file_errors_are_value_errors_as_they_were_before(tmp_path):
    (tmp_path / "empty.msq").write_bytes(b"")
    with pytest.raises(ValueError):
        msq_fx.saved_config(tmp_path / "empty.msq")


def test_a_saved_file_holds_the_sha256_of_its_payload_readable_by_torch_load(saved):
    payload = torch.load(saved[0], weights_only=True)
    assert payload["checksum"].startswith("sha256:") and len(payload["checksum"]) == 7 + 64


def test_a_file_written_before_checksums_still_loads(saved, tmp_path):
    path, int_model, inputs = saved
    payload = torch.load(path, weights_only=True)
    del payload["checksum"]
    torch.save(payload, tmp_path / "old.msq")
    loaded = msq_fx.load(tmp_path / "old.msq", model=skeleton())
    assert torch.equal(eval_output(loaded, inputs), eval_output(int_model, inputs))


def test_an_undamaged_file_loads_with_its_checksum_verified(saved):
    path, int_model, inputs = saved
    for loaded in (msq_fx.load(path, model=skeleton()), msq_fx.load(path, trusted=True)):
        assert torch.equal(eval_output(loaded, inputs), eval_output(int_model, inputs))


# --------------------------------------------------------------------------- odd layers

class WithOddLayer(nn.Module):
    """An ordinary linear layer beside an odd one that reads the first ``odd.in_features``
    inputs; the outputs are concatenated (the odd one's as real float)."""

    def __init__(self, case: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.case = case
        self.main = nn.Linear(4, 3)
        if case == "empty":
            with warnings.catch_warnings():  # torch: initializing zero-element tensors is a no-op
                warnings.simplefilter("ignore", UserWarning)
                self.odd = nn.Linear(4, 0)
        elif case == "one element":
            self.odd = nn.Linear(1, 1)
        elif case == "all zero":
            self.odd = nn.Linear(4, 3)
            nn.init.zeros_(self.odd.weight)
        elif case == "integer":
            self.odd = nn.Linear(4, 3, bias=False)
            self.odd.weight = nn.Parameter(torch.arange(12).reshape(3, 4) - 6,
                                           requires_grad=False)
        elif case == "complex":
            self.odd = nn.Linear(4, 3, dtype=torch.complex64)
        self.width = self.odd.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = x[:, :self.width]
        if self.case == "integer":
            out = self.odd(inputs.round().long()).float()
        elif self.case == "complex":
            out = self.odd(inputs.to(torch.complex64)).abs()
        else:
            out = self.odd(inputs)
        return torch.cat([self.main(x), out], dim=1)


#: The odd layer's fate: None when it is quantized, else the start of its float reason.
ODD_CASES = {"empty": "empty tensor", "one element": None, "all zero": None,
             "integer": "not a floating-point tensor (torch.int64)",
             "complex": "not a floating-point tensor (torch.complex64)"}
SCALES = ["max", "tensor", "channel"]


def prepared_odd(case: str, scale: str) -> tuple[nn.Module, torch.Tensor]:
    inputs = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    config = msq_fx.MSQConfig(quantization={"scale": scale},
                              pruning={"interval": 1, "threshold": 1.0})
    return msq_fx.prepare(WithOddLayer(case), inputs, config), inputs


def train_step(qmodel: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    controller = msq_fx.MSQController(qmodel)
    trainable = [p for p in qmodel.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.05)
    loss = qmodel(inputs).pow(2).mean() + controller.regularization()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("case", ODD_CASES)
def test_an_odd_weight_is_quantized_or_left_in_float_with_its_reason(case, scale):
    qmodel, _ = prepared_odd(case, scale)
    result = msq_fx.report(qmodel)
    if ODD_CASES[case] is None:
        assert [row.name for row in result.layers] == ["main.weight", "odd.weight"]
        assert result.float_weights == []
    else:
        assert [row.name for row in result.layers] == ["main.weight"]
        [row] = result.float_weights
        assert row.name == "odd.weight" and row.reason.startswith(ODD_CASES[case])


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("case", ODD_CASES)
def test_an_odd_weight_takes_a_training_step(case, scale):
    qmodel, inputs = prepared_odd(case, scale)
    assert torch.isfinite(train_step(qmodel, inputs))
    assert all(torch.isfinite(p).all() for p in qmodel.parameters())


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("case", ODD_CASES)
def test_an_odd_weight_converts_to_exactly_the_same_outputs(case, scale):
    qmodel, inputs = prepared_odd(case, scale)
    train_step(qmodel, inputs)
    int_model = msq_fx.convert(qmodel.eval())
    assert torch.equal(eval_output(int_model, inputs), eval_output(qmodel, inputs))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("case", ODD_CASES)
def test_an_odd_weight_survives_save_and_load(case, scale, tmp_path):
    qmodel, inputs = prepared_odd(case, scale)
    train_step(qmodel, inputs)
    int_model = msq_fx.convert(qmodel.eval())
    msq_fx.save(int_model, tmp_path / "odd.msq")
    config = msq_fx.saved_config(tmp_path / "odd.msq")
    other = msq_fx.convert(msq_fx.prepare(WithOddLayer(case), inputs, config))
    for loaded in (msq_fx.load(tmp_path / "odd.msq", model=other),
                   msq_fx.load(tmp_path / "odd.msq", trusted=True)):
        assert torch.equal(eval_output(loaded, inputs), eval_output(int_model, inputs))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("case", [c for c, reason in ODD_CASES.items() if reason is None])
def test_a_quantized_odd_weight_is_on_its_grid(case, scale):
    qmodel, _ = prepared_odd(case, scale)
    quantizer, weight = qmodel.odd.weight_quantizer, qmodel.odd._parameters["weight"]
    expected = quant.quantize_value(weight.detach(), quantizer.num_bits, quantizer.grid,
                                    quantizer.scale_of(weight))
    assert torch.equal(qmodel.odd.weight, expected)


@pytest.mark.parametrize("scale", SCALES)
def test_an_all_zero_weight_quantizes_to_zero_codes(scale):
    qmodel, _ = prepared_odd("all zero", scale)
    int_model = msq_fx.convert(qmodel.eval())
    lowered = int_model.odd.weight_quantizer
    assert isinstance(lowered, LoweredWeight) and not lowered.codes.any()
    assert not int_model.odd.weight.any()


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("case", ODD_CASES)
def test_a_prune_runs_beside_an_odd_weight(case, scale):
    qmodel, inputs = prepared_odd(case, scale)
    targets = torch.randn(inputs.shape[0], 3 + qmodel.odd.out_features)
    records = msq_fx.MSQController(qmodel).epoch_end(1, [(inputs, targets)], F.mse_loss)
    assert {r.group for r in records} == {row.name for row in msq_fx.report(qmodel).layers}
    assert all(math.isfinite(r.omega) and r.bits_after <= r.bits_before for r in records)


# --------------------------------------------------------------------------- controller config

def test_a_controller_given_another_quantization_section_is_refused():
    qmodel = msq_fx.prepare(two_layers())
    other = msq_fx.MSQConfig(quantization={"init_bits": 6})
    with pytest.raises(msq_fx.MSQError, match=r"quantization section differs .* init_bits=6 "
                                              r"\(prepared with 8\)"):
        msq_fx.MSQController(qmodel, other)


def test_a_controller_may_take_another_schedule():
    qmodel = msq_fx.prepare(two_layers())
    config = msq_fx.MSQConfig(target_compression=6.0, pruning={"interval": 3})
    assert msq_fx.MSQController(qmodel, config).config.pruning.interval == 3
