"""Run a model with its heavy products skipped: every matrix product, convolution and attention returns zeros
of the right shape, everything else (indexing, hashing, coordinate logic) runs for real.

Why: counting the FLOPs a full-size sampler executes (``torch.utils.flop_counter``, which reads shapes only)
would otherwise mean running ~300 TFLOP on a CPU. Meta or fake tensors cannot do it for the sparse stages:
their coordinate structures are data-dependent (``unique``, hashing, neighbour lookups). Here those stay real
and only the arithmetic that a FLOP count reads from shapes is skipped. The outputs are meaningless; the
shapes, and so the FLOP count, are those of a real run as long as no control flow depends on the values of a
skipped product (true for the samplers without accelerators; tested against a real count on the mini model).

    with FlopCounterMode(display=False) as counter, skip_heavy_ops():
        sampler_run()
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

_aten = torch.ops.aten
#: the ops whose result is replaced by zeros (their FLOP formulas in torch's counter read shapes only)
HEAVY_OPS = frozenset(getattr(_aten, name).default for name in (
    "mm", "addmm", "bmm", "baddbmm", "matmul", "convolution", "_convolution",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention") if hasattr(_aten, name))


def _to_meta(x):
    return x.to("meta") if isinstance(x, torch.Tensor) else x


class SkipHeavyOps(TorchDispatchMode):
    """Dispatch mode: the ops of :data:`HEAVY_OPS` return zeros shaped as their meta kernel says; others run.
    ``skipped`` counts the replaced calls."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in HEAVY_OPS:
            return func(*args, **kwargs)
        self.skipped += 1
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        out = func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))
        return tree_map(lambda t: torch.zeros(t.shape, dtype=t.dtype, device=device)
                        if isinstance(t, torch.Tensor) else t, out)


@contextlib.contextmanager
def skip_heavy_ops() -> Iterator[SkipHeavyOps]:
    """Enter :class:`SkipHeavyOps`; enter a ``FlopCounterMode`` *outside* it so the counter sees every op first."""
    with SkipHeavyOps() as mode:
        yield mode


__all__ = ["HEAVY_OPS", "SkipHeavyOps", "skip_heavy_ops"]
