"""The SAM 3D Objects pipeline with explicit stage seams.

``Pipeline`` is an ``nn.Module`` whose children are the stages ``ss``, ``slat`` and ``decode``;
module names therefore read ``ss.flow.blocks.0.self_attn`` etc. (what profilers and hooks use).

    pipe = Pipeline.from_pretrained("sam3d-mini")       # or from_config("full"), from_checkpoint(dir)
    result = pipe(image, mask, pointmap=pm, seed=0)     # Result: mesh, layout, every stage's output
    slat = pipe.slat(result.inputs, result.ss, generator=torch.Generator().manual_seed(1))

Accelerators plug in through ``pipe.accel`` (an :class:`~fs3d_accel.seams.Accelerator`): step
policies for the two samplers, token transforms after the SS stage and before the mesh decoder.
Recorders subscribe to ``pipe.events``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import CheckpointError, OfficialCheckpoint, check_state_dict, from_official, load_tensor_file, to_official
from .depth import DepthEstimator
from .mesh import Mesh
from .model.configs import ModelConfig, SamplerConfig, get_config
from .pose import Layout
from .preprocess import InputError, PreparedInputs, prepare_inputs
from .seams import Accelerator, EventBus, StageEvent
from .stages.decode import DecodeStage
from .stages.options import RunOptions
from .stages.slat import SLaTStage
from .stages.ss import SSStage
from .stages.types import DecodeOutput, SLaTOutput, SSOutput

#: offset between the SS and SLaT noise seeds, so each stage can be re-run alone reproducibly
SLAT_SEED_OFFSET = 1_000_003
STAGES = ("ss", "slat", "decode")


@dataclass
class Result:
    """Everything one object's run produced."""

    inputs: PreparedInputs
    ss: SSOutput
    slat: SLaTOutput
    decode: DecodeOutput
    seed: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def mesh(self) -> Mesh:
        """Mesh in the object frame (normalised cube)."""
        return self.decode.mesh

    @property
    def posed_mesh(self) -> Mesh:
        """Mesh placed in the camera frame by the layout."""
        return self.decode.posed_mesh

    @property
    def layout(self) -> Layout:
        return self.ss.layout


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_stage(events: EventBus, device: torch.device, timings: dict[str, float], name: str,
                fn: Callable[[], Any]) -> Any:
    """``fn()`` between the stage's start/end :class:`StageEvent` (the end event carries the output and
    the seconds); its CUDA-synchronised wall time goes to ``timings[name]``."""
    events.emit(StageEvent(name, "start"))
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    timings[name] = time.perf_counter() - t0
    events.emit(StageEvent(name, "end", {"output": out, "seconds": timings[name]}))
    return out


