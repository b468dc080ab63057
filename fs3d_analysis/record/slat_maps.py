"""SLaT per-token update maps over the sampler steps.

For every step: the per-token velocity norm |v_i|, the change |v_i(s) - v_i(s-1)| and, when the
policy published them (``ctx.info["carving"]``, see :mod:`fs3d_accel.accel.slat_carving`), the
saliency terms M, A, S_freq, J and the selected mask; in shadow mode the per-token error against
the true velocity. Stored as per-step arrays (:attr:`arrays`) plus one tidy summary row per step.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from fs3d_accel.accel.slat_carving import token_freq_scores, token_norm
from fs3d_accel.accel.spectral import HFERConfig
from fs3d_accel.seams import StepEvent

from ._base import Recorder

ARRAY_KEYS = ("v_norm", "dv_norm", "M", "A", "S_freq", "J", "selected", "err_norm")


class SLaTUpdateRecorder(Recorder):
    """Per-token SLaT update maps.

    ``arrays[(run, step)]`` maps names in :data:`ARRAY_KEYS` to (N,) numpy arrays (missing keys were
    not available at that step); ``coords[run]`` is the (N,4) token coordinate array.
    ``compute_freq=True`` fills S_freq from the event extras when the policy did not (e.g. the plain
    pipeline), using ``hfer`` (default: released convention).
    """

    stage = "slat"

    def __init__(self, compute_freq: bool = False, hfer: HFERConfig | None = None, **tags: Any) -> None:
        super().__init__(**tags)
        self.compute_freq = compute_freq
        self.hfer = hfer or HFERConfig()
        self.arrays: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self.coords: dict[int, np.ndarray] = {}
        self._prev_v = None
        self._freq: np.ndarray | None = None

    def start_run(self, event: StepEvent) -> None:
        self._prev_v = None
        self._freq = None
        coords = event.extras.get("coords")
        if coords is not None:
            self.coords[self.run] = coords.detach().cpu().numpy().copy()
        if self.compute_freq and coords is not None:
            self._freq = token_freq_scores(event.extras, self.hfer)[0].float().numpy()

    def on_step(self, event: StepEvent) -> None:
        v = event.v.detach().cpu()
        arr: dict[str, np.ndarray] = {"v_norm": token_norm(v).float().numpy()}
        arr["dv_norm"] = (token_norm(v - self._prev_v).float().numpy() if self._prev_v is not None
                          else np.full(v.shape[0], np.nan, dtype=np.float32))
        carving = event.info.get("carving") or {}
        for key in ("M", "A", "S_freq", "J", "selected"):
            if key in carving:
                arr[key] = carving[key].detach().cpu().numpy().copy()
        if "S_freq" not in arr and self._freq is not None:
            arr["S_freq"] = self._freq
        true = event.info.get("v_true")
        if true is not None:
            arr["err_norm"] = token_norm(v - true.detach().cpu()).float().numpy()
        self.arrays[(self.run, event.step)] = arr
        sel = arr.get("selected")
        self.emit_row(
            step=event.step, t=event.t, decision=event.decision, active_fraction=event.active_fraction,
            n_tokens=int(v.shape[0]), n_selected=int(sel.sum()) if sel is not None else int(v.shape[0]),
            **{f"{k}_mean": float(np.nanmean(arr[k])) if k in arr and len(arr[k]) and not np.all(np.isnan(arr[k]))
               else math.nan for k in ("v_norm", "dv_norm", "M", "A", "S_freq", "J", "err_norm")})
        self._prev_v = v

    def tokens_frame(self, run: int | None = None) -> pd.DataFrame:
        """Long table: one row per (run, step, token) with coordinates and every stored array."""
        frames = []
        for (r, step), arr in sorted(self.arrays.items()):
            if run is not None and r != run:
                continue
            n = len(arr["v_norm"])
            df = pd.DataFrame({"run": r, "step": step, "token": np.arange(n)})
            c = self.coords.get(r)
            if c is not None and len(c) == n:
                df["x"], df["y"], df["z"] = c[:, 1], c[:, 2], c[:, 3]
            for k in ARRAY_KEYS:
                if k in arr:
                    df[k] = arr[k]
            frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def volume(self, key: str, step: int, run: int = 0, resolution: int | None = None) -> np.ndarray:
        """(R,R,R) float array with ``key`` at the token voxels and NaN elsewhere (for heatmaps)."""
        if (run, step) not in self.arrays:
            raise KeyError(f"no record for run {run}, step {step}")
        arr = self.arrays[(run, step)]
        if key not in arr:
            raise KeyError(f"{key!r} not recorded at run {run}, step {step}; have {sorted(arr)}")
        c = self.coords[run]
        res = resolution or int(c[:, 1:].max()) + 1
        vol = np.full((res,) * 3, np.nan, dtype=np.float32)
        vol[c[:, 1], c[:, 2], c[:, 3]] = arr[key]
        return vol

    def clear(self) -> None:
        super().clear()
        self.arrays.clear()
        self.coords.clear()
