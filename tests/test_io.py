"""Bit-packed saving of converted models: exact round trip, n bits per weight on disk."""
from __future__ import annotations

import json
import lzma
import os
import pickle

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


def _file_of_the_older_format(int_model, path, bits=None) -> None:
    """``int_model`` saved as the older pickled format did (``bits``: widths to record in the
    structure in place of the model's, by module name)."""
    skeleton = msq_fx.utils.copy_module(int_model)
    codes = {}
    for name, module in skeleton.named_modules():
        if isinstance(module, LoweredWeight):
            codes[name] = {"shape": tuple(module.codes.shape), "bits": module.num_bits,
                           "packed": pack_codes(module.codes, module.num_bits)}
            module.codes = torch.empty(0, dtype=torch.int8)
            if bits and name in bits:
                module.bits.fill_(bits[name])
    torch.save({"format": msq_fx.io.PICKLED_FORMAT, "model": skeleton, "codes": codes}, path)


def test_a_file_whose_codes_do_not_fit_their_width_is_refused_and_the_model_kept(tmp_path):
    int_model, inputs = _converted_cnn({0: 3})
    _file_of_the_older_format(int_model, tmp_path / "old.msq",
                              bits={"features.0.weight_quantizer": 2})  # its codes need 3
    skeleton = _converted_cnn({0: 3})[0]
    before = {key: value.clone() for key, value in skeleton.state_dict().items()}
    with pytest.raises(ValueError, match=r"features\.0\.weight_quantizer\.codes: codes in "
                                         r"\[-4, 3\] do not fit 2-bit"):
        msq_fx.load(tmp_path / "old.msq", model=skeleton, trusted=True)
    assert all(torch.equal(skeleton.state_dict()[key], value) for key, value in before.items())


def test_saving_codes_that_no_longer_fit_their_width_names_the_layer_and_the_fix(tmp_path):
    int_model, _ = _converted_cnn({})
    int_model.features[0].weight_quantizer.bits.fill_(3)  # 8-bit codes, now said to be 3-bit
    with pytest.raises(ValueError, match=r"msq_fx\.save: features\.0\.weight_quantizer: codes "
                                         r"in .* do not fit 3-bit .*Convert again from the "
                                         r"prepared model"):
        msq_fx.save(int_model, tmp_path / "model.msq")
    assert not (tmp_path / "model.msq").exists()


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
    _file_of_the_older_format(int_model, tmp_path / "old.msq")
    with pytest.raises(ValueError, match="trusted=True"):
        msq_fx.load(tmp_path / "old.msq")
    with pytest.raises(ValueError, match="trusted=True"):
        msq_fx.saved_report(tmp_path / "old.msq")
    loaded = msq_fx.load(tmp_path / "old.msq", trusted=True)
    assert torch.equal(eval_output(loaded, inputs), eval_output(int_model, inputs))
    torch.manual_seed(1)  # other weights than the saved ones
    given = msq_fx.convert(msq_fx.prepare(msq_fx.SmallCNN(in_channels=1, width=16), inputs))
    given.features[0].weight_quantizer.bits.fill_(3)
    assert msq_fx.load(tmp_path / "old.msq", model=given, trusted=True) is given
    assert torch.equal(eval_output(given, inputs), eval_output(int_model, inputs))


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


# ------------------------------------------------------------------- the current format's records

FIXTURES = os.path.join(os.path.dirname(__file__), "data")


def _small_cnn_of_the_fixture():
    """The architecture tests/fixtures/small_cnn_format2.msq was saved from, converted."""
    inputs = torch.randn(2, 1, 16, 16)
    config = msq_fx.MSQConfig(quantization=dict(act_bits=4))
    return msq_fx.convert(msq_fx.prepare(msq_fx.SmallCNN(in_channels=1, width=8), inputs, config))


