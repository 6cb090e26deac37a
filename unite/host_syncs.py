"""Counting the places where a GPU program waits for the device: reads of device values on the host.

A CUDA program stalls whenever the host needs a value that lives on the device: `.item()`,
`.tolist()`, `bool(tensor)`, a blocking copy to the CPU, or an op whose output size depends on
values (`nonzero`, boolean indexing); and at a blocking copy to the device, after which torch
synchronises the stream. `HostSyncCounter` sees these at the dispatcher, so it
counts them on any tensors, fake ones included: under `FakeTensorMode` a program that reads a
value would fail (`DataDependentOutputException`); the counter answers such reads itself with a
fixed value (`answer`), so the program runs on and every read is counted.

Reads of a tensor that already lives on the host (`host` device) are not syncs and are not counted;
under fake tensors they are answered with `answer` too.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose output size depends on the values of a device tensor: the host waits for them.
_VALUE_SIZED = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
                aten.unique_consecutive.default, aten.unique_dim.default}
_COPIES = {aten._to_copy.default, aten.copy_.default}
# Boolean results that a check wants False (`if x.any(): raise`, `if low < 0: raise`).
_FALSE_ANSWERS = {"any", "lt", "le", "gt", "ge", "ne", "isnan", "isinf", "logical_not"}


class HostSyncCounter(TorchDispatchMode):
    """Counts host reads of device values while active.

    `syncs`: how many times the host waits for the device. A `.tolist()` of one tensor reads its
    elements one by one at the dispatcher but waits once, so consecutive scalar reads of one
    storage count once. `values`: how many values were copied to the host. `where`: syncs by op.

    Under fake tensors every scalar read gets an answer that lets checks pass: True for the
    result of an `all` or `==`, False for an `any` or another comparison (`x < 0`), and
    `answer` (0 unless changed) for any other value."""

    def __init__(self, host: torch.device = torch.device("cpu"), answer: Any = 0):
        super().__init__()
        self.host = torch.device(host)
        self.answer = answer
        self.syncs = 0
        self.values = 0
        self.where: Counter[str] = Counter()
        self._last_storage: int | None = None
        self._producers: dict[int, str] = {}

    def _count(self, name: str, values: int, storage: int | None = None) -> None:
        self.values += values
        if storage is not None and storage == self._last_storage:
            return
        self._last_storage = storage
        self.syncs += 1
        self.where[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        on_device = isinstance(first, torch.Tensor) and first.device != self.host
        if func is aten._local_scalar_dense.default:
            if on_device:
                self._count("item", 1, _storage_key(first))
                return self._answer(first)
            self._last_storage = None
            try:
                return func(*args, **kwargs)
            except DataDependentOutputException:  # a host value check on fake tensors
                return self._answer(first)
        self._last_storage = None
        if on_device and func in _VALUE_SIZED:
            self._count(func.__name__, first.numel())
        elif func in _COPIES:
            self._count_copy(func, args, kwargs)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.dtype == torch.bool:
            self._producers[_storage_key(out)] = func.overloadpacket.__name__
        return out

    def _answer(self, tensor: torch.Tensor) -> Any:
        producer = self._producers.get(_storage_key(tensor))
        if producer in ("all", "eq"):
            return True
        if producer in _FALSE_ANSWERS:
            return False
        return self.answer

    def _count_copy(self, func, args, kwargs) -> None:
        """A blocking copy between the host and the device waits for the device: to the host
        for the values; to the device because torch synchronises the stream after a blocking
        copy from pageable memory (`torch.tensor(x, device="cuda")` is one). A non_blocking copy
        does not (to the host, the program copies into pinned memory and reads it after an
        event)."""
        if func is aten._to_copy.default:
            source, target = args[0], kwargs.get("device")
            non_blocking = kwargs.get("non_blocking", False)
        else:
            source, target = args[1], args[0].device
            non_blocking = kwargs.get("non_blocking", len(args) > 2 and args[2])
        if not isinstance(source, torch.Tensor) or target is None or non_blocking:
            return
        target = torch.device(target)
        if source.device != self.host and target == self.host:
            self._count("copy to host", source.numel())
        elif source.device == self.host and target != self.host:
            self._count("copy to device", 0)


def _storage_key(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None
