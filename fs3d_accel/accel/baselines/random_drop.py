"""Random token drop baseline: a seeded random subset of the sparse tokens is removed before the
SLaT network (``placement="pre_slat"``, default: the dropped voxels are then absent from the SLaT
stage and the mesh decoder) or before the mesh decoder only (``"pre_decoder"``).

Setting: the paper's "Random Drop" row gives neither the ratio nor the place; we drop tokens before
SLaT, as random token pruning of the SLaT/decoder tokens, with ``keep=0.5`` (our choice: halving the
tokens is in line with the ~2x object speed-up the paper reports for this row). The drop
is seeded per object (``seed``), so the same object always loses the same voxels; coordinates are
not moved, hence vertices need no restoring. ``keep=1`` is the identity (bit-identical).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...seams import SparseTokens, TransformContext, TransformState
from .._common import check_choice, check_int, check_range
from ..mesh_aggregation import PLACEMENTS


@dataclass(frozen=True)
class RandomTokenDrop:
    keep: float = 0.5
    seed: int = 0
    placement: str = "pre_slat"

    def __post_init__(self) -> None:
        check_range("keep", self.keep, 0.0, 1.0, low_open=True)
        check_int("seed", self.seed)
        check_choice("placement", self.placement, PLACEMENTS)

    def reduce(self, tokens: SparseTokens, ctx: TransformContext) -> tuple[SparseTokens, TransformState]:
        n = len(tokens)
        n_keep = max(1, int(round(self.keep * n)))
        info = dict(placement=self.placement, tokens_before=n, tokens_after=min(n, n_keep), keep=self.keep)
        if n_keep >= n:
            return tokens, TransformState(info=info)
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(n, generator=g)[:n_keep].sort().values.to(tokens.coords.device)
        out = SparseTokens(coords=tokens.coords[idx], resolution=tokens.resolution,
                           feats=None if tokens.feats is None else tokens.feats[idx],
                           scores=None if tokens.scores is None else tokens.scores[idx])
        return out, TransformState(info=info)

    def restore_vertices(self, vertices: Tensor, state: TransformState) -> Tensor:
        return vertices

    @property
    def tag(self) -> str:
        return f"random-drop-k{self.keep:g}-s{self.seed}-{self.placement}"
