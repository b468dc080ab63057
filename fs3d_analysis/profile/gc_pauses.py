"""Python garbage-collector pauses inside a timed block.

Why: a host-bound stretch of a GPU call (the first SLaT step records the object's CUDA graphs while the GPU waits) is
also where Python allocates most, so a collection of the oldest generation that lands there stretches the call. The
first SLaT step's host time on the H100 varied from 30 to 55 ms for the same work (session 26), and cProfile cannot
show a collection as such: it bills it to whatever function allocated. ``gc.callbacks`` can, so this records every
collection that starts and ends inside the block, with its generation and duration.

    with GCPauses() as pauses:
        run()
    pauses.seconds, pauses.count(generation=2)

``freeze_after_warmup`` is the remedy to compare against: after compiling, move every object alive into the
interpreter's permanent generation (``gc.freeze``), so later collections do not walk the compiled code's objects.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GCPause:
    """One collection: its generation (0-2), wall seconds, and the objects it freed."""
    generation: int
    seconds: float
    collected: int


@dataclass
class GCPauses:
    """Context manager recording the garbage collections that run inside it (``gc.callbacks``); the callback is
    removed on exit, also when the block raises."""
    pauses: list[GCPause] = field(default_factory=list)
    _started: float | None = field(default=None, repr=False)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif phase == "stop" and self._started is not None:
            self.pauses.append(GCPause(int(info["generation"]), time.perf_counter() - self._started,
                                       int(info.get("collected", 0))))
            self._started = None

    def __enter__(self) -> "GCPauses":
        if self._callback in gc.callbacks:
            raise RuntimeError("this GCPauses is already recording")
        self.pauses = []
        self._started = None
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)
        self._started = None

    @property
    def seconds(self) -> float:
        """Summed wall time of the recorded collections."""
        return sum(p.seconds for p in self.pauses)

    def count(self, generation: int | None = None) -> int:
        """Collections recorded (of one generation, where given)."""
        return sum(1 for p in self.pauses if generation is None or p.generation == generation)

    def per_call(self, calls: int) -> dict[str, float]:
        """Columns for a timing row over ``calls`` calls: collections, oldest-generation collections and ms of
        collection per call, and the longest single pause (ms)."""
        if calls < 1:
            raise ValueError(f"per_call needs at least one call, got {calls}")
        return {"gc_per_call": self.count() / calls, "gc_gen2_per_call": self.count(2) / calls,
                "gc_ms_per_call": 1e3 * self.seconds / calls,
                "gc_longest_ms": 1e3 * max((p.seconds for p in self.pauses), default=0.0)}


def freeze_after_warmup() -> int:
    """Collect once, then move every object still alive into the permanent generation (``gc.freeze``): later
    collections skip them. Returns how many objects were frozen in all (``gc.get_freeze_count``)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


__all__ = ["GCPause", "GCPauses", "freeze_after_warmup"]
