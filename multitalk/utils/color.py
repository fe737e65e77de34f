"""Colour correction across chunks: the official ``match_and_blend_colors``
(``wan/utils/multitalk_utils.py``) in torch, on the device the frames are decoded on.

Each frame is pulled towards the colour statistics of the job's reference image: in CIE
LAB (D65 white, 2 degree observer; skimage's ``rgb2lab`` / ``lab2rgb`` formulas and
constants), each channel is shifted and scaled to the reference's mean and standard
deviation, converted back, clipped to [0, 1] and blended with the frame by ``strength``.

The reference's statistics are six numbers (:class:`ColorTarget`), computed once per job;
the frames are corrected where the VAE decodes them (``multitalk.stages.DecodeStage``), so
a served job's float frames never leave the decoder's device. Arithmetic follows the
official's float32 path (skimage keeps float32 input in float32; the per-channel
statistics are accumulated in float64, and the shift/scale of a channel is computed in
float64 and rounded once, as NumPy does with float64 statistics).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from multitalk.api import InputError

# sRGB (linear) -> XYZ, and the D65 2-degree reference white: skimage's constants.
_XYZ_FROM_RGB = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])
# A channel whose LAB std is below this counts as flat (set to the reference mean). The
# official tests std == 0 exactly; a flat frame's std comes out as rounding noise, which
# the scaling would then amplify into garbage.
FLAT_STD = 1e-4
# Frames corrected at once: bounds the LAB working set (at 480p about 5 MB per frame and array).
FRAMES_PER_BATCH = 8


def _matrix(matrix: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    # Computed in float64 and rounded to the working dtype once, as NumPy's astype.
    return torch.from_numpy(np.ascontiguousarray(matrix)).to(device=like.device, dtype=like.dtype)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], ``[..., 3]`` → CIE LAB ``[..., 3]`` (L in [0, 100]) in ``rgb``'s dtype (skimage ``rgb2lab``)."""
    linear = torch.where(rgb > 0.04045, torch.pow((rgb + 0.055) / 1.055, 2.4), rgb / 12.92)
    xyz = linear @ _matrix(_XYZ_FROM_RGB.T / _D65_WHITE, rgb)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0.0).pow(1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(-1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE LAB ``[..., 3]`` → sRGB ``[..., 3]`` clipped to [0, 1] (skimage ``lab2rgb``: negative
    Z set to 0, out-of-gamut colours clipped), in ``lab``'s dtype."""
    light, a, b = lab.unbind(-1)
    fy = (light + 16.0) / 116.0
    fx = a / 500.0 + fy
    fz = torch.clamp_min(fy - b / 200.0, 0.0)
    f = torch.stack([fx, fy, fz], dim=-1)
    xyz = torch.where(f > 0.2068966, f * f * f, (f - 16.0 / 116.0) / 7.787)
    linear = xyz @ _matrix((_RGB_FROM_XYZ * _D65_WHITE).T, lab)
    gamma = 1.055 * torch.pow(linear.clamp_min(0.0), 1.0 / 2.4) - 0.055
    return torch.where(linear > 0.0031308, gamma, linear * 12.92).clamp(0.0, 1.0)


def _channel_stats(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel: mean and population std of ``[N, H, W, 3]``, in float64."""
    flat = lab.reshape(lab.shape[0], -1, 3).double()
    return flat.mean(dim=1), flat.std(dim=1, correction=0)


@dataclass(frozen=True)
class ColorTarget:
    """What colour correction pulls every frame towards: the reference image's LAB
    per-channel ``mean`` and ``std`` (float64), and the blend ``strength`` in (0, 1]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    strength: float

    @classmethod
    def of(cls, reference: torch.Tensor, strength: float) -> "ColorTarget | None":
        """The target of ``reference`` ``[3, H, W]`` (or ``[3, 1, H, W]``) in [-1, 1]; ``None``
        for strength 0 (no correction). Raises :class:`InputError` outside [0, 1]."""
        if not 0.0 <= strength <= 1.0:
            raise InputError("color_correction", f"must be between 0 and 1, got {strength}")
        if strength == 0.0:
            return None
        if reference.dim() == 4:
            reference = reference[:, 0]
        rgb = ((reference.detach().to(torch.float32) + 1.0) / 2.0).clamp(0.0, 1.0).permute(1, 2, 0)
        mean, std = _channel_stats(rgb_to_lab(rgb)[None])
        return cls(tuple(mean[0].tolist()), tuple(std[0].tolist()), float(strength))


def _lab_planes(rgb: torch.Tensor) -> torch.Tensor:
    """:func:`rgb_to_lab` on channel planes: ``[3, ...]`` in [0, 1] → ``[3, ...]`` LAB (the
    frames' own layout: no transposes of the working set)."""
    linear = torch.where(rgb > 0.04045, torch.pow((rgb + 0.055) / 1.055, 2.4), rgb / 12.92)
    m = _matrix(_XYZ_FROM_RGB / _D65_WHITE[:, None], rgb)
    f = torch.stack([m[i, 0] * linear[0] + m[i, 1] * linear[1] + m[i, 2] * linear[2] for i in range(3)])
    f = torch.where(f > 0.008856, f.clamp_min(0.0).pow(1.0 / 3.0), 7.787 * f + 16.0 / 116.0)
    return torch.stack([116.0 * f[1] - 16.0, 500.0 * (f[0] - f[1]), 200.0 * (f[1] - f[2])])


def _rgb_planes(lab: torch.Tensor) -> torch.Tensor:
    """:func:`lab_to_rgb` on channel planes ``[3, ...]``."""
    fy = (lab[0] + 16.0) / 116.0
    f = torch.stack([lab[1] / 500.0 + fy, fy, torch.clamp_min(fy - lab[2] / 200.0, 0.0)])
    xyz = torch.where(f > 0.2068966, f * f * f, (f - 16.0 / 116.0) / 7.787)
    m = _matrix(_RGB_FROM_XYZ * _D65_WHITE, lab)
    linear = torch.stack([m[i, 0] * xyz[0] + m[i, 1] * xyz[1] + m[i, 2] * xyz[2] for i in range(3)])
    gamma = 1.055 * torch.pow(linear.clamp_min(0.0), 1.0 / 2.4) - 0.055
    return torch.where(linear > 0.0031308, gamma, linear * 12.92).clamp_(0.0, 1.0)


def color_match(video: torch.Tensor, target: "ColorTarget | None") -> torch.Tensor:
    """``video`` ``[3, T, H, W]`` in [-1, 1] pulled towards ``target`` (see the module
    docstring): ``[3, T, H, W]`` float32 in [-1, 1] on ``video``'s device; ``video``
    itself when ``target`` is ``None``. Each channel's shift and scale are computed in
    float64 from the statistics and applied in float32."""
    if target is None:
        return video
    device = video.device
    ref_mean = torch.tensor(target.mean, dtype=torch.float64, device=device)
    ref_std = torch.tensor(target.std, dtype=torch.float64, device=device)
    out = torch.empty(video.shape, dtype=torch.float32, device=device)
    for start in range(0, video.shape[1], FRAMES_PER_BATCH):
        frames_01 = ((video[:, start:start + FRAMES_PER_BATCH].to(torch.float32) + 1.0) / 2.0).clamp_(0.0, 1.0)
        lab = _lab_planes(frames_01)  # [3, n, H, W]
        flat = lab.flatten(2).double()
        mean, std = flat.mean(dim=2), flat.std(dim=2, correction=0)  # [3, n]
        del flat
        flat_channel = std < FLAT_STD  # such a channel becomes the reference mean
        scale = torch.where(flat_channel, torch.zeros_like(std), ref_std[:, None] / torch.where(flat_channel, 1.0, std))
        shift = ref_mean[:, None] - mean * scale
        lab.mul_(scale.float()[..., None, None]).add_(shift.float()[..., None, None])
        matched = _rgb_planes(lab)
        out[:, start:start + frames_01.shape[1]] = ((1.0 - target.strength) * frames_01
                                                   + target.strength * matched) * 2.0 - 1.0
    return out
