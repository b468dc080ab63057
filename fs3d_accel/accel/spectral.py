"""Spectral complexity signals: high-frequency energy ratio (HFER) of the 2D mask and of the 3D coarse
voxels, and the per-voxel high-frequency intensity used as the SLaT saliency term S_freq.

Frequencies are measured in FFT bins: for an axis of length N, bin k has integer frequency
``k`` in ``fftfreq(N) * N`` (so ``|k| <= N/2``); a bin's radius is the Euclidean norm of its
integer frequency vector. ``cutoff`` values are *normalised* frequencies (cycles per sample,
Nyquist = 0.5): the radius threshold is ``cutoff * N``.

Two conventions are offered (``HFERConfig``):

- ``HFERConfig()`` = the released code (implementation notes Sec. 4.1-4.2):
  2D: mask (or RGBA cut-out) cropped to its bounding box + 2 px, resized to 256^2, separable Hann
  window, |F| magnitudes, DC bin removed, Omega_high = {radius > floor(0.15 * 256) = 38};
  3D: grid = positive occupancy logits (0 elsewhere), |F| magnitudes, DC kept in the total,
  Omega_high = {radius >= 0.125 * R} (8 bins at 64^3, 4 bins at the mini model's 32^3).
- ``HFERConfig.paper()`` = the paper's formula H = sum_high |F|^2 / sum_all |F|^2 on the binary
  mask crop (no window) and the binary occupancy, with the DC bin removed from both sums (a binary
  field's DC term otherwise dominates and every object looks "simple"); same cut-offs.

HFER is 0 when the signal has no energy outside DC (e.g. a constant image).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import check_choice, check_int, check_range

SPECTRA = ("magnitude", "power")
VOXEL_VALUES = ("logits", "binary")


@dataclass(frozen=True)
class HFERConfig:
    """How HFER and the per-voxel high-frequency score are computed (defaults: released code)."""

    cutoff_2d: float = 0.15
    cutoff_3d: float = 0.125
    spectrum: str = "magnitude"
    size_2d: int = 256
    window_2d: bool = True
    remove_dc_3d: bool = False
    voxel_values: str = "logits"

    def __post_init__(self) -> None:
        check_range("cutoff_2d", self.cutoff_2d, 0.0, 0.5, low_open=True)
        check_range("cutoff_3d", self.cutoff_3d, 0.0, 0.5, low_open=True)
        check_choice("spectrum", self.spectrum, SPECTRA)
        check_int("size_2d", self.size_2d, 8)
        check_choice("voxel_values", self.voxel_values, VOXEL_VALUES)

    @classmethod
    def paper(cls) -> "HFERConfig":
        return cls(spectrum="power", window_2d=False, remove_dc_3d=True, voxel_values="binary")


def _bin_radius_sq(shape: tuple[int, ...], device: torch.device | None = None) -> Tensor:
    """Squared integer-frequency radius of every bin of ``fftn`` (unshifted order), float64."""
    grids = torch.meshgrid(*[torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64, device=device) for n in shape],
                           indexing="ij")
    return sum(g * g for g in grids)


@functools.lru_cache(maxsize=32)
def _high_bins(shape: tuple[int, ...], radius: float, inclusive: bool, device: str) -> Tensor:
    """Bool mask of the bins with radius > ``radius`` (``>=`` if ``inclusive``); cached because
    the grids (256^2, 64^3) repeat for every object and building them costs as much as the FFT.
    Callers must not modify the returned tensor."""
    r2 = _bin_radius_sq(shape, torch.device(device))
    return r2 >= radius * radius if inclusive else r2 > radius * radius


def _energy(x: Tensor, spectrum: str) -> Tensor:
    f = torch.fft.fftn(x.double())
    mag = f.abs()
    return mag.mul_(mag) if spectrum == "power" else mag


def hfer(x: Tensor, radius: float, *, spectrum: str = "power", remove_dc: bool = True,
         inclusive: bool = False) -> float:
    """High-frequency energy ratio of an n-D array.

    ``radius`` in bins; Omega_high = {bins with radius > ``radius``} (``>=`` if ``inclusive``).
    ``spectrum``: "power" sums |F|^2, "magnitude" sums |F|. ``remove_dc`` drops the zero-frequency
    bin from both sums. Returns 0.0 when the (non-DC) energy is negligible (a constant signal).
    """
    check_choice("spectrum", spectrum, SPECTRA)
    if x.numel() == 0:
        raise ValueError("hfer of an empty array")
    e = _energy(x, spectrum)  # a fresh tensor: safe to modify in place
    full_total = float(e.sum())
    if remove_dc:
        e.view(-1)[0] = 0.0
    total = float(e.sum()) if remove_dc else full_total
    # a constant signal leaves only round-off outside DC
    if total <= 1e-12 * max(full_total, 1e-300) or total <= 1e-300:
        return 0.0
    high = _high_bins(tuple(x.shape), float(radius), bool(inclusive), str(e.device))
    return float(e[high].sum()) / total


# ---------------------------------------------------------------------------------------------
# 2D: the object mask
# ---------------------------------------------------------------------------------------------


def _crop_box(mask: Tensor, pad: int = 2) -> tuple[int, int, int, int]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    h, w = mask.shape
    return (max(int(ys.min()) - pad, 0), min(int(ys.max()) + pad + 1, h),
            max(int(xs.min()) - pad, 0), min(int(xs.max()) + pad + 1, w))


def _resize(img: Tensor, size: int) -> Tensor:
    return F.interpolate(img[None, None].float(), size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[0, 0].double()


def mask_image_2d(mask: Tensor, cfg: HFERConfig, image: Tensor | None = None) -> Tensor:
    """The 2D signal whose HFER is measured: bbox crop (+2 px) resized to ``size_2d``^2.

    With ``image`` (H,W,3 uint8, the released code's RGBA cut-out case) the signal is the grey
    texture inside the mask, the outside filled with the mean grey of the object; otherwise the
    binary silhouette. Hann-windowed if ``cfg.window_2d``.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H,W), got {tuple(mask.shape)}")
    mask = mask.bool().cpu()
    if not bool(mask.any()):
        raise ValueError("mask is empty: HFER of an object needs at least one mask pixel")
    y0, y1, x0, x1 = _crop_box(mask)
    alpha = _resize(mask[y0:y1, x0:x1], cfg.size_2d)
    if image is not None:
        if image.ndim != 3 or image.shape[:2] != mask.shape or image.shape[2] != 3:
            raise ValueError(f"image must be (H,W,3) matching the mask {tuple(mask.shape)}, got {tuple(image.shape)}")
        rgb = image.cpu().double()
        grey = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
        grey = _resize(grey[y0:y1, x0:x1], cfg.size_2d)
        inside = alpha > 0
        fill = grey[inside].mean() if bool(inside.any()) else torch.tensor(128.0, dtype=torch.float64)
        sig = torch.where(inside, grey, fill)
    else:
        sig = alpha
    if cfg.window_2d:
        w = torch.hann_window(cfg.size_2d, periodic=False, dtype=torch.float64)
        sig = sig * w[:, None] * w[None, :]
    return sig


