"""Shot cuts in a source video, and which source frame each chunk takes as its reference.

InfiniteTalk dubs an edited video chunk by chunk, each chunk conditioned on a *reference
frame* of the source (:mod:`multitalk.infinitetalk`). Across a hard cut, a chunk whose
reference lies in the shot before the cut keeps drawing that shot. The official
``generate_infinitetalk.py --scene_seg`` (``wan/utils/segvideo.py``) finds the shots with
PySceneDetect (a ``SceneManager`` holding ``ContentDetector``, ``AdaptiveDetector`` and
``ThresholdDetector`` at their defaults), cuts the source and the speech at the shot
boundaries (each clip starting 0.05 s after its cut) and dubs every shot as a job of its
own. Here the one chunk loop stays, and :func:`chunk_references` says, for each chunk,
which shot it belongs to and which of that shot's frames is its reference; the first chunk
of a shot after a cut starts afresh from that frame (no motion frames carried over from
the shot before, as the official's separate runs) and is colour-matched to it.

:func:`detect_cuts` runs the official detectors (PySceneDetect, ``scenedetect`` on PyPI,
its headless build) over the uploaded file; frame numbers are at the 25 fps the source is
read at (:mod:`multitalk.utils.video_source`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from multitalk.api import InputError

FPS = 25
# The official clips each shot from 0.05 s after its cut: the first whole frame after a cut
# at 25 fps is the next one (a cut's first frame may still hold a dissolve's blend).
SHOT_START_OFFSET = 1


def detect_cuts(path: str, fps: int = FPS, field: str = "condition_video") -> list[int]:
    """Frame numbers (at ``fps``) where a new shot starts, 0 excluded, in order."""
    from scenedetect import AdaptiveDetector, ContentDetector, SceneManager, ThresholdDetector, open_video

    try:
        video = open_video(path)
        manager = SceneManager()
        for detector in (ContentDetector(), AdaptiveDetector(), ThresholdDetector()):  # the official's set
            manager.add_detector(detector)
        manager.detect_scenes(video, show_progress=False)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the upload's problem here
        raise InputError(field, f"shot detection could not read the video ({exc})") from exc
    return sorted({round(start.seconds * fps) for start, _ in manager.get_scene_list()} - {0})


@dataclass(frozen=True)
class ChunkReference:
    """Chunk ``k``'s reference: the source ``frame`` it is conditioned on, its ``shot``
    (0 = the first), and whether it is the first chunk of that shot after a cut
    (``new_shot``: it starts afresh from the reference instead of the previous chunk's
    last frames, and is colour-matched to it)."""

    frame: int
    shot: int
    new_shot: bool = False


def chunk_references(starts: Sequence[int], frames: int, motion_frames: int, total_frames: int,
                     cuts: Sequence[int] = ()) -> list[ChunkReference]:
    """Each chunk's reference frame, given the chunk plan and the shot cuts.

    A chunk's shot is the one holding most of the frames it adds to the video (the first
    chunk all its frames; the others theirs after the ``motion_frames`` they continue
    from), ties to the earlier shot. Its reference is the frame at its audio start (the
    official rule without cuts) moved, if that frame lies in an earlier shot, to its own
    shot's first frame after the cut (:data:`SHOT_START_OFFSET`). Without cuts every chunk
    gets the frame at its start, as before.
    """
    bounds = sorted({0, *[c for c in cuts if 0 < c]})
    shots = [(start, bounds[i + 1] if i + 1 < len(bounds) else None) for i, start in enumerate(bounds)]
    picks: list[ChunkReference] = []
    for k, start in enumerate(starts):
        first = start if k == 0 else start + motion_frames
        last = max(first + 1, min(start + frames, total_frames))
        overlaps = [max(0, min(last, last if end is None else end) - max(first, begin)) for begin, end in shots]
        shot = max(range(len(shots)), key=lambda i: (overlaps[i], -i))
        begin, end = shots[shot]
        frame = max(start, begin + SHOT_START_OFFSET if begin > 0 else begin)
        if end is not None:
            frame = min(frame, end - 1)
        picks.append(ChunkReference(frame, shot, new_shot=bool(picks) and shot != picks[-1].shot))
    return picks
