"""Training data on the GPU machine: read the shards, rebuild images / masks / point maps, run the
pipeline's own pre-processing, and compute the GT geometry and layout targets.

Needs only numpy and torch. Shard format: see ``fs3d_accel.training.build_data``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..model.configs import ROTATION_6D_MEAN, ROTATION_6D_STD
from ..preprocess import prepare_inputs
from .geometry import sample_oriented_surface, view_geometry

#: condition inputs of the fusers, in the keyword names of ``ConditionFuser.forward``
COND_KEYS = ("image", "mask", "rgb_image", "rgb_image_mask", "pointmap", "rgb_pointmap")
SLAT_COND_KEYS = ("image", "mask", "rgb_image", "rgb_image_mask")


@dataclass
class RawViews:
    """All shards concatenated (numpy, CPU)."""

    names: list[str]
    vertices: list[np.ndarray]     # per shape (V,3) float32, canonical normalised mesh
    faces: list[np.ndarray]        # per shape (F,3) int64
    view_shape: np.ndarray         # (N,) shape index of each view
    masks: np.ndarray              # (N,H,W) bool
    rgb: list[np.ndarray]          # per view (P,3) uint8 object pixels
    depth: list[np.ndarray]        # per view (P,) float32
    bg: np.ndarray                 # (N,7) top rgb, bottom rgb, noise std
    bg_seed: np.ndarray            # (N,)
    focal: np.ndarray              # (N,)
    rotation: np.ndarray           # (N,3,3) GT layout of the canonical mesh
    translation: np.ndarray        # (N,3)
    scale: np.ndarray              # (N,)

    def __len__(self) -> int:
        return len(self.view_shape)


def load_shards(folder: str | Path, max_shapes: int | None = None) -> RawViews:
    files = sorted(Path(folder).glob("shard_*.npz"))
    if not files:
        raise FileNotFoundError(f"no shard_*.npz in {folder}")
    acc: dict[str, list] = {k: [] for k in ("names", "vertices", "faces", "view_shape", "masks", "rgb", "depth", "bg",
                                            "bg_seed", "focal", "rotation", "translation", "scale")}
    n_shapes = 0
    for f in files:
        with np.load(f) as zf:  # NpzFile decompresses on every key access: read each array once
            z = {k: zf[k] for k in zf.files}
        size = int(z["image_size"])
        vo, fo, po = z["vert_offsets"], z["face_offsets"], z["pix_offsets"]
        ns = len(z["names"])
        keep_shapes = ns if max_shapes is None else max(0, min(ns, max_shapes - n_shapes))
        for i in range(keep_shapes):
            acc["names"].append(str(z["names"][i]))
            acc["vertices"].append(z["vertices"][vo[i]:vo[i + 1]].astype(np.float32))
            acc["faces"].append(z["faces"][fo[i]:fo[i + 1]].astype(np.int64))
        vs = z["view_shape"]
        keep = np.nonzero(vs < keep_shapes)[0]
        masks = np.unpackbits(z["masks"], axis=-1)[:, :size * size].reshape(-1, size, size).astype(bool)
        for j in keep:
            acc["rgb"].append(z["rgb"][po[j]:po[j + 1]])
            acc["depth"].append(z["depth"][po[j]:po[j + 1]].astype(np.float32))
        acc["view_shape"].append(vs[keep] + n_shapes)
        acc["masks"].append(masks[keep])
        for k in ("bg", "bg_seed", "focal", "rotation", "translation", "scale"):
            acc[k].append(z[k][keep])
        n_shapes += keep_shapes
        if max_shapes is not None and n_shapes >= max_shapes:
            break
    cat = {k: np.concatenate(acc[k]) for k in ("view_shape", "masks", "bg", "bg_seed", "focal", "rotation",
                                               "translation", "scale")}
    return RawViews(names=acc["names"], vertices=acc["vertices"], faces=acc["faces"], rgb=acc["rgb"],
                    depth=acc["depth"], **cat)


def view_arrays(raw: RawViews, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image uint8 HxWx3, mask bool HxW, point map float32 HxWx3 with NaN background) of view i."""
    m = raw.masks[i]
    h, w = m.shape
    top, bottom, noise = raw.bg[i, :3], raw.bg[i, 3:6], float(raw.bg[i, 6])
    a = np.linspace(0.0, 1.0, h)[:, None, None]
    bg = np.broadcast_to(top * (1 - a) + bottom * a, (h, w, 3)).astype(np.float64)
    if noise > 0:
        bg = bg + np.random.default_rng(int(raw.bg_seed[i])).normal(0.0, noise, size=bg.shape)
    img = np.round(np.clip(bg, 0, 1) * 255).astype(np.uint8)
    img[m] = raw.rgb[i]
    f = float(raw.focal[i])
    v, u = np.nonzero(m)
    z = raw.depth[i]
    pm = np.full((h, w, 3), np.nan, dtype=np.float32)
    pm[v, u, 0] = -(u + 0.5 - w / 2) / f * z
    pm[v, u, 1] = -(v + 0.5 - h / 2) / f * z
    pm[v, u, 2] = z
    return img, m, pm


