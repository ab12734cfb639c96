"""Copies between host and device that never make the host wait for the device.

A plain `.to(device)` from ordinary (pageable) memory synchronizes the stream: the host waits
for every kernel queued before it. With async scheduling the host builds step t+1 while the
device still computes step t, so every copy of a step's inputs goes through pinned memory,
non-blocking, ordered on the stream after what is already queued (torch keeps the pinned
buffer alive until its copy is done). The way back (`HostCopy`) goes into pinned memory too,
and the host waits only when it reads the values.
"""

from __future__ import annotations

from typing import Any

import torch


def to_device(values: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host list, numpy array or CPU tensor on the device, without waiting for the copy."""
    tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(values, dtype=dtype)
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    if device.type == "cuda" and tensor.device.type == "cpu":
        # contiguous: pinning copies into the tensor's own layout, which an expanded tensor
        # (a stride 0, e.g. a decode's position on all three mrope axes) cannot be written to
        return tensor.contiguous().pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class HostCopy:
    """A device tensor on its way to the host: copied into pinned memory without waiting;
    `get` waits for that copy alone (an event after it), not for what was queued later."""

    def __init__(self, tensor: torch.Tensor):
        self.ready: torch.cuda.Event | None = None
        if tensor.is_cuda:
            self.tensor = tensor.to("cpu", non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(torch.cuda.current_stream(tensor.device))  # the copy's stream
        else:
            self.tensor = tensor

    def get(self) -> torch.Tensor:
        if self.ready is not None:
            self.ready.synchronize()
        return self.tensor
