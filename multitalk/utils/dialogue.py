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

from multitalk.api import InputError, SpeechRequest

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


# ``tts_audio`` keys of the official examples for the fields :class:`SpeechRequest` errors name.
TTS_AUDIO_FIELDS = {"script": "tts_audio.text", "text_1": "tts_audio.text", "voice_1": "tts_audio.human1_voice",
                    "voice_2": "tts_audio.human2_voice", "speed": "tts_audio.speed"}


def speech_from_tts_audio(tts_audio: dict) -> SpeechRequest:
    """The official examples' ``tts_audio`` object → :class:`SpeechRequest`.

    ``{"text": ..., "human1_voice": ..., "human2_voice": ...}``; voices by name
    (``af_heart``) or as the official paths (``weights/Kokoro-82M/voices/af_heart.pt``: only
    the name is used, voices always come from the models root). With ``human2_voice`` the
    text is a two-speaker script (official ``process_tts_multi``); without it the text is
    spoken by speaker 1 (``process_tts_single``), as a script if it carries turn tags.
    An optional ``speed`` (not in the official object) sets the speaking rate.
    """
    if not isinstance(tts_audio, dict):
        raise InputError("tts_audio", "must be an object {text, human1_voice[, human2_voice]}")
    unknown = sorted(set(tts_audio) - {"text", "human1_voice", "human2_voice", "speed"})
    if unknown:
        raise InputError("tts_audio", f"unknown key(s) {', '.join(unknown)}")
    text = tts_audio.get("text")
    if not isinstance(text, str):
        raise InputError("tts_audio.text", "a string is required")
    voices = [_voice_name(tts_audio.get("human1_voice"), "tts_audio.human1_voice")]
    if tts_audio.get("human2_voice") is not None:
        voices.append(_voice_name(tts_audio["human2_voice"], "tts_audio.human2_voice"))
    speed = tts_audio.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, (int, float)):
        raise InputError("tts_audio.speed", "must be a number")
    if len(voices) == 2 or has_turn_tags(text):
        return SpeechRequest(voices=voices, script=text, speed=float(speed))
    return SpeechRequest(voices=voices, texts=[text], speed=float(speed))


def _voice_name(value, field_name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(field_name, "a voice name is required, e.g. af_heart")
    name = value.strip().replace("\\", "/").rsplit("/", 1)[-1]
    return name[: -len(".pt")] if name.endswith(".pt") else name
