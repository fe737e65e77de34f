"""Text to speech for jobs that give text instead of audio: checks, synthesis through the
``speech`` stage, and the tracks handed on as the job's audio."""
from __future__ import annotations

import io
import re
import time
from typing import TYPE_CHECKING

import numpy as np

from ..api import GenerationRequest, InputError, Limits, Progress, ProgressCallback
from .planning import SPEECH_RATE
from .protocol import Stages, resolve

if TYPE_CHECKING:
    from .loop import Timings

_VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
MIN_SPEED, MAX_SPEED = 0.5, 2.0


def validate_speech(request: GenerationRequest, limits: Limits) -> None:
    """Check a text-to-speech request before anything is synthesised (:class:`InputError`
    naming the field). Whether each voice exists is checked by the speech stage."""
    from ..utils.dialogue import parse_script

    speech = request.speech
    if request.audio:
        raise InputError("audio_1", "give either audio or text to speak, not both")
    if not isinstance(speech.voices, list) or not speech.voices:
        raise InputError("voice_1", "a voice is required (e.g. af_heart)")
    if len(speech.voices) > 2:
        raise InputError("voice", f"at most 2 speakers are supported, got {len(speech.voices)} voices")
    for i, voice in enumerate(speech.voices, start=1):
        if not isinstance(voice, str) or not _VOICE_NAME.fullmatch(voice):
            raise InputError(f"voice_{i}", f"not a voice name: {voice!r}")
    if isinstance(speech.speed, bool) or not isinstance(speech.speed, (int, float)) \
            or not MIN_SPEED <= speech.speed <= MAX_SPEED:
        raise InputError("speed", f"must be between {MIN_SPEED} and {MAX_SPEED}, got {speech.speed!r}")
    if (speech.texts is None) == (speech.script is None):
        raise InputError("text_1", "give either one text per speaker or one script with (s1)/(s2) turns")
    texts = [speech.script] if speech.script is not None else list(speech.texts)
    fields = ["script"] if speech.script is not None else [f"text_{i}" for i in range(1, len(texts) + 1)]
    if speech.texts is not None and len(texts) != len(speech.voices):
        raise InputError(f"text_{len(texts) + 1}" if len(texts) < len(speech.voices) else f"voice_{len(texts)}",
                         f"{len(texts)} text(s) for {len(speech.voices)} voice(s): give one text per voice")
    for text, name in zip(texts, fields):
        if not isinstance(text, str) or not any(ch.isalnum() for ch in text):
            raise InputError(name, "is empty: nothing to speak")
    chars = sum(len(t) for t in texts)
    if chars > limits.max_speech_chars:
        raise InputError(fields[0], f"is {chars} characters; the limit is {limits.max_speech_chars}", 413)
    if speech.script is not None:
        spoken = {turn.speaker for turn in parse_script(speech.script)}
        for number in sorted(spoken):
            if number > len(speech.voices):
                raise InputError(f"voice_{number}", f"the script has (s{number}) turns but no voice is given "
                                                    f"for speaker {number}")
        if len(speech.voices) == 2 and len(spoken) == 1:
            raise InputError("script", "has turns of one speaker only; give one voice for a one-speaker video")


async def synthesize_speech(request: GenerationRequest, stages: Stages, limits: Limits,
                            emit: ProgressCallback, timer: "Timings") -> GenerationRequest:
    """Text to speech for a job that gives text: the synthesised 16 kHz tracks become the
    job's audio (float WAV, lossless), so they take the path uploaded speech takes (loudness
    normalisation, wav2vec2, the soundtrack). A script's tracks are already laid out turn by
    turn, so they are combined ``para``; per-speaker texts by the job's ``audio_type``."""
    speech = request.speech
    validate_speech(request, limits)
    emit(Progress("speech", message="text to speech"))
    t0 = time.perf_counter()
    tracks = [np.asarray(t, dtype=np.float32) for t in await resolve(stages.speech_synthesize(speech))]
    timer.add("speech", time.perf_counter() - t0)
    audio_type = "para" if speech.script is not None else request.audio_type
    lengths = [len(t) for t in tracks]
    seconds = (sum(lengths) if audio_type == "add" else max(lengths)) / SPEECH_RATE
    if seconds > limits.max_audio_seconds:
        raise InputError(speech.text_field, f"the synthesised speech lasts {seconds:.1f} s; the limit is "
                                            f"{limits.max_audio_seconds:g} s", 413)
    return request.replace(audio=[wav_bytes(t, "FLOAT") for t in tracks], audio_type=audio_type)


def wav_bytes(speech: np.ndarray, subtype: str = "PCM_16") -> bytes:
    """Mono 16 kHz WAV file bytes."""
    import soundfile

    samples = np.asarray(speech, dtype=np.float32)
    if subtype == "PCM_16":
        samples = np.clip(samples, -1.0, 1.0)
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, SPEECH_RATE, subtype=subtype, format="WAV")
    return buffer.getvalue()
