"""Input validation and pre-processing as the official SAM 3D pipeline does it.

Steps (``InferencePipelinePointMap.preprocess_image`` with the HF ``ss_preprocessor``):

1. Point-map normalisation, object-centric, on the full point map: ``shift`` = per-axis median of
   the finite points under the mask; ``scale`` = median over all finite pixels of
   ``max_abs_axis(p - shift)``; normalised ``(p - shift) / scale``.
2. Crop around the mask: bounding box of the mask, square side ``int(max(w, h, 2) * 1.2)``
   centred on the box centre; out-of-image parts are zero (image, mask) or NaN (point map).
3. Pad to square (centred) and resize to the network size (518 for ``full``): RGB bilinear with
   antialias, mask and point map nearest.
4. The same pad + resize on the full (uncropped) image, mask and point map.

Images are float in [0, 1]; ImageNet normalisation happens inside the DINO embedder. The image is
not multiplied by the mask (the HF config has no background removal).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class InputError(ValueError):
    """Raised for bad user input, before any network work."""


@dataclass
class PreparedInputs:
    """Network-ready tensors for one object (batch of 1)."""

    image: Tensor           # (1,3,S,S) cropped RGB in [0,1]
    mask: Tensor            # (1,1,S,S) cropped mask {0,1}
    rgb_image: Tensor       # (1,3,S,S) full image, padded to square
    rgb_image_mask: Tensor  # (1,1,S,S)
    pointmap: Tensor        # (1,3,S,S) cropped normalised point map (NaN = invalid)
    rgb_pointmap: Tensor    # (1,3,S,S)
    pointmap_scale: Tensor  # (3,)
    pointmap_shift: Tensor  # (3,)
    mask_full: Tensor       # (H,W) bool, the mask as given (for HFER etc.)
    image_full: Tensor      # (H,W,3) float in [0,1], the image as given (for texture-aware signals)

    def to(self, device: torch.device | str) -> "PreparedInputs":
        return PreparedInputs(**{k: v.to(device) for k, v in self.__dict__.items()})

    def ss_kwargs(self) -> dict[str, Tensor]:
        return dict(image=self.image, mask=self.mask, rgb_image=self.rgb_image,
                    rgb_image_mask=self.rgb_image_mask, pointmap=self.pointmap, rgb_pointmap=self.rgb_pointmap)

    def slat_kwargs(self) -> dict[str, Tensor]:
        return dict(image=self.image, mask=self.mask, rgb_image=self.rgb_image, rgb_image_mask=self.rgb_image_mask)


def _as_tensor(x, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().cpu()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    try:  # PIL images and the like
        return torch.from_numpy(np.asarray(x).copy())
    except Exception as exc:  # pragma: no cover - defensive
        raise InputError(f"{name}: cannot convert {type(x).__name__} to an array") from exc


def validate_image(image) -> Tensor:
    """HxWx3 uint8 (0..255) or float (0..1) -> float32 (3,H,W) in [0,1]."""
    t = _as_tensor(image, "image")
    if t.ndim != 3 or t.shape[-1] not in (3, 4):
        raise InputError(f"image must be HxWx3 (RGB) or HxWx4 (RGBA), got shape {tuple(t.shape)}")
    t = t[..., :3]
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif t.dtype in (torch.float16, torch.float32, torch.float64):
        t = t.float()
        if not torch.isfinite(t).all():
            raise InputError("image contains NaN or inf")
        if t.min() < 0 or t.max() > 1:
            raise InputError(f"float image must be in [0,1], got range [{t.min():.3g}, {t.max():.3g}]")
    else:
        raise InputError(f"image dtype must be uint8 or float, got {t.dtype}")
    if min(t.shape[:2]) < 2:
        raise InputError(f"image is too small: {tuple(t.shape[:2])}")
    return t.permute(2, 0, 1).contiguous()


def validate_mask(mask, hw: tuple[int, int]) -> Tensor:
    """HxW binary mask (bool, or integers/floats with values in {0,1} or {0,255}) -> bool (H,W)."""
    t = _as_tensor(mask, "mask")
    if t.ndim == 3 and t.shape[-1] == 1:
        t = t[..., 0]
    if t.ndim != 2:
        raise InputError(f"mask must be HxW, got shape {tuple(t.shape)}")
    if tuple(t.shape) != tuple(hw):
        raise InputError(f"mask size {tuple(t.shape)} differs from image size {tuple(hw)}")
    if t.dtype != torch.bool:
        vals = torch.unique(t)
        allowed = {0, 1} if t.dtype != torch.uint8 or vals.max() <= 1 else {0, 255}
        if not set(vals.tolist()) <= allowed:
            raise InputError(f"mask must be binary (values {sorted(allowed)}), found values {vals[:8].tolist()}")
        t = t > 0
    n = int(t.sum())
    if n == 0:
        raise InputError("mask is empty: no object pixel selected")
    if n == t.numel():
        raise InputError("mask selects every pixel: an object mask must leave background")
    return t


def validate_pointmap(pointmap, hw: tuple[int, int], mask: Tensor) -> Tensor:
    """HxWx3 float camera-frame points (NaN/inf allowed for invalid pixels) -> float32 (3,H,W)."""
    t = _as_tensor(pointmap, "pointmap")
    if t.ndim != 3 or t.shape[-1] != 3:
        raise InputError(f"pointmap must be HxWx3, got shape {tuple(t.shape)}")
    if tuple(t.shape[:2]) != tuple(hw):
        raise InputError(f"pointmap size {tuple(t.shape[:2])} differs from image size {tuple(hw)}")
    if not t.dtype.is_floating_point:
        raise InputError(f"pointmap must be floating point, got {t.dtype}")
    t = t.float()
    t = torch.where(torch.isfinite(t), t, torch.full_like(t, float("nan")))
    valid = torch.isfinite(t).all(-1)
    if not (valid & mask).any():
        raise InputError("pointmap has no finite point inside the mask")
    return t.permute(2, 0, 1).contiguous()


def normalize_pointmap(pm: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Object-centric scale/shift normalisation (``ObjectCentricSSI(use_scene_scale=True)``).

    pm: (3,H,W) with NaN for invalid; mask: (H,W) bool. Returns (normalised pm, scale (3,), shift (3,)).
    """
    pts = pm.permute(1, 2, 0)
    obj = pts[mask]
    obj = obj[torch.isfinite(obj).all(-1)]
    # numpy's nanmedian averages the two middle values (torch.median would take the lower one).
    shift = torch.from_numpy(np.nanmedian(obj.double().numpy(), axis=0)).float()
    dev = (pts - shift).abs().amax(-1)
    dev = dev[torch.isfinite(dev)]
    scale_v = float(np.nanmedian(dev.double().numpy()))
    if not np.isfinite(scale_v) or scale_v <= 0:
        raise InputError("pointmap has zero spread: cannot normalise its scale")
    scale = torch.full((3,), scale_v)
    return (pm - shift[:, None, None]) / scale[:, None, None], scale, shift


