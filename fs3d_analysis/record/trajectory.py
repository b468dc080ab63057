"""SS-stage trajectories per modality: velocity norms, finite differences, cosine to the previous
step and (in shadow mode) the error of the velocity used against the true network velocity."""
from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from fs3d_accel.seams import StepEvent

from ._base import Recorder

SHAPE_KEYS = ("shape",)


def _cos(a: Tensor, b: Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0:
        return math.nan
    return float(a @ b) / (na * nb)


class SSTrajectoryRecorder(Recorder):
    """One row per (run, step, modality).

    Columns: ``step, t, decision, modality, role`` ("shape"/"layout"), ``v_norm``, ``x_norm``
    (L2 over the modality's elements), ``dv_norm`` = ||v_s - v_{s-1}|| (first difference),
    ``d2v_norm`` = ||v_s - 2 v_{s-1} + v_{s-2}|| (second difference), ``cos_prev`` = cos(v_s, v_{s-1});
    when the step's ``info`` carries ``v_true`` (:class:`~fs3d_accel.accel.shadow.ShadowPolicy`):
    ``err_norm`` = ||v_s - v_true||, ``rel_err`` = err_norm / ||v_true||, ``cos_true``.
    NaN where undefined. Works with any latent dict; a plain tensor latent is recorded as modality
    ``"latent"``.
    """

    stage = "ss"

    def __init__(self, modalities: tuple[str, ...] | None = None, stage: str = "ss", **tags: Any) -> None:
        super().__init__(**tags)
        self.stage = stage
        self.modalities = modalities
        self._prev: dict[str, list[Tensor]] = {}

    def start_run(self, event: StepEvent) -> None:
        self._prev = {}

    def on_step(self, event: StepEvent) -> None:
        v_all = event.v if isinstance(event.v, dict) else {"latent": event.v}
        x_all = event.x if isinstance(event.x, dict) else {"latent": event.x}
        true = event.info.get("v_true")
        if true is not None and not isinstance(true, dict):
            true = {"latent": true}
        for key, v in v_all.items():
            if self.modalities is not None and key not in self.modalities:
                continue
            vf = v.detach().reshape(-1).double().cpu()
            hist = self._prev.setdefault(key, [])
            row: dict[str, Any] = dict(
                step=event.step, t=event.t, decision=event.decision, modality=key,
                role="shape" if key in SHAPE_KEYS else "layout",
                v_norm=float(vf.norm()), x_norm=float(x_all[key].detach().double().norm()),
                dv_norm=float((vf - hist[-1]).norm()) if hist else math.nan,
                d2v_norm=float((vf - 2 * hist[-1] + hist[-2]).norm()) if len(hist) >= 2 else math.nan,
                cos_prev=_cos(vf, hist[-1]) if hist else math.nan,
                err_norm=math.nan, rel_err=math.nan, cos_true=math.nan)
            if true is not None:
                tf = true[key].detach().reshape(-1).double().cpu()
                err = float((vf - tf).norm())
                tn = float(tf.norm())
                row.update(err_norm=err, rel_err=err / tn if tn > 0 else math.nan, cos_true=_cos(vf, tf))
            self.emit_row(**row)
            hist.append(vf)
            del hist[:-2]
