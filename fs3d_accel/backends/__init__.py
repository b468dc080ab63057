"""Other model sources behind the project's seams. ``official``: the released SAM 3D Objects code
(optional; imports cleanly without it, see :func:`official.is_available`)."""
from .official import OfficialPipeline, StepPatch, is_available, module_hooks

__all__ = ["OfficialPipeline", "StepPatch", "is_available", "module_hooks"]
