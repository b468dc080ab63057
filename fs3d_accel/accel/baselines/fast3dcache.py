"""Fast3Dcache-style stability cache baseline (the "F3C" machinery the released Fast-SAM3D code
borrows, ``f3c_slat_end``; implementation notes Sec. 5), on the SLaT sampler.

Per step: the first ``full_steps`` steps are computed; afterwards every ``correction_every``-th
step is a full correction step and the others freeze ``floor(skip_ratio N)`` tokens with the lowest
motion score 0.7 A^ + 0.3 M^ (A = change of a token's velocity since the previous selection,
M = its velocity norm, both min-max normalised; the F3C ``update_and_select``); a token frozen
``streak_limit - 1`` selections in a row is forced back (F3C ``FIXED_THRESHOLD`` = 5). Frozen
tokens reuse their previous velocity and are left out of the network pass.

Settings: the values ``f3cLeader.set_parameters`` installs in the released code
(``full_sampling_steps=2``, aggressive ratio 0.9, correction frequency 8) and the tracker constants
(acceleration weight 0.7, streak limit 5). The F3C phase anchors / slope schedule are not wired in
the released code and are not modelled. SLaT only: the SS network has no token-subset path.
``skip_ratio=0`` never carves (bit-identical to the plain sampler).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...seams import ComputeFn, Latent, StepContext
from .._common import check_int, check_range, policy_state
from ..slat_carving import _fill_active, saliency, select_frozen


@dataclass(frozen=True)
class Fast3DCache:
    skip_ratio: float = 0.9
    full_steps: int = 2
    correction_every: int = 8
    streak_limit: int = 5
    accel_weight: float = 0.7

    def __post_init__(self) -> None:
        check_range("skip_ratio", self.skip_ratio, 0.0, 1.0, high_open=True)
        check_int("full_steps", self.full_steps, 1)
        check_int("correction_every", self.correction_every, 1)
        check_int("streak_limit", self.streak_limit, 1)
        check_range("accel_weight", self.accel_weight, 0.0, 1.0)

    def is_correction(self, step: int) -> bool:
        return step < self.full_steps or (step - self.full_steps + 1) % self.correction_every == 0

    def velocity(self, ctx: StepContext, compute: ComputeFn) -> Latent:
        x = ctx.x
        if isinstance(x, dict):
            raise TypeError("Fast3DCache works on the SLaT (N,C) latent only")
        n = x.shape[0]
        n_skip = int(self.skip_ratio * n)
        st = policy_state(ctx, self)
        if self.is_correction(ctx.step) or not ctx.history or n_skip == 0:
            st["streak"] = None
            return compute()
        v_prev = ctx.history[-1].v
        if st.get("zeros") is None or st["zeros"].numel() != n:
            st["zeros"] = torch.zeros(n, dtype=torch.float64)  # no frequency term; built once per run
        sal = saliency(v_prev, st.get("last_selection_v"), st["zeros"], gamma=self.accel_weight,
                       freq_weight=0.0, magnitude_weight=1 - self.accel_weight, memo=st)
        st["last_selection_v"] = v_prev
        streak = st.get("streak")
        if streak is None:
            streak = torch.zeros(n, dtype=torch.long)
        frozen, st["streak"] = select_frozen(sal["J"], n_skip, streak, self.streak_limit - 1)
        ctx.info["carving"] = {"M": sal["M"].float(), "A": sal["A"].float(), "J": sal["J"].float(), "selected": ~frozen}
        if not bool(frozen.any()):
            return compute()
        return _fill_active(v_prev, frozen, compute)

    @property
    def tag(self) -> str:
        return f"fast3dcache-r{self.skip_ratio:g}-f{self.full_steps}-c{self.correction_every}"