def hfer_2d(mask: Tensor, cfg: HFERConfig = HFERConfig(), image: Tensor | None = None) -> float:
    """HFER of the object mask (see :func:`mask_image_2d`); Omega_high = radius > floor(c * size)."""
    sig = mask_image_2d(mask, cfg, image)
    radius = int(cfg.cutoff_2d * cfg.size_2d)
    return hfer(sig, radius, spectrum=cfg.spectrum, remove_dc=True, inclusive=False)


# ---------------------------------------------------------------------------------------------
# 3D: the coarse occupancy
# ---------------------------------------------------------------------------------------------


def voxel_grid(occupancy_logits: Tensor, cfg: HFERConfig) -> Tensor:
    """(R,R,R) float64 signal: positive logits (``"logits"``) or 0/1 occupancy (``"binary"``)."""
    if occupancy_logits.ndim != 3 or len(set(occupancy_logits.shape)) != 1:
        raise ValueError(f"occupancy_logits must be a cube (R,R,R), got {tuple(occupancy_logits.shape)}")
    lg = occupancy_logits.detach().cpu().double()  # copy float32 to the host, then widen (same values)
    if cfg.voxel_values == "binary":
        return (lg > 0).double()
    return torch.where(lg > 0, lg, torch.zeros_like(lg))


def hfer_3d(occupancy_logits: Tensor, cfg: HFERConfig = HFERConfig()) -> float:
    """HFER of the coarse voxels; Omega_high = radius >= cutoff_3d * R."""
    grid = voxel_grid(occupancy_logits, cfg)
    return hfer(grid, cfg.cutoff_3d * grid.shape[0], spectrum=cfg.spectrum, remove_dc=cfg.remove_dc_3d,
                inclusive=True)


def highpass_magnitude(grid: Tensor, cutoff: float) -> Tensor:
    """|IFFT(F(grid) * 1[radius >= cutoff * R])|: the spatial high-frequency intensity field."""
    f = torch.fft.fftn(grid.double())
    high = _high_bins(tuple(grid.shape), float(cutoff * grid.shape[0]), True, str(f.device))
    return torch.fft.ifftn(f * high).abs()


def minmax(u: Tensor, eps: float = 0.0) -> Tensor:
    """(u - min) / (max - min + eps); all zeros when u is constant (and eps = 0)."""
    u = u.double()
    if u.numel() == 0:
        return u
    lo, hi = u.min(), u.max()
    den = hi - lo + eps
    if float(den) <= 0:
        return torch.zeros_like(u)
    return (u - lo) / den


def voxel_highfreq_scores(grid: Tensor, coords: Tensor, cutoff: float) -> Tensor:
    """S_freq per token: the high-pass magnitude field (:func:`highpass_magnitude`) sampled at each
    token's voxel (``coords`` (N,4) [batch,x,y,z]) and min-max normalised over the N tokens to [0,1]
    (float64, (N,)). This is the released ``coords_scores`` column 0."""
    field = highpass_magnitude(grid, cutoff)
    c = coords[:, 1:].long().cpu()
    r = grid.shape[0]
    if len(c) and (int(c.min()) < 0 or int(c.max()) >= r):
        raise ValueError(f"coords outside the {r}^3 grid")
    return minmax(field[c[:, 0], c[:, 1], c[:, 2]])


def coords_grid(coords: Tensor, resolution: int) -> Tensor:
    """Binary (R,R,R) grid with ones at the token voxels."""
    g = torch.zeros((resolution,) * 3, dtype=torch.float64)
    c = coords[:, 1:].long().cpu()
    g[c[:, 0], c[:, 1], c[:, 2]] = 1.0
    return g


__all__ = ["HFERConfig", "coords_grid", "hfer", "hfer_2d", "hfer_3d", "highpass_magnitude", "mask_image_2d",
           "minmax", "voxel_grid", "voxel_highfreq_scores"]