@pytest.mark.parametrize("how", ["trusted", "model"])
def test_a_file_of_the_previous_format_still_loads_with_its_saved_outputs(how):
    path = os.path.join(FIXTURES, "small_cnn_format2.msq")
    expected = torch.load(os.path.join(FIXTURES, "small_cnn_format2_outputs.pt"),
                          weights_only=True)
    assert torch.load(path, weights_only=True)["format"] == msq_fx.io.PER_TENSOR_FORMAT
    loaded = (msq_fx.load(path, trusted=True) if how == "trusted"
              else msq_fx.load(path, model=_small_cnn_of_the_fixture()))
    # The outputs were saved on another CPU, whose kernels may round differently (1.5e-8 apart
    # on outputs up to 0.17, measured); one code off by one moved them by 4e-5 to 7e-3.
    torch.testing.assert_close(eval_output(loaded, expected["inputs"]), expected["outputs"],
                               rtol=0, atol=1e-6)
    assert [row.bits for row in msq_fx.saved_report(path).layers] == expected["bits"]
    # Saved when "keep" was the default; the file says what it ran with.
    assert msq_fx.saved_config(path) == msq_fx.MSQConfig(quantization=dict(act_bits=4),
                                                         pruning=dict(scale_after_prune="keep"))


def test_the_sizes_of_a_file_of_the_previous_format_are_read_too():
    path = os.path.join(FIXTURES, "small_cnn_format2.msq")
    sizes = msq_fx.io.saved_sizes(path)
    layers = msq_fx.saved_report(path).layers
    assert sizes.code_bytes == sum(packed_size(row.params, row.bits) for row in layers)
    assert sizes.structure and sizes.file_bytes == os.path.getsize(path)


def test_a_file_saved_again_holds_the_same_model_in_the_current_format(tmp_path):
    old = msq_fx.load(os.path.join(FIXTURES, "small_cnn_format2.msq"), trusted=True)
    msq_fx.save(old, tmp_path / "new.msq")
    assert torch.load(tmp_path / "new.msq", weights_only=True)["format"] == msq_fx.io.FORMAT
    new = msq_fx.load(tmp_path / "new.msq", trusted=True)
    assert old.state_dict().keys() == new.state_dict().keys()
    assert all(torch.equal(value, new.state_dict()[key]) for key, value in old.state_dict().items())


def test_a_file_saved_without_its_structure_loads_into_a_model_only(tmp_path):
    int_model, inputs = _converted_cnn({0: 3, 1: 5})
    msq_fx.save(int_model, tmp_path / "with.msq")
    msq_fx.save(int_model, tmp_path / "without.msq", structure=False)
    with pytest.raises(msq_fx.io.MSQFileError, match=r"without\.msq: holds no module structure "
                                                      r"\(it was saved with structure=False\)"):
        msq_fx.load(tmp_path / "without.msq", trusted=True)
    torch.manual_seed(1)
    skeleton = msq_fx.convert(msq_fx.prepare(msq_fx.SmallCNN(in_channels=1, width=16), inputs))
    loaded = msq_fx.load(tmp_path / "without.msq", model=skeleton)
    assert torch.equal(eval_output(loaded, inputs), eval_output(int_model, inputs))
    assert not msq_fx.io.saved_sizes(tmp_path / "without.msq").structure
    assert msq_fx.io.saved_sizes(tmp_path / "with.msq").structure
    assert (tmp_path / "without.msq").stat().st_size < (tmp_path / "with.msq").stat().st_size


class WithOtherTensors(torch.nn.Module):
    """Tensors a state_dict does not hold (a non-persistent buffer, a plain attribute), one of
    1 MiB or more (kept float), and a sparse buffer."""

    def __init__(self):
        super().__init__()
        self.small = torch.nn.Linear(4, 8)
        self.large = torch.nn.Linear(512, 512)
        self.register_buffer("positions", torch.arange(5.0), persistent=False)
        self.register_buffer("mask", torch.eye(3).to_sparse())
        self.table = torch.arange(6).reshape(2, 3)

    def forward(self, x):
        return self.large(self.small(x).repeat(1, 64)) + self.positions.sum()