class Pipeline(nn.Module):
    """Image + mask (+ point map) -> mesh and layout, through the stages ss, slat, decode."""

    def __init__(self, config: ModelConfig, accel: Accelerator | None = None,
                 depth_estimator: DepthEstimator | None = None, options: RunOptions | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.ss = SSStage(config)
        self.slat = SLaTStage(config)
        self.decode = DecodeStage(config)
        self.accel = accel or Accelerator(name="base")
        self.depth_estimator = depth_estimator
        self.options = options or RunOptions()
        self.events = EventBus()
        self.source = f"config:{config.name} (random init)"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, name: str | ModelConfig, seed: int = 0, device: str | torch.device = "cpu",
                    **kwargs: Any) -> "Pipeline":
        """Build with seeded random weights (``device='meta'`` builds without allocating)."""
        cfg = get_config(name) if isinstance(name, str) else name
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available on this machine")
        if dev.type == "meta":
            with torch.device("meta"):
                return cls(cfg, **kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pipe = cls(cfg, **kwargs)
        return pipe.to(dev)

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: str | ModelConfig | None = None,
                        device: str | torch.device = "cpu", **kwargs: Any) -> "Pipeline":
        """Load official files (a folder with ss_generator.ckpt, ...) or our ``model.safetensors``
        (or ``model.safetensors.xz``).

        ``config`` defaults to ``full`` for official folders and to the name stored next to our
        weights (``config.txt``) otherwise.
        """
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"checkpoint path does not exist: {path}")
        official = OfficialCheckpoint.find(path) if path.is_dir() else None
        if official is not None:
            cfg = config or "full"
            pipe = cls.from_config(cfg, device="cpu", **kwargs)
            pipe.load_state_dicts(official.load(), layout="official")
            pipe.source = f"official:{path}"
            return pipe.to(device)
        file = path
        if path.is_dir():
            plain, packed = path / "model.safetensors", path / "model.safetensors.xz"
            file = plain if plain.is_file() or not packed.is_file() else packed
        if config is None:
            cfg_file = file.parent / "config.txt"
            config = cfg_file.read_text().strip() if cfg_file.is_file() else None
            if config is None:
                raise CheckpointError(f"{file}: no config given and no config.txt beside it")
        pipe = cls.from_config(config, device="cpu", **kwargs)
        pipe.load_state_dicts(load_tensor_file(file), layout="ours")
        pipe.source = f"ours:{file}"
        return pipe.to(device)

    @classmethod
    def from_pretrained(cls, name: str = "sam3d-mini", device: str | torch.device = "cpu", **kwargs: Any) -> "Pipeline":
        """Load weights shipped inside the package (no network access)."""
        from .weights import shipped_weights
        file, cfg = shipped_weights(name)
        pipe = cls.from_checkpoint(file, config=cfg, device=device, **kwargs)
        pipe.source = f"pretrained:{name}"
        return pipe

    # ------------------------------------------------------------------ state dicts
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Our layout: every parameter and persistent buffer, keyed by module path."""
        return {k: v for k, v in self.state_dict().items()}

    def state_dicts(self, layout: str = "official") -> dict[str, dict[str, torch.Tensor]] | dict[str, torch.Tensor]:
        """``layout='official'``: {file name: flat state dict with on-disk key prefixes}.
        ``layout='ours'``: one flat dict."""
        if layout == "ours":
            return self.model_state_dict()
        if layout == "official":
            return to_official(self.model_state_dict())
        raise ValueError(f"unknown layout {layout!r}; use 'official' or 'ours'")

    def load_state_dicts(self, state, layout: str = "ours") -> None:
        """Strictly load weights; missing/unexpected/mis-shaped keys raise and are listed."""
        if layout == "official":
            ours = from_official(state)
        elif layout == "ours":
            ours = dict(state)
        else:
            raise ValueError(f"unknown layout {layout!r}; use 'official' or 'ours'")
        check_state_dict(self.model_state_dict(), ours, f"{layout} checkpoint")
        self.load_state_dict(ours, strict=True)

    # ------------------------------------------------------------------ running
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def prepare(self, image, mask, pointmap=None) -> PreparedInputs:
        """Validate inputs and pre-process them (estimating the point map if needed)."""
        if pointmap is None:
            if self.depth_estimator is None:
                raise InputError("no point map given and no depth estimator configured: pass pointmap=HxWx3 "
                                 "or build the pipeline with depth_estimator=MoGeDepthEstimator(...)")
            import numpy as np
            pointmap = self.depth_estimator(np.asarray(image))
        return prepare_inputs(image, mask, pointmap, self.config.image_size, self.config.crop_factor)

    def _generators(self, seed: int) -> tuple[torch.Generator, torch.Generator]:
        return (torch.Generator().manual_seed(int(seed)),
                torch.Generator().manual_seed(int(seed) + SLAT_SEED_OFFSET))

    def run_ss(self, inputs: PreparedInputs, seed: int = 0, sampler: SamplerConfig | None = None, **kw) -> SSOutput:
        return self.ss(inputs, generator=self._generators(seed)[0], policy=self.accel.ss_policy,
                       events=self.events, options=self.options, sampler=sampler, **kw)

    def run_slat(self, inputs: PreparedInputs, ss: SSOutput, seed: int = 0, sampler: SamplerConfig | None = None,
                 **kw) -> SLaTOutput:
        return self.slat(inputs, ss, generator=self._generators(seed)[1], policy=self.accel.slat_policy,
                         events=self.events, options=self.options, sampler=sampler,
                         coords_transform=self.accel.coords_transform, **kw)

    def run_decode(self, inputs: PreparedInputs, ss: SSOutput, slat: SLaTOutput) -> DecodeOutput:
        return self.decode(inputs, ss, slat, options=self.options, decoder_transform=self.accel.decoder_transform,
                           coords_transform=self.accel.coords_transform)

    def forward(self, image, mask, pointmap=None, seed: int = 0) -> Result:
        """Run all stages on one object. Same seed, same inputs => bit-identical result."""
        self.options.check_device(self.device)
        inputs = self.prepare(image, mask, pointmap)
        return self.run_prepared(inputs, seed)

    def run_prepared(self, inputs: PreparedInputs, seed: int = 0) -> Result:
        timings: dict[str, float] = {}

        def timed(name: str, fn: Callable[[], Any]) -> Any:
            return timed_stage(self.events, self.device, timings, name, fn)

        ss = timed("ss", lambda: self.run_ss(inputs, seed))
        slat = timed("slat", lambda: self.run_slat(inputs, ss, seed))
        dec = timed("decode", lambda: self.run_decode(inputs, ss, slat))
        return Result(inputs=inputs, ss=ss, slat=slat, decode=dec, seed=seed, timings=timings)

    def run_stream(self, inputs, seeds=None, **kw):
        """Results of several prepared objects, each as :meth:`run_prepared` gives it, with the next object's SS
        sampler queued behind the current object's SLaT start for throughput (:func:`fs3d_accel.stream.run_stream`)."""
        from .stream import run_stream
        return run_stream(self, inputs, seeds, **kw)

    def with_options(self, options: RunOptions) -> "Pipeline":
        """Run with ``options`` (e.g. ``stages.options.fast_path("compiled")``): casts the weights to the
        options' weight dtype (the half-precision settings need half-precision weights) and checks the
        device first, so a CUDA-only setting on a CPU pipeline fails here with the reason. Returns self.
        Casting back to fp32 after a half-precision setting keeps the half-precision-rounded weights: load
        the pipeline again for the fp32 reference."""
        options.check_device(self.device)
        self.to(options.weight_dtype)
        self.options = options
        return self

    def with_accel(self, accel: Accelerator | None) -> "Pipeline":
        """Set the accelerator bundle (``None`` = plain pipeline); returns self for chaining."""
        self.accel = accel or Accelerator(name="base")
        return self

    def extra_repr(self) -> str:
        return f"config={self.config.name}, source={self.source}, accel={self.accel.name}"