def layout_tokens(center: Tensor, size: Tensor, scene_scale: Tensor, scene_shift: Tensor) -> dict[str, Tensor]:
    """GT layout tokens of view-aligned objects (R = I): the inverse of ``pose.decode_layout``.

    center (B,3), size (B,), scene_scale (B,), scene_shift (B,3) -> tokens (B,1,C) per modality."""
    b = center.shape[0]
    d6 = torch.tensor([1.0, 0, 0, 0, 1.0, 0], device=center.device)
    rot = (d6 - torch.tensor(ROTATION_6D_MEAN, device=center.device)) / torch.tensor(ROTATION_6D_STD,
                                                                                      device=center.device)
    return {
        "6drotation_normalized": rot.expand(b, 6)[:, None].clone(),
        "scale": torch.log(size / scene_scale)[:, None, None].expand(b, 1, 3).clone(),
        "translation": ((center - scene_shift) / scene_scale[:, None])[:, None],
        "translation_scale": torch.zeros(b, 1, 1, device=center.device),
    }


_RAW: RawViews | None = None


def _prepare_range(args: tuple[int, int, int, float]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    lo, hi, size, crop = args
    torch.set_num_threads(1)
    cond = {k: [] for k in COND_KEYS}
    scales, shifts = [], []
    for i in range(lo, hi):
        img, m, pm = view_arrays(_RAW, i)
        p = prepare_inputs(img, m, pm, size, crop)
        for k in COND_KEYS:
            cond[k].append(getattr(p, k)[0].half().numpy())
        scales.append(float(p.pointmap_scale[0]))
        shifts.append(p.pointmap_shift.numpy())
    return ({k: np.stack(v) for k, v in cond.items()}, np.array(scales, np.float32),
            np.stack(shifts).astype(np.float32))


def prepare_views(raw: RawViews, size: int, crop: float, workers: int = 0) -> list:
    """``prepare_inputs`` of every view, in ``workers`` forked processes (0: all cores but 2, 1: inline)."""
    import os
    global _RAW
    _RAW = raw
    n = len(raw)
    workers = workers or max(1, (os.cpu_count() or 2) - 2)
    step = 128
    jobs = [(i, min(i + step, n), size, crop) for i in range(0, n, step)]
    if workers == 1 or n <= step:
        return [_prepare_range(j) for j in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
        return list(ex.map(_prepare_range, jobs))


@dataclass
class TrainSet:
    """Everything the trainers need, on one device."""

    cond: dict[str, Tensor]              # (N, C, S, S) float16 each
    scene_scale: Tensor                  # (N,)
    scene_shift: Tensor                  # (N, 3)
    occupancy: Tensor                    # (N, R, R, R) bool
    coords: list[Tensor]                 # per view (n_i, 3) int32
    corner_sdf: list[Tensor]             # per view (n_i, 125) float16 (object units)
    center: Tensor                       # (N, 3)
    size: Tensor                         # (N,)
    view_shape: Tensor                   # (N,)
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.occupancy.shape[0])

    def layout(self, idx: Tensor) -> dict[str, Tensor]:
        return layout_tokens(self.center[idx], self.size[idx], self.scene_scale[idx], self.scene_shift[idx])

    def cond_batch(self, idx: Tensor, keys=COND_KEYS) -> dict[str, Tensor]:
        return {k: self.cond[k][idx].float() for k in keys}


def build_trainset(raw: RawViews, device: str | torch.device, image_size: int = 112, crop_factor: float = 1.2,
                   n_surface: int = 8192, log=print, workers: int = 0,
                   lattice: bool = True) -> TrainSet:
    """Pre-process every view and compute its GT geometry on ``device``."""
    dev = torch.device(device)
    t0 = time.perf_counter()
    parts = prepare_views(raw, image_size, crop_factor, workers)
    cond_t = {k: torch.from_numpy(np.concatenate([p[0][k] for p in parts])).to(dev) for k in COND_KEYS}
    scales = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    shifts = torch.from_numpy(np.concatenate([p[2] for p in parts]))
    t1 = time.perf_counter()
    log(f"prepared {len(raw)} views in {t1 - t0:.1f}s")
    gen = torch.Generator().manual_seed(0)
    surf = []
    for v, f in zip(raw.vertices, raw.faces):
        surf.append(sample_oriented_surface(torch.from_numpy(v).to(dev), torch.from_numpy(f).to(dev), n_surface, gen))
    occ, coords, sdf, centers, sizes = [], [], [], [], []
    for i in range(len(raw)):
        s = int(raw.view_shape[i])
        g = view_geometry(torch.from_numpy(raw.vertices[s]).to(dev), surf[s][0], surf[s][1],
                          torch.from_numpy(raw.rotation[i]).to(dev), torch.from_numpy(raw.translation[i]).to(dev),
                          float(raw.scale[i]), lattice=lattice)
        occ.append(g.occupancy)
        coords.append(g.coords)
        sdf.append(g.corner_sdf.half())
        centers.append(g.center)
        sizes.append(g.size)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    log(f"geometry of {len(raw)} views in {t2 - t1:.1f}s; mean surface voxels "
        f"{sum(len(c) for c in coords) / max(1, len(coords)):.0f}")
    return TrainSet(cond=cond_t, scene_scale=scales.float().to(dev),
                    scene_shift=shifts.float().to(dev), occupancy=torch.stack(occ), coords=coords,
                    corner_sdf=sdf, center=torch.stack(centers), size=torch.stack(sizes),
                    view_shape=torch.from_numpy(raw.view_shape).to(dev),
                    timings={"prepare_s": t1 - t0, "geometry_s": t2 - t1})