OTHER_TENSORS_CONFIG = msq_fx.MSQConfig(quantization=dict(exclude=("large.weight",)))


def _saved_with_other_tensors(path) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    inputs = torch.randn(2, 4)
    int_model = msq_fx.convert(msq_fx.prepare(WithOtherTensors(), inputs, OTHER_TENSORS_CONFIG))
    msq_fx.save(int_model, path)
    return int_model, inputs


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_every_kind_of_tensor_comes_back_from_a_trusted_load(tmp_path):
    int_model, inputs = _saved_with_other_tensors(tmp_path / "model.msq")
    loaded = msq_fx.load(tmp_path / "model.msq", trusted=True)
    assert torch.equal(loaded.positions, int_model.positions)
    assert torch.equal(loaded.table, int_model.table)
    assert torch.equal(loaded.mask.to_dense(), torch.eye(3))
    assert isinstance(loaded.large.weight, torch.nn.Parameter) and loaded.large.weight.requires_grad
    assert torch.equal(eval_output(loaded, inputs), eval_output(int_model, inputs))
    # The 1 MiB float weight is a record of its own, not a copy inside the blob.
    payload = torch.load(tmp_path / "model.msq", weights_only=True)
    assert any(t.shape == (512, 512) for t in payload["own"].values())
    assert payload["tensors"].numel() < 512 * 512 * 4


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_a_skeleton_load_fills_large_and_sparse_tensors_too(tmp_path):
    int_model, inputs = _saved_with_other_tensors(tmp_path / "model.msq")
    torch.manual_seed(1)
    skeleton = msq_fx.convert(msq_fx.prepare(WithOtherTensors(), inputs, OTHER_TENSORS_CONFIG))
    loaded = msq_fx.load(tmp_path / "model.msq", model=skeleton)
    assert torch.equal(eval_output(loaded, inputs), eval_output(int_model, inputs))


def _rewritten(tmp_path, saved, change) -> str:
    """A copy of ``saved`` whose payload ``change`` altered, without a checksum (as a file
    written before checksums would be), so only the header's own checks can refuse it."""
    payload = torch.load(saved, weights_only=True)
    change(payload)
    del payload["checksum"]
    torch.save(payload, tmp_path / "altered.msq")
    return str(tmp_path / "altered.msq")


def _header(payload) -> tuple[dict, bytes]:
    text, _, structure = lzma.decompress(payload["header"].numpy().tobytes()).partition(b"\n")
    return json.loads(text), structure


def _with_header(payload, header: dict, structure: bytes) -> None:
    data = json.dumps(header).encode() + b"\n" + structure
    payload["header"] = torch.frombuffer(bytearray(lzma.compress(data)), dtype=torch.uint8)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.update(header=p["header"][:-7]), "does not decompress|is cut short"),
    (lambda p: p.update(tensors=p["tensors"][:-4]), "lays out .* bytes of tensors"),
    (lambda p: p.update(codes=torch.cat([p["codes"], torch.zeros(3, dtype=torch.uint8)])),
     "lays out .* bytes of packed codes"),
])
def test_a_header_that_does_not_describe_the_file_is_refused_naming_it(tmp_path, damage, message):
    int_model, _ = _converted_cnn({0: 3})
    msq_fx.save(int_model, tmp_path / "model.msq")
    path = _rewritten(tmp_path, tmp_path / "model.msq", damage)
    for read in (lambda: msq_fx.load(path, trusted=True),
                 lambda: msq_fx.load(path, model=_converted_cnn({0: 3})[0]),
                 lambda: msq_fx.saved_config(path)):
        with pytest.raises(msq_fx.io.MSQFileError,
                           match=f"altered.msq: truncated or corrupt: its header.*({message})"):
            read()


