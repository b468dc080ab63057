"""Dataclass configs of the SAM 3D Objects architecture.

``full`` carries the official dimensions (from the HF config YAMLs, see
``shared/reference/sam3d-architecture.md``); ``mini`` is the same architecture with small widths,
depths and resolutions so that an image-to-mesh run takes seconds on a laptop CPU.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any


def _positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


@dataclass(frozen=True)
class DinoConfig:
    """DINOv2-style ViT with register tokens (official: ViT-L/14-reg at 518 px)."""

    image_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_registers: int = 4

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "num_registers":
                _positive(f"DinoConfig.{f.name}", getattr(self, f.name))
        if self.num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {self.num_registers}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} not divisible by patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2


@dataclass(frozen=True)
class PointEmbedConfig:
    """Point-map patch embedder (official: 512 dims, 256 px input, 8 px windows, one ViT block)."""

    embed_dim: int = 512
    input_size: int = 256
    patch_size: int = 8
    num_heads: int = 16
    mlp_ratio: float = 2.0

    def __post_init__(self) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} not divisible by patch_size {self.patch_size}")

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size


@dataclass(frozen=True)
class ConditionConfig:
    """Condition embedder fuser: DINO(image), DINO(mask) [, point map] -> tokens of ``cond_dim``."""

    dino: DinoConfig = field(default_factory=DinoConfig)
    point: PointEmbedConfig = field(default_factory=PointEmbedConfig)
    cond_dim: int = 1024
    ffn_multiplier: float = 4.0
    #: SS fuser uses the point map and post-norm CLS+patch tokens; SLaT fuser no point map and
    #: pre-norm tokens incl. registers.
    use_pointmap: bool = True
    prenorm_features: bool = False

    @property
    def ffn_hidden(self) -> int:
        """llama3 FeedForward hidden size: int(2/3 * mult * cond_dim) rounded up to 256."""
        hidden = int(2 * int(self.ffn_multiplier * self.cond_dim) / 3)
        return 256 * ((hidden + 255) // 256)

    @property
    def tokens_per_image(self) -> int:
        d = self.dino
        return d.num_patches + 1 + (d.num_registers if self.prenorm_features else 0)

    @property
    def num_tokens(self) -> int:
        n = 4 * self.tokens_per_image
        if self.use_pointmap:
            n += 2 * self.point.grid ** 2
        return n


@dataclass(frozen=True)
class SSFlowConfig:
    """Sparse-structure flow transformer (mixture of transformers over shape + layout streams)."""

    in_channels: int = 8
    model_channels: int = 1024
    cond_channels: int = 1024
    num_blocks: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    resolution: int = 16
    #: shortcut model: has a d_embedder (step-size embedding)
    is_shortcut_model: bool = True

    @property
    def num_shape_tokens(self) -> int:
        return self.resolution ** 3


#: Layout modalities of the SS generator, in the official ``latent_mapping`` order, with channels.
LAYOUT_MODALITIES: dict[str, int] = {
    "6drotation_normalized": 6, "scale": 3, "translation": 3, "translation_scale": 1,
}
#: Order in which the pose modalities are concatenated into the shared layout stream.
LAYOUT_STREAM_ORDER = ("6drotation_normalized", "translation", "scale", "translation_scale")


@dataclass(frozen=True)
class SSDecoderConfig:
    """Dense 3D conv decoder of the SS VAE: latent (8, R, R, R) -> occupancy logits (1, 4R, ...)."""

    latent_channels: int = 8
    channels: tuple[int, ...] = (512, 128, 32)
    num_res_blocks: int = 2
    num_res_blocks_middle: int = 2

    @property
    def upsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


@dataclass(frozen=True)
class SLaTFlowConfig:
    """SLaT flow transformer on sparse voxels (TRELLIS-style, with IO sparse res-blocks)."""

    in_channels: int = 8
    model_channels: int = 1024
    cond_channels: int = 1024
    num_blocks: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    io_block_channels: tuple[int, ...] = (128,)
    resolution: int = 64


@dataclass(frozen=True)
class MeshDecoderConfig:
    """SLaT mesh decoder: swin sparse transformer, two subdivide blocks, FlexiCubes-layout head."""

    resolution: int = 64
    latent_channels: int = 8
    model_channels: int = 768
    num_blocks: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 8
    upsample_channels: tuple[int, ...] = (192, 96)
    out_channels: int = 101
    num_groups: int = 32

    @property
    def output_resolution(self) -> int:
        return self.resolution * 2 ** len(self.upsample_channels)


@dataclass(frozen=True)
class SamplerConfig:
    """Schedule of one flow sampler (the official pipeline's effective defaults for ``full``)."""

    steps: int = 25
    rescale_t: float = 1.0
    cfg_strength: float = 0.0
    #: CFG active where interval[0] <= t*time_scale <= interval[1]
    cfg_interval: tuple[float, float] = (0.0, 500.0)
    time_scale: float = 1000.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"sampler steps must be >= 1, got {self.steps}")
        if self.rescale_t <= 0:
            raise ValueError(f"rescale_t must be > 0, got {self.rescale_t}")
        if self.cfg_strength < 0:
            raise ValueError(f"cfg_strength must be >= 0, got {self.cfg_strength}")
        lo, hi = self.cfg_interval
        if lo > hi:
            raise ValueError(f"cfg_interval must be (low, high) with low <= high, got {self.cfg_interval}")


