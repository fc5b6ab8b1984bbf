"""Count what a piece of PyTorch code launches and where it would wait for the GPU:
ATen ops (through a ``TorchDispatchMode``) and Triton kernel launches. A
measurement tool for ``benchmarks/dare_step_launches.py`` and the tests that
check the DARE layer step never reads device values back.

Under Triton's interpreter (CPU) a kernel launch runs its body as PyTorch/NumPy
work; ``triton_launches_counted`` counts the launch and pauses the op counter
meanwhile, so only the code's own ops are counted.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from contextlib import contextmanager

from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops that launch no work (views).
VIEW_OPS = frozenset({
    "view", "slice", "permute", "select", "detach", "split_with_sizes", "t", "transpose",
    "reshape", "as_strided", "_reshape_alias", "expand", "unsqueeze", "squeeze", "alias",
    "_unsafe_view"})
# ATen ops whose result the host must read back from the device before it can go on
# (a host sync on a GPU): a scalar read, a data-dependent output size, a comparison
# answered on the host.
SYNC_OPS = frozenset({
    "_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select",
    "repeat_interleave", "_unique2", "unique_consecutive"})


class OpCounter(TorchDispatchMode):
    """``ops``: ATen ops seen by name, in order of first use (while not ``paused``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def work(self) -> dict[str, int]:
        return {name: n for name, n in self.ops.items() if name not in VIEW_OPS}

    @property
    def views(self) -> dict[str, int]:
        return {name: n for name, n in self.ops.items() if name in VIEW_OPS}

    @property
    def syncs(self) -> dict[str, int]:
        return {name: n for name, n in self.ops.items() if name in SYNC_OPS}

    @contextmanager
    def paused_for(self) -> Iterator[None]:
        """Not counting (e.g. a measurement's own reads)."""
        was, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = was


@contextmanager
def triton_launches_counted(counter: OpCounter) -> Iterator[collections.Counter]:
    """Within: interpreted Triton launches counted by kernel name in the yielded
    counter, with ``counter`` paused during each."""
    import triton.runtime.interpreter as interpreter

    launches: collections.Counter = collections.Counter()
    original = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        launches[self.fn.__name__] += 1
        with counter.paused_for():
            return original(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = run
    try:
        yield launches
    finally:
        interpreter.InterpretedFunction.run = original