def crop_box(mask: Tensor, factor: float) -> tuple[int, int, int]:
    """Square crop (top, left, size) around the mask bounding box, side ``int(max(w,h,2)*factor)``."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    y1, y2 = int(ys.min()), int(ys.max())
    x1, x2 = int(xs.min()), int(xs.max())
    w, h = x2 - x1, y2 - y1
    size = int(max(w, h, 2) * factor)
    cy, cx = (y1 + y2) / 2.0, (x1 + x2) / 2.0
    top = int(round(cy - size / 2.0))
    left = int(round(cx - size / 2.0))
    return top, left, size


def crop(x: Tensor, top: int, left: int, size: int, fill: float) -> Tensor:
    """Crop (C,H,W) to (C,size,size) at (top,left); outside the image is ``fill``."""
    c, h, w = x.shape
    out = torch.full((c, size, size), fill, dtype=x.dtype)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + size, h), min(left + size, w)
    if y1 > y0 and x1 > x0:
        out[:, y0 - top:y1 - top, x0 - left:x1 - left] = x[:, y0:y1, x0:x1]
    return out


def pad_to_square(x: Tensor, fill: float) -> Tensor:
    c, h, w = x.shape
    s = max(h, w)
    out = torch.full((c, s, s), fill, dtype=x.dtype)
    top, left = (s - h) // 2, (s - w) // 2
    out[:, top:top + h, left:left + w] = x
    return out


def resize(x: Tensor, size: int, mode: str) -> Tensor:
    """Resize (C,H,W) to (C,size,size): ``bilinear`` (antialiased, like torchvision) or ``nearest``."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x.clone()
    if mode == "bilinear":
        return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return F.interpolate(x[None], size=(size, size), mode="nearest")[0]


def prepare_inputs(image, mask, pointmap, size: int, crop_factor: float = 1.2) -> PreparedInputs:
    """Validate and pre-process one object's inputs (see module docstring)."""
    img = validate_image(image)
    hw = tuple(img.shape[1:])
    m = validate_mask(mask, hw)
    if pointmap is None:
        raise InputError("pointmap is required here (pass one, or give the pipeline a depth estimator)")
    pm = validate_pointmap(pointmap, hw, m)
    pm_n, scale, shift = normalize_pointmap(pm, m)
    mf = m[None].float()
    top, left, s = crop_box(m, crop_factor)
    nan = float("nan")
    c_img = resize(pad_to_square(crop(img, top, left, s, 0.0), 0.0), size, "bilinear").clamp(0, 1)
    c_mask = resize(pad_to_square(crop(mf, top, left, s, 0.0), 0.0), size, "nearest")
    c_pm = resize(pad_to_square(crop(pm_n, top, left, s, nan), nan), size, "nearest")
    f_img = resize(pad_to_square(img, 0.0), size, "bilinear").clamp(0, 1)
    f_mask = resize(pad_to_square(mf, 0.0), size, "nearest")
    f_pm = resize(pad_to_square(pm_n, nan), size, "nearest")
    return PreparedInputs(image=c_img[None], mask=c_mask[None], rgb_image=f_img[None], rgb_image_mask=f_mask[None],
                          pointmap=c_pm[None], rgb_pointmap=f_pm[None], pointmap_scale=scale,
                          pointmap_shift=shift, mask_full=m, image_full=img.permute(1, 2, 0).contiguous())
