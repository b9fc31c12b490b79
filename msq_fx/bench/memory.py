"""Peak memory of one step: the peak of bytes held by live tensors while it runs.

On a GPU that is what ``torch.cuda.max_memory_allocated`` reports. On CPU torch keeps no such
counter, so it is rebuilt from the allocator itself: with
``torch.profiler.profile(profile_memory=True)`` every allocation and free of the CPU allocator
(tensors, autograd buffers, oneDNN scratchpads, which torch routes through the same allocator)
is recorded with its size and time. The peak is then

    bytes live when the step starts + max over the step of the running sum of those records.

The first term is counted directly: the unique storages of parameters, gradients, buffers,
optimizer state and the batch. The profiler does not report freeing a block allocated before it
started, so two steps are profiled and only the second one is measured: every block it frees
(the previous gradients released by zero_grad) was allocated inside the profile.
The profiler's memory reporting is per thread, so an allocation made by an intra-op worker
thread inside a parallel kernel could be missed. ``--threads 1`` runs every kernel on the
profiled thread and so gives a check: for ResNet-20 its peak is not above the 2-thread peak
(203,122,328 vs 203,278,360 bytes in float), i.e. nothing that matters is missed there.
Bytes are the tensors' sizes as requested from the allocator, not the process RSS, which malloc
caching and fragmentation make depend on history rather than on the model. ``tracemalloc`` is
no option: it sees only Python's allocator, not torch's.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from .contenders import Contender, train_step

__all__ = ["MEASURED_STEP", "unique_storage_bytes", "resident_state_bytes",
           "between_epochs_bytes", "cpu_peak_bytes", "cuda_peak_bytes", "peak_bytes",
           "step_peak_bytes"]

#: The profiler range around the measured (second) run.
MEASURED_STEP = "bench/measured_step"


def unique_storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a shared storage counts once)."""
    sizes: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        sizes[storage.data_ptr()] = storage.nbytes()
    return sum(sizes.values())


def _state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer,
                   batch: tuple[Tensor, Tensor]) -> list[Tensor]:
    tensors = [*model.parameters(), *model.buffers(), *batch]
    tensors += [v for state in optimizer.state.values() for v in state.values()
                if isinstance(v, Tensor)]
    return tensors


def resident_state_bytes(contender: Contender, batch: tuple[Tensor, Tensor]) -> int:
    """Bytes live between steps: parameters, gradients, buffers, optimizer state and the batch."""
    model = contender.model
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return unique_storage_bytes(_state_tensors(model, contender.optimizer, batch) + grads)


def between_epochs_bytes(model: nn.Module, optimizer: torch.optim.Optimizer,
                         batch: tuple[Tensor, Tensor]) -> int:
    """Bytes live at an epoch's end: parameters, buffers, optimizer state, the batch."""
    return unique_storage_bytes(_state_tensors(model, optimizer, batch))


def _measured_window(events) -> tuple[int, int]:
    marks = [e for e in events if e.name() == MEASURED_STEP]
    if len(marks) != 1:
        raise RuntimeError(f"expected one {MEASURED_STEP!r} range in the profile, "
                           f"found {len(marks)}")
    return marks[0].start_ns(), marks[0].end_ns()


def _running_peak(byte_deltas: Iterable[int]) -> int:
    live = peak = 0
    for delta in byte_deltas:
        live += delta
        peak = max(peak, live)
    return peak


def cpu_peak_bytes(run: Callable[[], object], resident: Callable[[], int]) -> int:
    """Peak bytes of live tensors while ``run()`` runs a second time; ``resident()`` counts
    what is live before it starts."""
    # The profiler cannot size a free of a block allocated before it started. Measuring only
    # the second profiled run means every block it frees was allocated, and recorded, inside
    # the profile (callers drop state the first run would free, such as gradients, beforehand).
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
        live_before = resident()
        with record_function(MEASURED_STEP):
            run()
    events = prof.profiler.kineto_results.events()
    start, end = _measured_window(events)
    records = sorted((e for e in events if e.name() == "[memory]"
                      and e.device_type() == DeviceType.CPU
                      and start <= e.start_ns() <= end), key=lambda e: e.start_ns())
    return live_before + _running_peak(e.nbytes() for e in records)


def cuda_peak_bytes(run: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def peak_bytes(run: Callable[[], object], resident: Callable[[], int],
               device: torch.device) -> int:
    """Peak bytes of one ``run()``: the CUDA allocator's counter, or on CPU the profiler's."""
    if device.type == "cuda":
        return cuda_peak_bytes(run, device)
    return cpu_peak_bytes(run, resident)


def step_peak_bytes(contender: Contender, batch: tuple[Tensor, Tensor],
                    device: torch.device) -> int:
    """Peak bytes of one training step of ``contender`` on ``batch``."""
    contender.optimizer.zero_grad(set_to_none=True)
    return peak_bytes(lambda: train_step(contender, *batch),
                      lambda: resident_state_bytes(contender, batch), device)
