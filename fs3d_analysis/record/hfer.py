"""HFER per object and the aggregation factor S chosen (from the token transforms' states)."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from fs3d_accel.accel.spectral import HFERConfig, hfer_2d, hfer_3d
from fs3d_accel.seams import StageEvent, TransformState

from ._base import Recorder

INFO_COLUMNS = ("placement", "hfer_2d", "hfer_3d", "score", "S", "reason", "tokens_before", "tokens_after")


class HFERRecorder(Recorder):
    """One row per object and transform slot.

    Listens to the pipeline's stage-end events: ``slat`` (the ``coords_transform`` state,
    ``SLaTOutput.coords_state``) and ``decode`` (``DecodeOutput.decoder_state``); states without
    transform info (no transform) are skipped. A run starts at each ``ss`` stage start.
    :meth:`measure` records HFER for an object directly (no transform needed).
    """

    stage = None

    def on_stage(self, event: StageEvent) -> None:
        if event.stage == "ss" and event.phase == "start":
            self.run += 1
            return
        if event.phase != "end":
            return
        out = event.payload.get("output")
        if event.stage == "slat":
            self.record_state(getattr(out, "coords_state", None), slot="coords_transform")
        elif event.stage == "decode":
            self.record_state(getattr(out, "decoder_state", None), slot="decoder_transform")

    def record_state(self, state: TransformState | None, slot: str, **extra: Any) -> None:
        if state is None or not state.info:
            return
        row = {k: state.info.get(k) for k in INFO_COLUMNS}
        row["S"] = state.info.get("S", state.scale)
        self.emit_row(slot=slot, **row, **extra)

    def measure(self, mask: Tensor, occupancy_logits: Tensor, cfg: HFERConfig | None = None, w: float = 0.9,
                **tags: Any) -> dict[str, float]:
        """HFER of mask and voxels for one object, recorded as a row with ``slot="measure"``."""
        cfg = cfg or HFERConfig()
        h2, h3 = hfer_2d(mask, cfg), hfer_3d(occupancy_logits, cfg)
        out = {"hfer_2d": h2, "hfer_3d": h3, "score": w * h2 + (1 - w) * h3}
        self.emit_row(slot="measure", **out, **tags)
        return out