@pytest.mark.parametrize("edit", [
    lambda header: header["tensors"][0].__setitem__(0, "no_such_dtype"),
    lambda header: header["codes"][0].__setitem__(2, 9),
    lambda header: header["state"][0].__setitem__(2, 10**6),
    lambda header: header["tensors"][0].__setitem__(2, "striped"),
    lambda header: header.pop("state"),
])
def test_a_header_with_impossible_entries_is_refused_before_any_tensor_is_read(tmp_path, edit):
    int_model, _ = _converted_cnn({0: 3})
    msq_fx.save(int_model, tmp_path / "model.msq")

    def damage(payload):
        header, structure = _header(payload)
        edit(header)
        _with_header(payload, header, structure)

    path = _rewritten(tmp_path, tmp_path / "model.msq", damage)
    with pytest.raises(msq_fx.io.MSQFileError, match="truncated or corrupt: its header"):
        msq_fx.load(path, trusted=True)


class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return exec, ("import builtins; builtins.msq_fx_test_pickle_ran = True",)


def test_only_a_trusted_load_unpickles_the_structure(tmp_path, monkeypatch):
    import builtins

    int_model, inputs = _converted_cnn({0: 3})
    msq_fx.save(int_model, tmp_path / "model.msq")

    def plant(payload):  # a structure that runs code, with a header that admits its length
        header, _ = _header(payload)
        structure = pickle.dumps(RunsCodeWhenUnpickled())
        header["structure"] = {"bytes": len(structure)}
        _with_header(payload, header, structure)

    path = _rewritten(tmp_path, tmp_path / "model.msq", plant)
    monkeypatch.setattr(builtins, "msq_fx_test_pickle_ran", False, raising=False)
    loaded = msq_fx.load(path, model=_converted_cnn({0: 3})[0])
    msq_fx.saved_config(path), msq_fx.saved_report(path), msq_fx.io.saved_sizes(path)
    with pytest.raises(msq_fx.io.MSQFileError, match="Pass model=.* or trusted=True"):
        msq_fx.load(path)
    assert builtins.msq_fx_test_pickle_ran is False
    assert torch.equal(eval_output(loaded, inputs), eval_output(int_model, inputs))
    with pytest.raises(msq_fx.io.MSQFileError, match="unpickles to a NoneType, not a module"):
        msq_fx.load(path, trusted=True)
    assert builtins.msq_fx_test_pickle_ran is True


def test_the_file_sizes_add_up_to_the_file(tmp_path):
    int_model, _ = _converted_cnn({0: 3, 1: 5, 2: 2})
    msq_fx.save(int_model, tmp_path / "model.msq")
    sizes = msq_fx.io.saved_sizes(tmp_path / "model.msq")
    lowered = [m for m in int_model.modules() if isinstance(m, LoweredWeight)]
    codes = {id(m.codes) for m in lowered}
    others = {id(t): t for t in int_model.state_dict(keep_vars=True).values() if id(t) not in codes}
    assert sizes.code_bytes == sum(packed_size(m.codes.numel(), m.num_bits) for m in lowered)
    assert sizes.tensor_bytes == sum(t.numel() * t.element_size() for t in others.values())
    assert sizes.file_bytes == (tmp_path / "model.msq").stat().st_size
    assert sizes.code_bytes + sizes.tensor_bytes + sizes.other_bytes == sizes.file_bytes
    assert f"{sizes.file_bytes:,} bytes" in str(sizes)


def test_a_saved_file_gets_the_permissions_the_umask_gives(tmp_path):
    int_model, _ = _converted_cnn({})
    previous = os.umask(0o022)
    try:
        msq_fx.save(int_model, tmp_path / "model.msq")
    finally:
        os.umask(previous)
    assert (tmp_path / "model.msq").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["model.msq"]  # no temporary file left


def test_loading_onto_a_named_device_puts_every_tensor_there(tmp_path):
    int_model, inputs = _converted_cnn({0: 3})
    msq_fx.save(int_model, tmp_path / "model.msq")
    loaded = msq_fx.load(tmp_path / "model.msq", trusted=True, map_location="cpu")
    assert {t.device.type for t in loaded.state_dict().values()} == {"cpu"}
    assert torch.equal(eval_output(loaded, inputs), eval_output(int_model, inputs))
