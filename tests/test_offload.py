"""Specification of msq_fx.offload.offload_saved_tensors: the activations a forward saves for its
backward live in files until the backward reads them, and the gradients are the same bits."""

from __future__ import annotations

import contextlib
import json
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

import msq_fx
import msq_fx.offload
from msq_fx import cli
from msq_fx.offload import _DiskHooks


def small_convnet(channels_last: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    return model.to(memory_format=torch.channels_last) if channels_last else model


def gradients(model: nn.Module, x: torch.Tensor, offload: bool, **options) -> list[torch.Tensor]:
    model.zero_grad()
    with (msq_fx.offload.offload_saved_tensors(**options) if offload else contextlib.nullcontext()):
        model(x).square().sum().backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_same_bits(first: list[torch.Tensor], second: list[torch.Tensor]) -> None:
    assert len(first) == len(second) > 0
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_gradients_are_the_same_bits_with_activations_on_disk():
    model, x = small_convnet(), torch.randn(2, 3, 16, 16)
    assert_same_bits(gradients(model, x, offload=False),
                     gradients(model, x, offload=True, min_bytes=0))


def test_channels_last_activations_come_back_in_their_layout_with_the_same_gradients():
    model = small_convnet(channels_last=True)
    x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    assert_same_bits(gradients(model, x, offload=False),
                     gradients(model, x, offload=True, min_bytes=0))


def test_an_msq_prepared_model_offloads_what_it_does_not_recompute():
    x = torch.randn(2, 3, 16, 16)
    qmodel = msq_fx.prepare(small_convnet(), x, msq_fx.MSQConfig())
    expected = gradients(qmodel, x, offload=False)
    qmodel.zero_grad()
    with msq_fx.offload.offload_saved_tensors(min_bytes=0) as hooks:
        qmodel(x).square().sum().backward()
    assert hooks.count > 0
    assert_same_bits(expected, [p.grad for p in qmodel.parameters() if p.grad is not None])


def test_double_backward_through_offloaded_activations_gives_the_same_hessian_vector_product():
    model, x = small_convnet(), torch.randn(2, 3, 16, 16)
    model.eval()
    params = [p for p in model.parameters()]
    vector = [torch.randn_like(p) for p in params]

    def hessian_vector_product(offload: bool) -> list[torch.Tensor]:
        with (msq_fx.offload.offload_saved_tensors(min_bytes=0) if offload
              else contextlib.nullcontext()):
            grads = torch.autograd.grad(model(x).tanh().sum(), params, create_graph=True)
            dot = sum((g * v).sum() for g, v in zip(grads, vector))
            return list(torch.autograd.grad(dot, params))

    assert_same_bits(hessian_vector_product(False), hessian_vector_product(True))


def test_files_live_in_the_given_directory_only_while_the_context_is_open(tmp_path):
    model, x = small_convnet(), torch.randn(2, 3, 16, 16)
    with msq_fx.offload.offload_saved_tensors(tmp_path, min_bytes=0) as hooks:
        loss = model(x).square().sum()
        written = list(tmp_path.rglob("*.bin"))
        loss.backward()
    assert len(written) == hooks.count > 0
    assert list(tmp_path.iterdir()) == []


def test_a_backward_frees_its_files_before_the_context_closes(tmp_path):
    model, x = small_convnet(), torch.randn(2, 3, 16, 16)
    with msq_fx.offload.offload_saved_tensors(tmp_path, min_bytes=0):
        model(x).square().sum().backward()
        assert list(tmp_path.rglob("*.bin")) == []


def test_tensors_below_min_bytes_and_parameters_stay_in_memory():
    weight = nn.Parameter(torch.randn(512, 512))  # 1 MiB, saved by the multiplication
    x = torch.randn(512, 512, requires_grad=True)
    activation = x * 2.0  # not a leaf: this one goes to disk
    with msq_fx.offload.offload_saved_tensors(min_bytes=2**20) as hooks:
        (weight * activation).sum().backward()
    assert (hooks.count, hooks.bytes_written) == (1, 2**20)
    with msq_fx.offload.offload_saved_tensors(min_bytes=2**20 + 1) as hooks:
        (weight * (x * 2.0)).sum().backward()
    assert hooks.count == 0


def test_a_negative_min_bytes_is_refused():
    with pytest.raises(ValueError, match="min_bytes"):
        with msq_fx.offload.offload_saved_tensors(min_bytes=-1):
            pass


def test_check_model_with_offloaded_activations_passes_and_says_how_much_went_to_disk():
    result = msq_fx.check_model("timm:resnet18", input_size=96, steps=1,
                                offload_activations=True)
    assert result.passed, result.reason
    assert result.offloaded_mib > 0
    assert msq_fx.check_model("timm:resnet18", input_size=96, steps=1).offloaded_mib is None


def test_cli_offload_activations_reaches_the_check_and_releases_freed_memory(capsys,
                                                                            monkeypatch):
    released = []  # recorded, not done: it would slow this test process's later allocations
    monkeypatch.setattr(cli, "release_freed_memory", lambda: released.append(True))
    code = cli.main(["check", "--json", "--input-size", "96", "--steps", "1",
                     "--offload-activations", "timm:resnet18"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (code, result["status"]) == (0, "PASS")
    assert result["offloaded_mib"] > 0
    assert released == [True]


def test_a_saved_tensor_comes_back_with_its_values_and_strides_whatever_its_layout(tmp_path):
    base = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    layouts = {"contiguous": base, "transposed": base.transpose(1, 3),
               "channels_last": base.contiguous(memory_format=torch.channels_last),
               "bfloat16": base.to(torch.bfloat16), "bool": base > 50, "scalar": torch.tensor(2.5)}
    gapped = {"strided slice": base[:, ::2], "expanded": torch.ones(3, 1).expand(3, 4)}
    disk = _DiskHooks(tmp_path, min_bytes=0)
    for name, tensor in {**layouts, **gapped}.items():
        restored = disk.unpack(disk.pack(tensor))
        assert restored.dtype == tensor.dtype and torch.equal(restored, tensor), name
        if name in layouts:  # gaps and overlaps come back contiguous
            assert restored.stride() == tensor.stride(), name


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_release_freed_memory_takes_effect_under_glibc():
    # In a child process: the setting lasts for the rest of the process that makes it.
    done = subprocess.run([sys.executable, "-c",
                           "import msq_fx.offload; "
                           "print(msq_fx.offload.release_freed_memory(1 << 20))"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "True"


def test_release_freed_memory_refuses_a_threshold_that_is_not_positive():
    with pytest.raises(ValueError, match="threshold_bytes"):
        msq_fx.offload.release_freed_memory(0)
