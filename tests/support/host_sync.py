"""Count the tensor operations that make the host wait for the device (tests only).

On a GPU, ``.item()``, ``bool(t)``, ``float(t)``, ``int(t)``, ``.tolist()``, ``.numpy()``, ``.cpu()`` and building a
device tensor from host data (``torch.tensor`` / ``torch.as_tensor`` of Python values) stall the Python thread until the queued
kernels finish. The calls are the same on CPU, so counting them (``torch.overrides.TorchFunctionMode``) shows on a CPU
machine whether a loop would synchronise a GPU. Calls made inside a module listed in ``inside`` (e.g. the diffusion
network, which is not the pack's code) are not counted.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import torch
from torch.overrides import TorchFunctionMode

SYNC_NAMES = frozenset({"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu", "tensor",
                        "as_tensor"})


class HostSyncCounter(TorchFunctionMode):
    """``with HostSyncCounter(inside=[net]) as c: ...`` then ``c.calls`` (a Counter of operation names)."""

    def __init__(self, inside: Iterable[torch.nn.Module] = ()):
        super().__init__()
        self.calls: Counter = Counter()
        self._depth = 0
        self._handles = []
        for module in inside:
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._leave))

    def _enter(self, *_):
        self._depth += 1

    def _leave(self, *_):
        self._depth -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        from_host = name not in ("tensor", "as_tensor") or not (args and isinstance(args[0], torch.Tensor))
        if name in SYNC_NAMES and from_host and not self._depth:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        return super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.calls.values())
