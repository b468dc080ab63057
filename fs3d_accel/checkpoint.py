"""Checkpoint layouts: the official SAM 3D Objects files and ours.

Official layout (what the released files hold; see the architecture reference, section 7):

=========================  ==================  ======================================================
file                       state_dict_key      keys
=========================  ==================  ======================================================
ss_generator.ckpt          ``state_dict``      ``_base_models.generator.reverse_fn.backbone.<ss flow>``
                                               ``_base_models.condition_embedder.<ss fuser>``
slat_generator.ckpt        ``state_dict``      same prefixes for the SLaT flow model / SLaT fuser
ss_decoder.ckpt            none (flat)         ``<ss decoder>``
slat_decoder_mesh.ckpt     none (flat)         ``<mesh decoder>``
=========================  ==================  ======================================================

Our layout is one flat state dict (``model.safetensors``) keyed by the pipeline's module names
(``ss.flow.blocks.0...``).

One value changes between the layouts, not only its key: a 1x1x1 spconv ``SubMConv3d`` (the mesh decoder's
subdivision skip connections). spconv 2.x computes it as ``features @ weight.view(C_in, C_out)``, a raw
reinterpretation of the (C_out, 1, 1, 1, C_in) tensor rather than its transpose (its ``FILTER_HWIO = False`` path;
upstream spconv issue #450, never changed, and spconv-triton reproduces it on purpose). The official checkpoints
were trained and run with that, so :func:`from_official` turns such a weight into the matrix our ``SparseConv3d``
applies as a standard convolution, and :func:`to_official` turns it back.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

GEN_PREFIX = "_base_models.generator.reverse_fn.backbone."
COND_PREFIX = "_base_models.condition_embedder."

#: official file -> (state_dict_key, [(our module prefix, on-disk prefix)])
OFFICIAL_FILES: dict[str, tuple[str | None, list[tuple[str, str]]]] = {
    "ss_generator": ("state_dict", [("ss.flow.", GEN_PREFIX), ("ss.condition.", COND_PREFIX)]),
    "slat_generator": ("state_dict", [("slat.flow.", GEN_PREFIX), ("slat.condition.", COND_PREFIX)]),
    "ss_decoder": (None, [("ss.decoder.", "")]),
    "slat_decoder_mesh": (None, [("decode.decoder.", "")]),
}
OFFICIAL_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth")
#: official files whose sparse convolutions are spconv modules (the SS decoder's are dense ``nn.Conv3d``)
SPCONV_FILES = ("slat_generator", "slat_decoder_mesh")


def is_spconv_1x1_weight(file: str, key: str, value: Tensor) -> bool:
    """Whether ``key`` of official ``file`` is the weight of a 1x1x1 spconv conv: (C_out, 1, 1, 1, C_in)."""
    return (file in SPCONV_FILES and key.endswith("conv.weight") and value.ndim == 5
            and tuple(value.shape[1:4]) == (1, 1, 1))


def spconv_1x1_to_ours(weight: Tensor) -> Tensor:
    """Official 1x1x1 spconv weight -> ours: spconv applies ``weight.view(C_in, C_out)``; our conv applies
    ``weight.reshape(C_out, C_in).T``, so ours holds the transpose of that view, in the same 5-D shape."""
    c_out, c_in = weight.shape[0], weight.shape[-1]
    return weight.reshape(c_in, c_out).t().contiguous().reshape(weight.shape)


def spconv_1x1_to_official(weight: Tensor) -> Tensor:
    """Inverse of :func:`spconv_1x1_to_ours`."""
    c_out, c_in = weight.shape[0], weight.shape[-1]
    return weight.reshape(c_out, c_in).t().contiguous().reshape(weight.shape)


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not match the model (message lists the keys)."""


def _fmt(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def to_official(ours: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Split our flat state dict into the official files' flat key spaces (with on-disk prefixes); 1x1x1 spconv
    weights are written as spconv applies them (module docstring)."""
    out: dict[str, dict[str, Tensor]] = {name: {} for name in OFFICIAL_FILES}
    for key, value in ours.items():
        for name, (_, pairs) in OFFICIAL_FILES.items():
            for ours_prefix, disk_prefix in pairs:
                if key.startswith(ours_prefix):
                    disk_key = disk_prefix + key[len(ours_prefix):]
                    if is_spconv_1x1_weight(name, disk_key, value):
                        value = spconv_1x1_to_official(value)
                    out[name][disk_key] = value
                    break
            else:
                continue
            break
        else:
            raise CheckpointError(f"key {key!r} belongs to no official checkpoint file")
    return out


def from_official(files: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Inverse of :func:`to_official`: official files' flat dicts -> our flat state dict.

    Entries outside the known prefixes of a generator file (EMA copies, optimiser state) are
    dropped, as the official loader's prefix filter does.
    """
    ours: dict[str, Tensor] = {}
    for name, sd in files.items():
        if name not in OFFICIAL_FILES:
            raise CheckpointError(f"unknown official file {name!r}; expected {sorted(OFFICIAL_FILES)}")
        _, pairs = OFFICIAL_FILES[name]
        for key, value in sd.items():
            for ours_prefix, disk_prefix in sorted(pairs, key=lambda p: -len(p[1])):
                if key.startswith(disk_prefix):
                    if is_spconv_1x1_weight(name, key, value):
                        value = spconv_1x1_to_ours(value)
                    ours[ours_prefix + key[len(disk_prefix):]] = value
                    break
    return ours


def check_state_dict(expected: Mapping[str, Tensor], given: Mapping[str, Tensor], what: str) -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected and mis-shaped keys."""
    missing = set(expected) - set(given)
    unexpected = set(given) - set(expected)
    shapes = [f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(given)) if tuple(given[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_fmt(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_fmt(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: " + "; ".join(shapes[:20]))
    if problems:
        raise CheckpointError(f"{what} does not match the model:\n  " + "\n  ".join(problems))


def load_tensor_file(path: Path) -> dict:
    """Load a .safetensors, an xz-compressed .safetensors.xz (how the package ships its weights: the
    same bytes, 12 % smaller) or a torch file (``weights_only=True``), with a clear error on failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.name.endswith(".safetensors.xz"):
            import lzma

            from safetensors.torch import load
            return load(lzma.decompress(path.read_bytes()))
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc


@dataclass
class OfficialCheckpoint:
    """The official files found in a directory."""

    directory: Path
    files: dict[str, Path]

    @classmethod
    def find(cls, directory: Path) -> "OfficialCheckpoint | None":
        directory = Path(directory)
        files = {}
        for name in OFFICIAL_FILES:
            for suffix in OFFICIAL_SUFFIXES:
                p = directory / f"{name}{suffix}"
                if p.is_file():
                    files[name] = p
                    break
        return cls(directory, files) if files else None

    def load(self) -> dict[str, dict[str, Tensor]]:
        missing = set(OFFICIAL_FILES) - set(self.files)
        if missing:
            raise CheckpointError(f"official checkpoint folder {self.directory} lacks: {sorted(missing)}")
        out = {}
        for name, path in self.files.items():
            raw = load_tensor_file(path)
            key, _ = OFFICIAL_FILES[name]
            if key is not None and path.suffix != ".safetensors":
                if key not in raw:
                    raise CheckpointError(f"{path} has no {key!r} entry (top-level keys: {_fmt(map(str, raw))})")
                raw = raw[key]
            out[name] = {k: v for k, v in raw.items() if isinstance(v, Tensor)}
        return out
