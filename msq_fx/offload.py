"""Saved activations on disk: a training step whose activations do not fit in memory.

A backward pass needs the activations its forward saved; at high resolution or on deep models
they outgrow the weights (EfficientNet-L2 at 800 px, batch 1: tens of GiB on top of 1.8 GiB of
weights). Inside :func:`offload_saved_tensors`, each saved tensor of at least ``min_bytes`` is
written to a file when the forward saves it and read back when the backward needs it, so memory
holds the weights and the working set of one op at a time; the disk and the page cache hold the
rest (page cache is not the process's memory: it counts against neither its resident size nor
an address-space cap, and the kernel drops it under pressure).

Freed memory has to leave the process too: glibc's malloc keeps freed blocks below its mmap
threshold (which rises to 32 MiB as large blocks are freed) in its heap, so without
:func:`release_freed_memory` (or ``MALLOC_MMAP_THRESHOLD_=1048576`` in the environment) the
activations read back and dropped still count, and offloading saves almost nothing.

Parameters are never written out (they are alive anyway), and quantized weights inside an MSQ
owner are recomputed rather than saved (``msq_fx.recompute``), which composes with
this: they hand every other saved tensor over to these hooks.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

__all__ = ["offload_saved_tensors", "release_freed_memory", "DEFAULT_MIN_BYTES"]

#: Saved tensors smaller than this stay in memory: the file per tensor costs more than they do.
DEFAULT_MIN_BYTES = 1 << 20

#: glibc's mallopt parameter for the mmap threshold (malloc.h).
_M_MMAP_THRESHOLD = -3


def release_freed_memory(threshold_bytes: int = 1 << 20) -> bool:
    """Make glibc's malloc serve every block of at least ``threshold_bytes`` by its own mapping,
    returned to the system when freed, for the rest of the process; True if it took effect.

    The process-wide equivalent of ``MALLOC_MMAP_THRESHOLD_`` set before start (also fixing the
    threshold, which glibc otherwise raises as large blocks are freed). It costs a page fault
    per fresh page of each such block; False, changing nothing, where malloc is not glibc's.
    """
    if threshold_bytes <= 0:
        raise ValueError(f"threshold_bytes must be positive, got {threshold_bytes}")
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return False
    return bool(mallopt and mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)) == 1)


class _OnDisk:
    """One saved tensor written to ``path``; the file goes when autograd drops this record."""

    def __init__(self, tensor: Tensor, path: Path) -> None:
        self.path = path
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device
        tensor = tensor.detach().resolve_conj().resolve_neg().to("cpu")
        # A dense tensor comes back with its own strides (channels-last, transposed): the
        # backward then runs the kernels it would have run, summing in the same order. Its
        # elements fill one span of memory, written as it is; any other is written contiguous.
        self.stride = tensor.stride() if _is_dense(tensor) else None
        flat = (tensor.as_strided((tensor.numel(),), (1,)) if self.stride is not None
                else tensor.contiguous().reshape(-1))
        flat.view(torch.uint8).numpy().tofile(path)
        weakref.finalize(self, path.unlink, missing_ok=True)

    def load(self) -> Tensor:
        # torch's own allocation, not numpy's: its alignment is what the saving op had, and
        # vectorized kernels that see another alignment may sum in another order (other bits).
        tensor = (torch.empty(self.shape, dtype=self.dtype) if self.stride is None
                  else torch.empty_strided(self.shape, self.stride, dtype=self.dtype))
        with open(self.path, "rb") as file:
            file.readinto(tensor.as_strided((tensor.numel(),), (1,)).view(torch.uint8).numpy())
        return tensor.to(self.device)


def _is_dense(tensor: Tensor) -> bool:
    """Whether the elements fill one span of memory without gaps or overlaps, in some order."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(tensor.stride(), tensor.shape)
                               if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


class _DiskHooks:
    """The pack / unpack pair of :func:`offload_saved_tensors`."""

    def __init__(self, directory: Path, min_bytes: int) -> None:
        self.directory, self.min_bytes = directory, min_bytes
        self.count = 0
        self.bytes_written = 0

    def pack(self, tensor: Tensor) -> object:
        size = tensor.numel() * tensor.element_size()
        # A parameter (or a leaf the caller wants a gradient of, or a view of one, such as the
        # transposed weight a linear saves) is alive anyway: a copy on disk would only cost the
        # write. Sparse and other layouts have no flat bytes to write.
        base = tensor if tensor._base is None else tensor._base
        if (size == 0 or size < self.min_bytes or (base.is_leaf and base.requires_grad)
                or tensor.layout != torch.strided):
            return tensor.detach()  # a detached alias: autograd reattaches the graph on unpack
        self.count += 1
        self.bytes_written += size
        return _OnDisk(tensor, self.directory / f"saved_{self.count}.bin")

    def unpack(self, packed: object) -> Tensor:
        return packed.load() if isinstance(packed, _OnDisk) else packed


@contextmanager
def offload_saved_tensors(directory: str | Path | None = None,
                          min_bytes: int = DEFAULT_MIN_BYTES) -> Iterator[_DiskHooks]:
    """Inside, the tensors autograd saves for the backward go to files instead of staying in
    memory: in a fresh directory under ``directory`` (the system's temporary directory when
    None), removed on exit.

    Run the forward (whose ops save the tensors) and its backward inside. Gradients are the
    same bits as without (the files hold the exact bytes); double backward works too, since
    autograd keeps each saved tensor's place in the graph itself. It costs a write and a read
    of each saved tensor: use it when the activations, not the weights, are what does not fit.
    Yields the hooks, whose ``count`` and ``bytes_written`` say how much went to disk.
    """
    if min_bytes < 0:
        raise ValueError(f"min_bytes must be >= 0, got {min_bytes}")
    with tempfile.TemporaryDirectory(prefix="msq_fx_saved_", dir=directory) as temporary:
        hooks = _DiskHooks(Path(temporary), min_bytes)
        with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
            yield hooks