#: SLaT latent normalisation (pipeline.yaml slat_mean / slat_std): slat = feats * std + mean
SLAT_MEAN = (0.12211431, 0.37204156, -1.26521907, -2.05276058, -3.10432536, -0.11294304, -0.85146744, 0.45506954)
SLAT_STD = (2.37326008, 2.13174402, 2.2413953, 2.30589401, 2.1191894, 1.8969511, 2.41684989, 2.08374642)
#: 6D rotation normalisation (inference_utils ROTATION_6D_MEAN / STD)
ROTATION_6D_MEAN = (-0.06366, 0.008438, 0.000171, 0.000713, -0.003092, 0.516609)
ROTATION_6D_STD = (0.665697, 0.678701, 0.303450, 0.439450, 0.398180, 0.617629)


@dataclass(frozen=True)
class ModelConfig:
    """The whole SAM 3D Objects model: both condition fusers, both generators, both decoders."""

    name: str
    ss_condition: ConditionConfig
    slat_condition: ConditionConfig
    ss_flow: SSFlowConfig
    ss_decoder: SSDecoderConfig
    slat_flow: SLaTFlowConfig
    mesh_decoder: MeshDecoderConfig
    ss_sampler: SamplerConfig = SamplerConfig(steps=25, rescale_t=3.0, cfg_strength=7.0)
    slat_sampler: SamplerConfig = SamplerConfig(steps=25, rescale_t=1.0, cfg_strength=1.0)
    #: crop box factor around the mask and the network input size (518 for ``full``)
    crop_factor: float = 1.2
    slat_mean: tuple[float, ...] = SLAT_MEAN
    slat_std: tuple[float, ...] = SLAT_STD
    #: voxel budget: more surface voxels than this are downsampled (official 42000)
    max_voxels: int = 42000

    @property
    def occupancy_resolution(self) -> int:
        return self.ss_flow.resolution * self.ss_decoder.upsample_factor

    def validate(self) -> None:
        if self.occupancy_resolution != self.slat_flow.resolution:
            raise ValueError(
                f"SS occupancy resolution {self.occupancy_resolution} != SLaT resolution {self.slat_flow.resolution}")
        if self.slat_flow.resolution != self.mesh_decoder.resolution:
            raise ValueError("SLaT and mesh decoder resolutions differ")
        if self.ss_condition.cond_dim != self.ss_flow.cond_channels:
            raise ValueError("SS condition dim != SS flow cond_channels")
        if self.slat_condition.cond_dim != self.slat_flow.cond_channels:
            raise ValueError("SLaT condition dim != SLaT flow cond_channels")
        if self.ss_condition.dino.image_size != self.slat_condition.dino.image_size:
            raise ValueError("SS and SLaT condition image sizes differ")

    @property
    def image_size(self) -> int:
        return self.ss_condition.dino.image_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_samplers(self, ss: SamplerConfig | None = None, slat: SamplerConfig | None = None) -> "ModelConfig":
        return replace(self, ss_sampler=ss or self.ss_sampler, slat_sampler=slat or self.slat_sampler)


def full_config() -> ModelConfig:
    """Official SAM 3D Objects dimensions."""
    cfg = ModelConfig(
        name="full",
        ss_condition=ConditionConfig(use_pointmap=True, prenorm_features=False),
        slat_condition=ConditionConfig(use_pointmap=False, prenorm_features=True),
        ss_flow=SSFlowConfig(),
        ss_decoder=SSDecoderConfig(),
        slat_flow=SLaTFlowConfig(),
        mesh_decoder=MeshDecoderConfig(),
    )
    cfg.validate()
    return cfg


#: sam3d-mini SLaT latent normalisation, measured on its training latents (fs3d_accel.training)
MINI_SLAT_MEAN = (-0.35082448, 0.5830462, 0.74348038, -1.0498409, -0.066792801, 0.46949133, 1.8211267, 0.74463093)
MINI_SLAT_STD = (0.15860599, 0.13662554, 0.31037331, 0.33859062, 0.32812229, 0.74874991, 0.26506418, 0.66970819)


def mini_config() -> ModelConfig:
    """Same architecture, small: 112 px DINO (8x8 patches), 8^3 shape latent -> 32^3 occupancy."""
    dino = DinoConfig(image_size=112, patch_size=14, embed_dim=128, depth=3, num_heads=4, num_registers=4)
    point = PointEmbedConfig(embed_dim=64, input_size=64, patch_size=8, num_heads=4, mlp_ratio=2.0)
    cond_dim = 128
    cfg = ModelConfig(
        name="mini",
        ss_condition=ConditionConfig(dino=dino, point=point, cond_dim=cond_dim, use_pointmap=True,
                                     prenorm_features=False),
        slat_condition=ConditionConfig(dino=dino, point=point, cond_dim=cond_dim, use_pointmap=False,
                                       prenorm_features=True),
        ss_flow=SSFlowConfig(model_channels=128, cond_channels=cond_dim, num_blocks=4, num_heads=4,
                             resolution=8),
        ss_decoder=SSDecoderConfig(channels=(64, 32, 16)),
        slat_flow=SLaTFlowConfig(model_channels=128, cond_channels=cond_dim, num_blocks=4, num_heads=4,
                                 io_block_channels=(32,), resolution=32),
        mesh_decoder=MeshDecoderConfig(resolution=32, model_channels=96, num_blocks=2, num_heads=4,
                                       window_size=8, upsample_channels=(32, 16), num_groups=8),
        slat_mean=MINI_SLAT_MEAN,
        slat_std=MINI_SLAT_STD,
        max_voxels=42000,
    )
    cfg.validate()
    return cfg


CONFIGS = {"full": full_config, "mini": mini_config}


def get_config(name: str) -> ModelConfig:
    """Return the named config; unknown names raise with the list of known ones."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; known configs: {sorted(CONFIGS)}")
    return CONFIGS[name]()
