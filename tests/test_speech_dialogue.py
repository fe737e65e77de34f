"""Dialogue scripts: the official turn pattern and layout, and the request checks that run
before anything is synthesised (no weights needed)."""
from __future__ import annotations

import numpy as np
import pytest

from multitalk.api import GenerationRequest, InputError, SpeechRequest
from multitalk.api import Limits
from multitalk.generation.speech import validate_speech
from multitalk.utils.dialogue import Turn, has_turn_tags, lay_out_turns, parse_script


def test_the_official_example_script():
    script = "(s1) do you know multi-talk? (s2) yes, I know it, that's amazing! (s1) Me too."
    assert parse_script(script) == [Turn(1, "do you know multi-talk?"), Turn(2, "yes, I know it, that's amazing!"),
                                    Turn(1, "Me too.")]


def test_turns_keep_their_line_breaks_and_drop_surrounding_space():
    # The official pattern matches across lines; each turn is later split on line breaks.
    assert parse_script("\n(s1)  Hello!\nHow are you?\n\n(s2)Fine.\n") == [Turn(1, "Hello!\nHow are you?"),
                                                                       Turn(2, "Fine.")]
    assert has_turn_tags("x (s2) y") and not has_turn_tags("(s) plain (text)")


@pytest.mark.parametrize("script, words", [
    ("no tags", "no turn tags"),
    ("Intro. (s1) Hi.", "before the first"),
    ("(s1) Hi. (s0) Hello.", "(s0)"),
    ("(s1) Hi. (s12) Hello.", "(s12)"),
    ("(s1) (s2) Hello.", "turn 1 ((s1)) has nothing to say"),
    ("(s1) Hi. (s2) ?!", "turn 2 ((s2)) has nothing to say"),
])
def test_bad_scripts_name_the_script(script, words):
    with pytest.raises(InputError) as e:
        parse_script(script)
    assert e.value.field == "script" and words in e.value.message


def test_turn_layout_against_a_hand_built_expectation():
    turns = [(1, np.array([1, 2, 3], np.float32)), (2, np.array([4, 5], np.float32)), (1, np.array([6], np.float32))]
    s1, s2 = lay_out_turns(turns, speakers=2)
    np.testing.assert_array_equal(s1, [1, 2, 3, 0, 0, 6])
    np.testing.assert_array_equal(s2, [0, 0, 0, 4, 5, 0])
    (only,) = lay_out_turns([(1, np.ones(4, np.float32))], speakers=1)
    np.testing.assert_array_equal(only, np.ones(4))


def _check(speech: SpeechRequest, audio=(), limits=Limits()) -> InputError:
    with pytest.raises(InputError) as e:
        validate_speech(GenerationRequest(image=b"", audio=list(audio), speech=speech), limits)
    return e.value


def test_checks_before_synthesis():
    assert _check(SpeechRequest(["af_heart"], texts=["Hi."]), audio=[b"RIFF"]).field == "audio_1"
    assert _check(SpeechRequest(["af_heart", "am_adam"], texts=["Hi."])).field == "text_2"
    assert _check(SpeechRequest(["af_heart"], texts=["Hi.", "Hello."])).field == "voice_2"
    assert _check(SpeechRequest(["a", "b", "c"], script="(s1) Hi.")).field == "voice"
    assert _check(SpeechRequest(["af_heart"], texts=["Hi."], speed=0.1)).field == "speed"
    assert _check(SpeechRequest(["af_heart"], texts=["Hi."], speed=True)).field == "speed"
    err = _check(SpeechRequest(["af_heart"], script="(s1) Hi. (s2) Hello."))
    assert err.field == "voice_2" and "no voice is given for speaker 2" in err.message
    err = _check(SpeechRequest(["af_heart"], texts=["x" * 11]), limits=Limits(max_speech_chars=10))
    assert (err.field, err.status) == ("text_1", 413)
    validate_speech(GenerationRequest(image=b"", audio=[], speech=SpeechRequest(["af_heart", "am_adam"],
                                                                                script="(s1) Hi. (s2) Yo.")),
                    Limits())  # a valid one passes
