"""Inputs of a compiled region kept at stable addresses between calls, for inductor's CUDA graphs.

Under ``compile_mode="reduce-overhead"`` (or "max-autotune") inductor replays the compiled flow from CUDA graphs
(cudagraph trees). Every static input (the weights, and the cached condition K/V, which the stages mark static so that
replays read them in place) must sit at the address the graph was recorded with; if one has moved, the tree records a
new graph: a device synchronisation, a capture, another synchronisation, and one more graph kept in the tree. A fresh
K/V per object moved them on every call (session 10: 9 recordings in 5 SS stage calls, 1.41 s -> 1.04-1.09 s per call
once held; ``benchmarks/results/base_vs_official_h100/session10/``).

:class:`HeldInputs` is the store a stage keeps; each sampler call takes a :class:`HeldLease` and asks it for its
inputs. A lease copies its values into the buffers held under that key when their structure, shapes, dtypes and
devices match and no other live lease reads them; otherwise it gets fresh copies (correct, but the graph re-records).
Why leases: two velocity functions can be alive at once (e.g. ``fs3d_analysis.scene``'s guided batch keeps a
conditional and an unconditional one), and a second one writing into the buffers the first still reads would feed it
the wrong condition.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree


@dataclass
class _Entry:
    spec: Any
    leaves: list
    owner: "weakref.ref[HeldLease]"


class HeldInputs:
    """Buffers kept between calls, one set per key ("cond", "uncond", "both"). They stay allocated until
    :meth:`release`: they are not module buffers, so ``.to()`` does not move them (a stage with
    :class:`HoldsInputs` releases its store whenever it is moved or cast). A deep copy is an empty store: a copied
    stage allocates its own buffers."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def __deepcopy__(self, memo) -> "HeldInputs":
        return HeldInputs()

    def lease(self) -> "HeldLease":
        """The handle one sampler call uses; the buffers it filled are its own while it is alive."""
        return HeldLease(self)

    def keys(self) -> list[str]:
        return list(self._entries)

    def buffers(self, key: str) -> list:
        """The held leaves under ``key`` (tensors and any non-tensor leaves), for inspection."""
        return list(self._entries[key].leaves)

    def release(self) -> None:
        """Drop every held buffer (the next call allocates new ones, and its graphs record once)."""
        self._entries.clear()

    def _inputs(self, lease: "HeldLease", tree, key: str, make_copies: Callable[[Any], Any]):
        leaves, spec = pytree.tree_flatten(tree)
        entry = self._entries.get(key)
        if entry is not None:
            holder = entry.owner()
            if holder is not None and holder is not lease:
                return make_copies(tree)  # another live call reads these buffers: leave them alone
            if entry.spec == spec and all(_fits(a, b) for a, b in zip(entry.leaves, leaves)):
                with torch.no_grad():  # a copy under grad mode would attach history to the held buffers
                    for dst, src in zip(entry.leaves, leaves):
                        if isinstance(dst, torch.Tensor):
                            dst.copy_(src)
                entry.owner = weakref.ref(lease)
                return pytree.tree_unflatten(entry.leaves, spec)
        out = make_copies(tree)
        self._entries[key] = _Entry(spec, pytree.tree_leaves(out), weakref.ref(lease))
        return out


class HeldLease:
    """One call's access to a :class:`HeldInputs` store (see the module docstring)."""

    __slots__ = ("store", "__weakref__")

    def __init__(self, store: HeldInputs) -> None:
        self.store = store

    def inputs(self, tree, key: str, make_copies: Callable[[Any], Any]):
        """``tree``'s values in the held buffers under ``key`` (``make_copies(tree)`` builds new buffers when none
        fit, or when another live lease reads them)."""
        return self.store._inputs(self, tree, key, make_copies)


def _fits(kept, new) -> bool:
    """Whether ``new`` can be copied into the held ``kept``: tensors of equal shape, dtype and device (and not an
    inference-mode buffer outside inference mode, which refuses in-place writes); anything else must be equal."""
    if isinstance(kept, torch.Tensor) or isinstance(new, torch.Tensor):
        return (isinstance(kept, torch.Tensor) and isinstance(new, torch.Tensor) and kept.shape == new.shape
                and kept.dtype == new.dtype and kept.device == new.device
                and not (kept.is_inference() and not torch.is_inference_mode_enabled()))
    return kept == new


class HoldsInputs:
    """For a stage (an ``nn.Module``) that keeps a :class:`HeldInputs` store: the store lives outside the module tree
    (state dicts and hooks do not see it), and moving or casting the stage releases it, since its buffers would stay
    behind on the old device. Put it before ``nn.Module`` in the bases."""

    def held_inputs(self) -> HeldInputs:
        """The store of condition K/V kept between calls for the compiled flow's CUDA graphs."""
        return self.__dict__.setdefault("_held_inputs", HeldInputs())

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half() move or cast the weights; the held K/V (not module buffers) would stay behind on
        # the old device, so they are dropped instead
        self.release_held_inputs()
        return super()._apply(fn, recurse)

    def release_held_inputs(self) -> None:
        """Free the held K/V buffers (the next compiled call under CUDA graphs records its graphs once more)."""
        self.__dict__.pop("_held_inputs", None)


__all__ = ["HeldInputs", "HeldLease", "HoldsInputs"]
