"""Layout (pose) decoding as the official ``ScaleShiftInvariant`` pose decoder does it.

Frame conventions (row vectors, PyTorch3D ``Transform3d``): an object-local point ``x`` in the
normalised cube (about [-0.5, 0.5]^3) maps to the camera frame by ``x_cam = (s * x) @ R + t``.
The model predicts the pose in the normalised point-map space; ``p_metric = p * scene_scale +
scene_shift`` maps it back, so metric ``s_m = s * scene_scale``, ``t_m = t * scene_scale + shift``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .layout import Layout
from .model.configs import ROTATION_6D_MEAN, ROTATION_6D_STD


def rotation_6d_to_matrix(d6: Tensor) -> Tensor:
    """Gram-Schmidt on the two 3-vectors of a 6D rotation; b1, b2, b3 become the COLUMNS of R.

    The official pose decoder stacks along the last dim (columns), unlike PyTorch3D's
    ``rotation_6d_to_matrix`` (rows); see the architecture reference, section 1.2 step 7.
    """
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = torch.nn.functional.normalize(a1, dim=-1)
    b2 = a2 - (b1 * a2).sum(-1, keepdim=True) * b1
    b2 = torch.nn.functional.normalize(b2, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack((b1, b2, b3), dim=-1)


def matrix_to_quaternion(m: Tensor) -> Tensor:
    """Rotation matrix (...,3,3) -> quaternion (w,x,y,z) with w >= 0 (for column-vector matrices)."""
    m = m.double()
    w = torch.sqrt(torch.clamp(1 + m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2], min=0)) / 2
    x = torch.sqrt(torch.clamp(1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2], min=0)) / 2
    y = torch.sqrt(torch.clamp(1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], min=0)) / 2
    z = torch.sqrt(torch.clamp(1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2], min=0)) / 2
    x = torch.copysign(x, m[..., 2, 1] - m[..., 1, 2])
    y = torch.copysign(y, m[..., 0, 2] - m[..., 2, 0])
    z = torch.copysign(z, m[..., 1, 0] - m[..., 0, 1])
    return torch.stack((w, x, y, z), dim=-1)


def decode_layout(ss_latents: dict[str, Tensor], scene_scale: Tensor, scene_shift: Tensor,
                  downsample_factor: float = 1.0) -> Layout:
    """Decode the SS generator's layout tokens (batch element 0) to a metric camera-frame Layout.

    rot6d = x * STD + MEAN -> Gram-Schmidt; scale = exp(scale), averaged over its 3 components
    (as the official decoder outputs), times the voxel downsample factor; translation used as is;
    ``translation_scale`` is not used by this convention.
    """
    d6 = ss_latents["6drotation_normalized"][0, 0].double().cpu()
    d6 = d6 * torch.tensor(ROTATION_6D_STD, dtype=torch.float64) + torch.tensor(ROTATION_6D_MEAN, dtype=torch.float64)
    rot = rotation_6d_to_matrix(d6)
    s = torch.exp(ss_latents["scale"][0, 0].double().cpu())
    t = ss_latents["translation"][0, 0].double().cpu()
    ss = scene_scale.double().cpu()
    sh = scene_shift.double().cpu()
    scale = (s * ss).mean().repeat(3) * downsample_factor
    trans = t * ss + sh
    return Layout(rotation=rot.numpy(), translation=trans.numpy(), scale=scale.numpy())
