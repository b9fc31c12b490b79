"""msq_fx.inference_bench (tools/bench_inference): the files it writes, what the memory and the
timing children measure, and the table; run in this process on a small CNN (the tool runs each
child in its own)."""

from __future__ import annotations

import pytest

from msq_fx import inference_bench


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def test_a_child_loads_each_contender_and_reproduces_its_output(tmp_path):
    files = inference_bench._prepare_files("msq_fx.models:SmallCNN", [4], tmp_path, (1, 16, 16))
    inference_bench._write_primer(tmp_path)
    measured = {}
    for contender, bits in [("float", None), ("dequantize", 4), ("packed", 4),
                            ("packed, conv kept", 4)]:
        path = inference_bench.contender_file(tmp_path, contender, bits)
        expected = tmp_path / ("float.expected.pt" if bits is None else "msq4.expected.pt")
        result = inference_bench.run_child(str(path), contender, str(tmp_path / "inputs.pt"),
                                           str(expected), forwards=2, warmup=1, threads=1)
        assert result.max_abs_diff == 0.0 and len(result.cpu_ms) == 2
        # In this process the memory figures mean little (msq_fx.load returns freed memory to
        # the system, possibly some this process held before): only that they are read.
        assert min(result.baseline_rss, result.rss_after_load, result.rss_after) > 0
        measured[(contender, bits)] = [result]
    held = {name: results[0].tensor_bytes for (name, _), results in measured.items()}
    # Packed 4-bit codes: under the int8 containers; with the conv weights kept in float as
    # well, above them, and under the float model (whose linear weights are float too).
    assert held["packed"] < held["dequantize"] < held["packed, conv kept"] < held["float"]
    timed = inference_bench.run_timing(str(tmp_path), list(measured), rounds=2, forwards=1,
                                       warmup=1, threads=1)
    assert all(len(found["cpu_ms"]) == 2 for found in timed.values())
    summary = inference_bench._summary("msq_fx.models:SmallCNN", files, measured,
                                       {inference_bench._run_of(n): t for n, t in timed.items()})
    assert summary["rows"][0]["time_ratio"] == 1.0
    assert summary["rows"][2]["file_ratio"] < 0.25
    table = inference_bench.markdown_table({"models": [summary]})
    assert table.count("\n") == 5 and "| SmallCNN | 4 | packed |" in table
    assert "| max \\|diff\\| |" in table  # a cell of its own


def test_the_command_line_defaults_name_the_three_models_at_8_and_4_bits():
    args = inference_bench.parse_args([])
    assert args.model == list(inference_bench.DEFAULT_MODELS) and args.bits == [8, 4]
    assert args.rounds == 5 and args.memory_rounds == 1
    assert args.contenders == list(inference_bench.CONTENDERS)
