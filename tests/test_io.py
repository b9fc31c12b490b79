"""Bit-packed saving of converted models: exact round trip, n bits per weight on disk."""
from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import msq_fx
import msq_fx.modules
from msq_fx.cli import main as cli_main
from conftest import eval_output
from msq_fx.modules import LoweredWeight
from msq_fx.packing import pack_codes, packed_size, unpack_codes


@st.composite
def codes_and_bits(draw):
    bits = draw(st.integers(1, 8))
    numel = draw(st.integers(0, 300))
    values = draw(st.lists(st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1),
                           min_size=numel, max_size=numel))
    return torch.tensor(values, dtype=torch.int8), bits


@settings(max_examples=200, deadline=None)
@given(codes_and_bits())
def test_unpacking_packed_codes_returns_them_unchanged(case):
    codes, bits = case
    packed = pack_codes(codes, bits)
    assert torch.equal(unpack_codes(packed, bits, tuple(codes.shape)), codes)


@settings(max_examples=100, deadline=None)
@given(codes_and_bits())
def test_packed_codes_take_exactly_n_bits_each_rounded_up_to_a_byte(case):
    codes, bits = case
    assert pack_codes(codes, bits).numel() == -(-codes.numel() * bits // 8)


def test_codes_outside_the_n_bit_range_are_refused():
    with pytest.raises(ValueError, match="do not fit 3-bit"):
        pack_codes(torch.tensor([4], dtype=torch.int8), 3)


def test_unpacking_a_stream_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 4, (5,))


def _converted_cnn(bits: dict[int, int]) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    inputs = torch.randn(2, 1, 16, 16)
    qmodel = msq_fx.prepare(msq_fx.SmallCNN(in_channels=1, width=16), inputs)
    quantizers = [m for m in qmodel.modules() if isinstance(m, msq_fx.modules.WeightFakeQuant)]
    for index, width in bits.items():
        quantizers[index].bits.fill_(width)
    return msq_fx.convert(qmodel), inputs


def test_a_saved_model_loads_with_identical_outputs(tmp_path):
    int_model, inputs = _converted_cnn({0: 3, 1: 5, 2: 2})
    msq_fx.save(int_model, tmp_path / "model.msq")
    loaded = msq_fx.load(tmp_path / "model.msq", trusted=True)
    assert torch.equal(eval_output(loaded, inputs), eval_output(int_model, inputs))


def test_a_saved_model_with_quantized_activations_loads_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    inputs = torch.randn(2, 1, 16, 16)
    int_model = msq_fx.convert(msq_fx.prepare(msq_fx.SmallCNN(in_channels=1, width=16), inputs,
                                              msq_fx.MSQConfig(quantization=dict(act_bits=4))))
    msq_fx.save(int_model, tmp_path / "model.msq")
    loaded = msq_fx.load(tmp_path / "model.msq", trusted=True)
    assert torch.equal(eval_output(loaded, inputs), eval_output(int_model, inputs))


def test_loaded_codes_and_bit_widths_equal_the_saved_ones(tmp_path):
    int_model, _ = _converted_cnn({0: 3, 1: 5, 2: 2})
    msq_fx.save(int_model, tmp_path / "model.msq")
    loaded = msq_fx.load(tmp_path / "model.msq", trusted=True)
    saved = {n: m for n, m in int_model.named_modules() if isinstance(m, LoweredWeight)}
    restored = {n: m for n, m in loaded.named_modules() if isinstance(m, LoweredWeight)}
    assert saved.keys() == restored.keys()
    for name in saved:
        assert torch.equal(saved[name].codes, restored[name].codes), name
        assert saved[name].num_bits == restored[name].num_bits, name


def test_fewer_bits_make_a_smaller_file_by_the_packed_code_size(tmp_path):
    wide, _ = _converted_cnn({})
    narrow_bits = {i: 3 for i in range(6)}
    narrow, _ = _converted_cnn(narrow_bits)
    msq_fx.save(wide, tmp_path / "wide.msq")
    msq_fx.save(narrow, tmp_path / "narrow.msq")
    counts = [m.codes.numel() for m in wide.modules() if isinstance(m, LoweredWeight)]
    expected_saving = sum(packed_size(n, 8) - packed_size(n, 3) for n in counts)
    saving = os.path.getsize(tmp_path / "wide.msq") - os.path.getsize(tmp_path / "narrow.msq")
    # torch.save aligns each stored tensor to 64 bytes; beyond that padding, the packed code
    # bytes account for the whole difference.
    assert abs(saving - expected_saving) < 64 * len(counts)


