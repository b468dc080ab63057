"""Baselines the Fast-SAM3D paper compares against, behind the same seams as its methods."""
from .easycache import EasyCache
from .fast3dcache import Fast3DCache
from .random_drop import RandomTokenDrop
from .taylorseer import TaylorSeer
from .uniform_merge import UniformTokenMerge

__all__ = ["EasyCache", "Fast3DCache", "RandomTokenDrop", "TaylorSeer", "UniformTokenMerge"]
