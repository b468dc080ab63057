"""Recorders: subscribe to a pipeline's events and collect tidy tables (``.to_frame()``).

    rec = SSTrajectoryRecorder(method="fast-sam3d")
    with pipe.events.listening(rec):
        pipe(image, mask, pointmap=pm)
    df = rec.to_frame()
"""
from ._base import Recorder
from .hfer import HFERRecorder
from .slat_maps import SLaTUpdateRecorder
from .trajectory import SSTrajectoryRecorder

__all__ = ["HFERRecorder", "Recorder", "SLaTUpdateRecorder", "SSTrajectoryRecorder"]
