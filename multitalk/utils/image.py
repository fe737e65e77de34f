"""Condition image: safe loading, size buckets, resize + centre crop, speaker masks.

Geometry follows the official ``wan/multitalk.py`` (``resize_and_centercrop``, the bucket
choice in ``generate``, the human masks) and ``wan/utils/multitalk_utils.py`` (the
``ASPECT_RATIO_627`` / ``ASPECT_RATIO_960`` bucket tables), reimplemented without
torchvision.

Coordinate conventions: sizes are (height, width) in pixels; a speaker bbox is
``[r0, c0, r1, c1]`` (rows first, end exclusive) in source-image pixels.
"""
from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from multitalk.api import InputError

# ---------------------------------------------------------------------------------------
# Size buckets

# Aspect ratio (h / w, as the official string keys) -> (target_h, target_w).
# Official ASPECT_RATIO_627: about 640x640 pixels of area (multitalk-480).
_ASPECT_RATIO_627: dict[str, tuple[int, int]] = {
    "0.26": (320, 1216), "0.38": (384, 1024), "0.50": (448, 896), "0.67": (512, 768),
    "0.82": (576, 704), "1.00": (640, 640), "1.22": (704, 576), "1.50": (768, 512),
    "1.86": (832, 448), "2.00": (896, 448), "2.50": (960, 384), "2.83": (1088, 384),
    "3.60": (1152, 320), "3.80": (1216, 320), "4.00": (1280, 320),
}  # fmt: skip
# Official ASPECT_RATIO_960: about 960x960 pixels of area (multitalk-720).
_ASPECT_RATIO_960: dict[str, tuple[int, int]] = {
    "0.22": (448, 2048), "0.29": (512, 1792), "0.36": (576, 1600), "0.45": (640, 1408),
    "0.55": (704, 1280), "0.63": (768, 1216), "0.76": (832, 1088), "0.88": (896, 1024),
    "1.00": (960, 960), "1.14": (1024, 896), "1.31": (1088, 832), "1.50": (1152, 768),
    "1.58": (1216, 768), "1.82": (1280, 704), "1.91": (1344, 704), "2.20": (1408, 640),
    "2.30": (1472, 640), "2.67": (1536, 576), "2.89": (1664, 576), "3.62": (1856, 512),
    "3.75": (1920, 512),
}  # fmt: skip

BUCKETS: dict[str, dict[str, tuple[int, int]]] = {
    "multitalk-480": _ASPECT_RATIO_627,
    "multitalk-720": _ASPECT_RATIO_960,
}

# Small buckets for CPU runs / tests: "multitalk-N" (N not 480/720) is the 480 table
# scaled by N / 640 (so N is roughly the side of a square output), each side rounded
# half-up to a multiple of 16 (the VAE stride 8 x DiT patch 2), at least 32.
_SCALED_BUCKET_RE = re.compile(r"^multitalk-(\d{1,4})$")
_SCALED_MIN_N, _SCALED_MAX_N = 32, 2048


def _scaled_side(side: int, factor: float) -> int:
    return max(32, int(side * factor / 16.0 + 0.5) * 16)


def bucket_table(size: str) -> dict[str, tuple[int, int]]:
    """The aspect-ratio table for a size name: ``multitalk-480``, ``multitalk-720``, or a
    scaled ``multitalk-N`` (see the module comment). Unknown names: InputError("size")."""
    if size in BUCKETS:
        return BUCKETS[size]
    match = _SCALED_BUCKET_RE.match(size) if isinstance(size, str) else None
    if match is None or not _SCALED_MIN_N <= int(match.group(1)) <= _SCALED_MAX_N:
        raise InputError(
            "size", f"unknown size {size!r}: use multitalk-480, multitalk-720 or multitalk-N with 32 <= N <= 2048"
        )
    factor = int(match.group(1)) / 640.0
    return {ratio: (_scaled_side(h, factor), _scaled_side(w, factor)) for ratio, (h, w) in _ASPECT_RATIO_627.items()}


def bucket_size(src_h: int, src_w: int, size: str = "multitalk-480") -> tuple[int, int]:
    """Output (target_h, target_w) pixels for a source image of src_h x src_w.

    Official rule: the bucket whose nominal ratio key is closest to src_h / src_w
    (``sorted(keys, key=|float(key) - ratio|)[0]``; ties go to the earlier key).
    """
    table = bucket_table(size)
    ratio = src_h / src_w
    closest = sorted(table.keys(), key=lambda key: abs(float(key) - ratio))[0]
    return table[closest]


# ---------------------------------------------------------------------------------------
# Loading


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB.

    Like the official ``Image.open(...).convert('RGB')``: alpha is dropped (not composited),
    palette / CMYK / greyscale / YCbCr go through PIL's conversion. High-bit-depth
    greyscale ("I;16*", "I", "F") is rescaled to 8 bits first, because PIL's own
    conversion clips those values at 255 (a 16-bit photo would come out white).
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = float(values.max()) if values.size else 0.0
        if image.mode == "F" and peak <= 1.0:
            scale = 255.0  # float images in [0, 1]
        elif peak > 255.0 or image.mode.startswith("I;16"):
            scale = 255.0 / 65535.0  # 16-bit range
        else:
            scale = 1.0  # "I" images that already hold 8-bit values
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")


