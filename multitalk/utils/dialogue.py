"""Two-speaker dialogue scripts: turn parsing and the official turn layout.

A script tags each turn with its speaker, ``(s1) Hello! (s2) Hi, how are you? (s1) Fine.``
(the official ``tts_audio.text``). The official ``process_tts_multi`` finds the turns with
``r'\\(s(\\d+)\\)\\s*(.*?)(?=\\s*\\(s\\d+\\)|$)'`` (dot matching newlines), synthesises each
turn with its speaker's voice and gives the other speaker silence of the same length, so
the two tracks alternate and have equal lengths; their sum is the soundtrack.

Where the official code silently drops input (text before the first tag, tags other than
``(s1)``/``(s2)``, empty turns) a :class:`~multitalk.api.InputError` names the script.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from multitalk.api import InputError

# The official turn pattern (generate_multitalk.py, process_tts_multi).
TURN_PATTERN = re.compile(r"\(s(\d+)\)\s*(.*?)(?=\s*\(s\d+\)|$)", re.DOTALL)
TAG_PATTERN = re.compile(r"\(s(\d+)\)")
MAX_SPEAKERS = 2


@dataclass(frozen=True)
class Turn:
    """One turn of a script: ``speaker`` 1 or 2 and what they say."""

    speaker: int
    text: str


def has_turn_tags(text: str) -> bool:
    """Whether ``text`` carries ``(sN)`` turn tags."""
    return TAG_PATTERN.search(text) is not None


def parse_script(script: str, field: str = "script") -> list[Turn]:
    """The turns of ``script`` in order (official pattern).

    Raises :class:`InputError` (``field``) when the script has no tags, text before its
    first tag, a tag other than ``(s1)``/``(s2)``, or a turn with nothing to say.
    """
    first = TAG_PATTERN.search(script)
    if first is None:
        raise InputError(field, "no turn tags: mark each turn with (s1) or (s2), e.g. '(s1) Hello! (s2) Hi!'")
    if script[: first.start()].strip():
        raise InputError(field, f"text before the first turn tag: {script[: first.start()].strip()[:40]!r}")
    turns = []
    for index, (speaker, text) in enumerate(TURN_PATTERN.findall(script), start=1):
        number = int(speaker)
        if not 1 <= number <= MAX_SPEAKERS:
            raise InputError(field, f"turn {index} is tagged (s{speaker}); only (s1) and (s2) are supported")
        if not any(ch.isalnum() for ch in text):
            raise InputError(field, f"turn {index} ((s{number})) has nothing to say")
        turns.append(Turn(number, text.strip()))
    return turns


def lay_out_turns(spoken: Sequence[tuple[int, np.ndarray]], speakers: int) -> list[np.ndarray]:
    """Per-speaker tracks of a dialogue (official layout).

    Args:
        spoken: per turn, in order, ``(speaker, audio [N_i])`` (speaker 1-based).
        speakers: number of tracks to build.
    Returns:
        ``speakers`` float32 tracks of length ``sum(N_i)``: turn ``i`` occupies samples
        ``[sum(N_<i), sum(N_<=i))`` of its speaker's track and is silence on the others.
    """
    total = sum(len(audio) for _, audio in spoken)
    tracks = [np.zeros(total, dtype=np.float32) for _ in range(speakers)]
    start = 0
    for speaker, audio in spoken:
        tracks[speaker - 1][start : start + len(audio)] = audio
        start += len(audio)
    return tracks