def test_saving_a_prepared_model_asks_for_convert_first(tmp_path):
    qmodel = msq_fx.prepare(msq_fx.SmallCNN(in_channels=1, width=8))
    with pytest.raises(ValueError, match=r"call msq_fx\.convert\(model\) first"):
        msq_fx.save(qmodel, tmp_path / "model.msq")
    assert not (tmp_path / "model.msq").exists()


def test_loading_a_file_not_written_by_save_is_explained(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an msq_fx packed model"):
        msq_fx.load(tmp_path / "other.pt")


def test_a_saved_file_holds_only_tensors_and_plain_data(tmp_path):
    int_model, _ = _converted_cnn({0: 3})
    msq_fx.save(int_model, tmp_path / "model.msq")
    payload = torch.load(tmp_path / "model.msq", weights_only=True)  # refuses any other object
    assert payload["format"] == msq_fx.io.FORMAT


def test_loading_without_a_model_needs_trust_because_it_unpickles_the_structure(tmp_path):
    int_model, _ = _converted_cnn({0: 3})
    msq_fx.save(int_model, tmp_path / "model.msq")
    with pytest.raises(ValueError, match=r"Pass model=.* or trusted=True"):
        msq_fx.load(tmp_path / "model.msq")


def test_loading_into_a_model_of_the_same_architecture_gives_identical_outputs(tmp_path):
    int_model, inputs = _converted_cnn({0: 3, 1: 5, 2: 2})
    msq_fx.save(int_model, tmp_path / "model.msq")
    config = msq_fx.saved_config(tmp_path / "model.msq")
    torch.manual_seed(1)  # other weights: everything must come from the file
    skeleton = msq_fx.convert(msq_fx.prepare(msq_fx.SmallCNN(in_channels=1, width=16), inputs,
                                             config))
    loaded = msq_fx.load(tmp_path / "model.msq", model=skeleton)
    assert loaded is skeleton
    assert torch.equal(eval_output(loaded, inputs), eval_output(int_model, inputs))
    assert [row.bits for row in msq_fx.report(loaded).layers] == \
        [row.bits for row in msq_fx.report(int_model).layers]


def test_loading_into_a_model_restores_the_activation_quantizers(tmp_path):
    torch.manual_seed(0)
    inputs = torch.randn(2, 1, 16, 16)
    config = msq_fx.MSQConfig(quantization=dict(act_bits=4))
    int_model = msq_fx.convert(msq_fx.prepare(msq_fx.SmallCNN(in_channels=1, width=16), inputs,
                                              config))
    msq_fx.save(int_model, tmp_path / "model.msq")
    # Calibrated on non-negative inputs, the skeleton's first activation quantizer is unsigned.
    skeleton = msq_fx.convert(msq_fx.prepare(msq_fx.SmallCNN(in_channels=1, width=16),
                                             inputs.abs(), config))
    loaded = msq_fx.load(tmp_path / "model.msq", model=skeleton)
    saved = [(m.bits, m.signed) for m in int_model.modules()
             if isinstance(m, msq_fx.modules.LoweredActivation)]
    assert [(m.bits, m.signed) for m in loaded.modules()
            if isinstance(m, msq_fx.modules.LoweredActivation)] == saved
    assert torch.equal(eval_output(loaded, inputs), eval_output(int_model, inputs))


def test_a_model_of_another_architecture_is_refused_and_left_unchanged(tmp_path):
    int_model, inputs = _converted_cnn({0: 3})
    msq_fx.save(int_model, tmp_path / "model.msq")
    other = msq_fx.convert(msq_fx.prepare(msq_fx.SmallCNN(in_channels=1, width=8), inputs))
    before = {key: value.clone() for key, value in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"does not match the given model \(features\.0\."):
        msq_fx.load(tmp_path / "model.msq", model=other)
    assert all(torch.equal(other.state_dict()[key], value) for key, value in before.items())


class TiedLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(8, 8)
        self.second = torch.nn.Linear(8, 8)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.second(self.first(x))


def test_a_trusted_load_keeps_a_shared_weight_one_tensor(tmp_path):
    inputs = torch.randn(2, 8)
    int_model = msq_fx.convert(msq_fx.prepare(TiedLayers(), inputs))
    msq_fx.save(int_model, tmp_path / "model.msq")
    loaded = msq_fx.load(tmp_path / "model.msq", trusted=True)
    lowered = [m for m in loaded.modules() if isinstance(m, LoweredWeight)]
    assert len(lowered) == len([m for m in int_model.modules() if isinstance(m, LoweredWeight)])
    assert torch.equal(eval_output(loaded, inputs), eval_output(int_model, inputs))


def test_a_model_that_cannot_be_pickled_is_saved_as_its_state_alone(tmp_path, caplog):
    class DefinedInAFunction(TiedLayers):
        pass

    inputs = torch.randn(2, 8)
    int_model = msq_fx.convert(msq_fx.prepare(DefinedInAFunction(), inputs))
    msq_fx.save(int_model, tmp_path / "model.msq")
    assert "cannot be pickled" in caplog.text
    with pytest.raises(ValueError, match="holds no module structure"):
        msq_fx.load(tmp_path / "model.msq", trusted=True)
    skeleton = msq_fx.convert(msq_fx.prepare(DefinedInAFunction(), inputs))
    loaded = msq_fx.load(tmp_path / "model.msq", model=skeleton)
    assert torch.equal(eval_output(loaded, inputs), eval_output(int_model, inputs))


def test_the_saved_report_and_config_are_read_without_the_model(tmp_path):
    int_model, _ = _converted_cnn({0: 3, 4: 2})
    msq_fx.save(int_model, tmp_path / "model.msq")
    assert msq_fx.saved_report(tmp_path / "model.msq") == msq_fx.report(int_model)
    assert msq_fx.saved_config(tmp_path / "model.msq") == msq_fx.MSQConfig()


def test_a_file_of_the_older_pickled_format_loads_only_when_trusted(tmp_path):
    int_model, inputs = _converted_cnn({0: 3})
    skeleton = msq_fx.utils.copy_module(int_model)
    codes = {}
    for name, module in skeleton.named_modules():
        if isinstance(module, LoweredWeight):
            codes[name] = {"shape": tuple(module.codes.shape), "bits": module.num_bits,
                           "packed": pack_codes(module.codes, module.num_bits)}
            module.codes = torch.empty(0, dtype=torch.int8)
    torch.save({"format": msq_fx.io.PICKLED_FORMAT, "model": skeleton, "codes": codes},
               tmp_path / "old.msq")
    with pytest.raises(ValueError, match="trusted=True"):
        msq_fx.load(tmp_path / "old.msq")
    with pytest.raises(ValueError, match="trusted=True"):
        msq_fx.saved_report(tmp_path / "old.msq")
    loaded = msq_fx.load(tmp_path / "old.msq", trusted=True)
    assert torch.equal(eval_output(loaded, inputs), eval_output(int_model, inputs))


def test_saving_does_not_change_the_model_in_memory(tmp_path):
    int_model, inputs = _converted_cnn({1: 4})
    before = eval_output(int_model, inputs)
    msq_fx.save(int_model, tmp_path / "model.msq")
    assert torch.equal(eval_output(int_model, inputs), before)


# ------------------------------------------------------------------------ msq-fx report FILE

def test_cli_report_prints_each_saved_layer_with_its_bits(tmp_path, capsys):
    int_model, _ = _converted_cnn({0: 3, 3: 5})
    msq_fx.save(int_model, tmp_path / "model.msq")
    assert cli_main(["report", str(tmp_path / "model.msq")]) == 0
    out = capsys.readouterr().out
    for row in msq_fx.report(int_model).layers:
        line = next(line for line in out.splitlines() if line.startswith(row.name + " "))
        assert f" {row.bits} " in line
    assert f"compression {msq_fx.report(int_model).compression:.2f}x" in out


def test_cli_report_json_counts_the_packed_bytes_of_the_saved_file(tmp_path, capsys):
    int_model, _ = _converted_cnn({0: 3, 3: 5})
    msq_fx.save(int_model, tmp_path / "model.msq")
    assert cli_main(["report", "--json", str(tmp_path / "model.msq")]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = msq_fx.report(int_model)
    assert [layer["bits"] for layer in printed["layers"]] == [row.bits for row in expected.layers]
    assert printed["packed_weight_bytes"] == sum(packed_size(row.params, row.bits)
                                                 for row in expected.layers)
    assert printed["file_bytes"] == (tmp_path / "model.msq").stat().st_size


def test_cli_report_of_an_unreadable_file_says_so_and_exits_2(tmp_path, capsys):
    (tmp_path / "model.msq").write_bytes(b"not a saved model")
    assert cli_main(["report", str(tmp_path / "model.msq")]) == 2
    assert "msq-fx report: error: cannot load" in capsys.readouterr().err