def load_image(
    data: bytes,
    field: str = "condition_image",
    max_pixels: int = 40_000_000,
    min_side: int = 64,
) -> Image.Image:
    """Decode an uploaded condition image to an 8-bit RGB PIL image (EXIF orientation
    applied).

    Raises ``InputError(field, ...)`` for: empty input, bytes that are not an image,
    truncated / corrupt files, more than ``max_pixels`` pixels (status 413; checked on
    the header size before any pixel is decoded, and PIL's own decompression-bomb limit
    maps to the same error), and images whose shorter side is below ``min_side``.
    """
    if not data:
        raise InputError(field, "empty file")
    try:
        # Image.open reads the header only; PIL raises DecompressionBombError here for
        # sizes over twice its global limit. (Its warning between 1x and 2x is left
        # alone: those sizes exceed any sane max_pixels and are refused just below.)
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise InputError(field, f"image has too many pixels ({exc})", 413) from exc
    except UnidentifiedImageError as exc:
        raise InputError(field, "not a recognised image file") from exc
    except Exception as exc:  # corrupt headers raise all sorts (SyntaxError, struct.error...)
        raise InputError(field, f"image header could not be read ({exc})") from exc

    width, height = image.size
    if width * height > max_pixels:
        raise InputError(field, f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}", 413)
    if min(width, height) < min_side:
        raise InputError(field, f"image is {width}x{height}; each side must be at least {min_side} pixels")

    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise InputError(field, f"image has too many pixels ({exc})", 413) from exc
    except Exception as exc:
        # Truncated data: OSError("image file is truncated"), zlib errors... (relies on
        # PIL's global ImageFile.LOAD_TRUNCATED_IMAGES staying at its default, False).
        raise InputError(field, f"image data is truncated or corrupt ({exc})") from exc

    try:
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except Exception as exc:
        raise InputError(field, f"image could not be converted to RGB ({exc})") from exc


# ---------------------------------------------------------------------------------------
# Resize + centre crop


