"""Shared test fixtures and helpers."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

import pytest
import torch
from torch import nn

import msq_fx
import msq_fx.check.coverage
from msq_fx import quant

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core: a thread pool in each worker would only contend with the other.
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors on a shared 2-core machine: intra-op threads only contend (up to 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def compiled_models(monkeypatch) -> list:
    """torch.compile on its aot_eager backend, which traces as the default backend does without
    generating kernels (a faster test); the list of the models it was given."""
    compiled = []
    real_compile = torch.compile

    def compile_quickly(model, **options):
        compiled.append(model)
        return real_compile(model, **{**options, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", compile_quickly)
    return compiled


def load_tool(path, module_name: str):
    """Import an executable script from tools/ (no .py suffix, so the loader is named explicitly).

    The module is registered before it runs so its dataclasses can resolve their annotations.
    """
    loader = importlib.machinery.SourceFileLoader(module_name, str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    sys.modules[loader.name] = module
    loader.exec_module(module)
    return module


def write_cifar_like(path: Path, train: int, test: int, exact: int) -> Path:
    """A CIFAR-10-shaped ``.npz`` at ``path`` (random pixels and labels, seeded), its first
    ``exact`` test images marked bit-exact: what the CIFAR tools read, with no data needed."""
    generator = np.random.default_rng(0)
    np.savez(path, x_train=generator.integers(0, 256, (train, 32, 32, 3), dtype=np.uint8),
             y_train=generator.integers(0, 10, train, dtype=np.uint8),
             x_test=generator.integers(0, 256, (test, 32, 32, 3), dtype=np.uint8),
             y_test=generator.integers(0, 10, test, dtype=np.uint8),
             test_exact=np.arange(test) < exact)
    return path


def expected_weight_names(model: nn.Module) -> set[str]:
    """Every conv / linear / attention weight FQN, from the module tree alone (not from the
    discover pass under test)."""
    return msq_fx.check.coverage.expected_weight_names(model)


def reported_names(model: nn.Module) -> set[str]:
    rows = msq_fx.report(model).layers
    return {row.name for row in rows} | {n for row in rows for n in row.shared_with}


def eval_output(model: nn.Module, inputs) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    model.train(was_training)
    return out


def count_calls(monkeypatch, function_name: str) -> list[int]:
    """A one-item list holding how many times ``msq_fx.quant.<function_name>`` has been called."""
    calls = [0]
    original = getattr(quant, function_name)

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(quant, function_name, counting)
    return calls
