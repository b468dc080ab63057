"""Uniform token merge baseline: one fixed factor S for every object, with the same quantisation
as :class:`~fs3d_accel.accel.mesh_aggregation.SpectralTokenAggregation` (floor(p / S) and max-pooled
features before the mesh decoder, or the released bbox shrink before SLaT).

Setting: the paper does not state the factor of its "Uniform Merge" row; ``scale=1.5`` is the
middle of Fast-SAM3D's {1.25, 1.5, 2.0}. ``scale=1`` is the identity (bit-identical).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ...seams import SparseTokens, TransformContext, TransformState
from .._common import check_choice
from ..mesh_aggregation import PLACEMENTS, _check_scale, reduce_with, restore_from_state


@dataclass(frozen=True)
class UniformTokenMerge:
    scale: float = 1.5
    placement: str = "pre_decoder"

    def __post_init__(self) -> None:
        _check_scale("scale", self.scale)
        check_choice("placement", self.placement, PLACEMENTS)

    def reduce(self, tokens: SparseTokens, ctx: TransformContext) -> tuple[SparseTokens, TransformState]:
        scale = float(self.scale)
        reduced, affine = reduce_with(tokens, scale, self.placement)
        info = dict(S=scale, placement=self.placement, tokens_before=len(tokens), tokens_after=len(reduced),
                    resolution=tokens.resolution, **affine)
        return reduced, TransformState(scale=scale, info=info)

    def restore_vertices(self, vertices: Tensor, state: TransformState) -> Tensor:
        return restore_from_state(vertices, state)

    @property
    def tag(self) -> str:
        return f"uniform-merge-S{self.scale:g}-{self.placement}"