def _scaled_size(orig_h: int, orig_w: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Official: scale so the image covers the target, ceil each side."""
    scale = max(target_h / orig_h, target_w / orig_w)
    return math.ceil(scale * orig_h), math.ceil(scale * orig_w)


def _center_crop_offsets(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """torchvision ``center_crop`` offsets (Python's round: halves go to even)."""
    return int(round((height - target_h) / 2.0)), int(round((width - target_w) / 2.0))


def resize_and_center_crop(image: Image.Image, target_hw: tuple[int, int]) -> torch.Tensor:
    """Resize ``image`` (RGB PIL) to cover ``target_hw`` and crop its centre.

    Official ``resize_and_centercrop`` for PIL input: scale = max(th/h, tw/w), size
    ceil(scale * side), PIL BILINEAR resize, torchvision-style centre crop, then
    ``(x / 255 - 0.5) * 2``. Returns float32 [3, target_h, target_w] in [-1, 1].
    """
    target_h, target_w = int(target_hw[0]), int(target_hw[1])
    if image.mode != "RGB":
        image = image.convert("RGB")
    final_h, final_w = _scaled_size(image.height, image.width, target_h, target_w)
    resized = np.asarray(image.resize((final_w, final_h), resample=Image.BILINEAR))
    top, left = _center_crop_offsets(final_h, final_w, target_h, target_w)
    cropped = torch.from_numpy(resized[top : top + target_h, left : left + target_w].copy())
    pixels = cropped.permute(2, 0, 1).to(torch.float32)
    return (pixels / 255 - 0.5) * 2


# ---------------------------------------------------------------------------------------
# Speaker masks

BBox = Sequence[float]


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def validate_bboxes(
    bbox: Union[Sequence[BBox], Mapping[str, BBox]], src_h: int, src_w: int, num_speakers: int
) -> list[tuple[int, int, int, int]]:
    """Check per-speaker boxes and return them as integer (r0, c0, r1, c1).

    Coordinates must lie inside the image (0 <= r <= src_h, 0 <= c <= src_w, end
    exclusive); out-of-bounds boxes are an error rather than silently clamped, since they
    mean the box was drawn for a different image size. Integer truncation as the
    official ``int(x)`` slicing.
    """
    if isinstance(bbox, Mapping):  # official JSON form {"person1": [...], "person2": [...]}
        boxes = list(bbox.values())
    elif isinstance(bbox, Sequence) and not isinstance(bbox, (str, bytes)):
        boxes = list(bbox)
    else:
        raise InputError("bbox", "must be a list with one [r0, c0, r1, c1] box per speaker")
    if len(boxes) != num_speakers:
        raise InputError("bbox", f"{len(boxes)} boxes given for {num_speakers} speaker(s)")
    checked = []
    for index, box in enumerate(boxes, start=1):
        name = f"box {index}"
        if isinstance(box, (str, bytes)) or not isinstance(box, Sequence) or len(box) != 4:
            raise InputError("bbox", f"{name} must be 4 numbers [r0, c0, r1, c1]")
        if not all(_is_number(v) and math.isfinite(float(v)) for v in box):
            raise InputError("bbox", f"{name} must contain only finite numbers, got {list(box)!r}")
        r0, c0, r1, c1 = (float(v) for v in box)
        if r1 <= r0 or c1 <= c0:
            raise InputError("bbox", f"{name} is inverted: need r0 < r1 and c0 < c1 (rows first), got {list(box)!r}")
        if r0 < 0 or c0 < 0 or r1 > src_h or c1 > src_w:
            raise InputError(
                "bbox",
                f"{name} {list(box)!r} lies outside the {src_h}x{src_w} (rows x columns) image",
            )
        ir0, ic0, ir1, ic1 = int(r0), int(c0), int(r1), int(c1)
        if ir1 <= ir0 or ic1 <= ic0:
            raise InputError("bbox", f"{name} {list(box)!r} covers no whole pixel")
        checked.append((ir0, ic0, ir1, ic1))
    return checked


def speaker_masks(
    src_h: int,
    src_w: int,
    num_speakers: int,
    bbox: Optional[Union[Sequence[BBox], Mapping[str, BBox]]] = None,
    face_scale: float = 0.05,
) -> torch.Tensor:
    """Per-speaker regions of the source image: float32 [P + 1, src_h, src_w] of 0/1.

    Channels: speaker 1, ..., speaker P, background (official ``ref_target_masks``).
    - 1 speaker: all three masks are all ones (bbox, if given, is validated but unused,
      as in the official code).
    - 2 to 4 speakers with ``bbox``: ones inside each speaker's ``[r0, c0, r1, c1]`` box.
    - 2 speakers without: left and right halves, inset by ``face_scale`` of the height
      (rows) and of the half width (columns), as the official default. (The driver gives
      boxes found from the faces instead: :mod:`multitalk.utils.faces`.)
    - 3 or 4 speakers without: an error naming ``bbox``.
    Background is 1 where no speaker mask is set.
    """
    from multitalk.api import MAX_SPEAKERS

    if not 1 <= num_speakers <= MAX_SPEAKERS:
        raise InputError("audio", f"1 to {MAX_SPEAKERS} speakers are supported, got {num_speakers}")
    boxes = validate_bboxes(bbox, src_h, src_w, num_speakers) if bbox is not None else None
    if num_speakers == 1:
        return torch.ones(3, src_h, src_w, dtype=torch.float32)
    if boxes is None and num_speakers > 2:
        raise InputError("bbox", f"{num_speakers} speakers need one box per speaker")

    people = torch.zeros(num_speakers, src_h, src_w, dtype=torch.float32)
    if boxes is not None:
        for person, (r0, c0, r1, c1) in enumerate(boxes):
            people[person, r0:r1, c0:c1] = 1
    else:
        row_min, row_max = int(src_h * face_scale), int(src_h * (1 - face_scale))
        half = src_w // 2
        left_min, left_max = int(half * face_scale), int(half * (1 - face_scale))
        right_min, right_max = int(half * face_scale + half), int(half * (1 - face_scale) + half)
        people[0, row_min:row_max, left_min:left_max] = 1
        people[1, row_min:row_max, right_min:right_max] = 1
    background = (people.sum(dim=0, keepdim=True) == 0).to(torch.float32)
    return torch.cat([people, background], dim=0)


def masks_to_latent(
    masks: torch.Tensor, target_hw: tuple[int, int], latent_hw: tuple[int, int]
) -> torch.Tensor:
    """Bring source-resolution masks [M, src_h, src_w] onto the latent grid.

    Official: the condition image's resize (nearest for tensors) + centre crop to
    ``target_hw``, then nearest interpolation to ``latent_hw`` and ``> 0``.
    Returns float32 [M, lat_h, lat_w] of 0/1.
    """
    target_h, target_w = int(target_hw[0]), int(target_hw[1])
    _, orig_h, orig_w = masks.shape
    final_h, final_w = _scaled_size(orig_h, orig_w, target_h, target_w)
    resized = F.interpolate(masks[None].to(torch.float32), size=(final_h, final_w), mode="nearest")
    top, left = _center_crop_offsets(final_h, final_w, target_h, target_w)
    cropped = resized[:, :, top : top + target_h, left : left + target_w]
    latent = F.interpolate(cropped, size=(int(latent_hw[0]), int(latent_hw[1])), mode="nearest")[0]
    return (latent > 0).to(torch.float32)
