"""Counting the aten ops a piece of torch code dispatches: what a benchmark reports and what
tests bound. Ops that are views are not kernels; what is left is roughly what a GPU launches."""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

VIEW_OPS = {
    "view", "_unsafe_view", "transpose", "t", "unsqueeze", "squeeze", "expand", "slice",
    "select", "permute", "alias", "reshape", "split", "split_with_sizes", "chunk", "unbind",
    "detach", "as_strided", "narrow", "_reshape_alias", "lift_fresh",
}  # fmt: skip


class CountOps(TorchDispatchMode):
    """Aten ops dispatched (`count`), those that are not views (`kernels`), and the kernels by
    name (`by_name`). torch.compile steps aside under a dispatch mode: compiled code is
    counted as the eager ops it replaces."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.kernels = 0
        self.by_name: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += 1
        name = func.overloadpacket.__name__
        if name not in VIEW_OPS:
            self.kernels += 1
            self.by_name[name] += 1
        return func(*args, **(kwargs or {}))
