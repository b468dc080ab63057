"""Common machinery of the recorders: event dispatch, run numbering, tags, tidy tables."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pandas as pd

from fs3d_accel.seams import EventBus, StageEvent, StepEvent


class Recorder:
    """Callable event listener that accumulates tidy rows.

    Use ``with pipe.events.listening(rec): ...`` or ``with rec.attach(pipe.events): ...``. A new
    *run* starts at step 0 of the recorder's stage; ``tags`` (e.g. ``object=..., method=...``) are
    copied into every row and can be changed between objects with :meth:`set_tags`.
    """

    stage: str | None = None

    def __init__(self, **tags: Any) -> None:
        self.tags: dict[str, Any] = dict(tags)
        self.rows: list[dict[str, Any]] = []
        self.run = -1

    def set_tags(self, **tags: Any) -> None:
        """Update the tags of subsequent rows (a value of ``None`` removes the tag)."""
        for k, v in tags.items():
            if v is None:
                self.tags.pop(k, None)
            else:
                self.tags[k] = v

    def __call__(self, event: Any) -> None:
        if isinstance(event, StepEvent):
            if self.stage is not None and event.stage != self.stage:
                return
            if event.step == 0:
                self.run += 1
                self.start_run(event)
            self.on_step(event)
        elif isinstance(event, StageEvent):
            self.on_stage(event)

    def start_run(self, event: StepEvent) -> None:
        """Hook: a new sampler run begins (reset per-run buffers)."""

    def on_step(self, event: StepEvent) -> None:
        """Hook: one sampler step."""

    def on_stage(self, event: StageEvent) -> None:
        """Hook: a stage started or ended."""

    def emit_row(self, **row: Any) -> None:
        self.rows.append({**self.tags, "run": self.run, **row})

    @contextlib.contextmanager
    def attach(self, bus: EventBus) -> Iterator["Recorder"]:
        with bus.listening(self):
            yield self

    def to_frame(self) -> pd.DataFrame:
        """One row per recorded item (tidy), tags and ``run`` first."""
        return pd.DataFrame(self.rows)

    def clear(self) -> None:
        self.rows.clear()
        self.run = -1
