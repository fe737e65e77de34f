"""Text to speech (Kokoro-82M): loading, parity with the kokoro package, the official turn
layout, the request errors, discovery, and text → video end to end (tiny weights)."""
from __future__ import annotations

import io
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from inputs import mp4_audio
import torch

from multitalk.api import GenerationRequest, InputError, SamplingOptions, SpeechRequest
from multitalk.utils.dialogue import speech_from_tts_audio
from multitalk.checkpoints.discovery import find_checkpoints
from multitalk.modules import speech_kokoro as sk
from multitalk.modules.loading import CheckpointError

# Phoneme strings as misaki's espeak mapping writes them (the official example's words).
PHONEMES = ["dˈu ju nˈO mˈʌltItˈɔk?", "jˈɛs, I nˈO ɪt, ðæts əmˈAzɪŋ!", "mˈi tˈu."]


@pytest.fixture(scope="session")
def speech_root(embedded_cache) -> Path:
    """A tiny MultiTalk set with the Kokoro-82M folder: the embedded default's (seed 0,
    written once per session, shared with the served tests)."""
    from multitalk.checkpoints.tiny import ensure_tiny_weights

    return Path(ensure_tiny_weights(embedded_cache))


@pytest.fixture(scope="session")
def kokoro_dir(speech_root) -> Path:
    return speech_root / "Kokoro-82M"


@pytest.fixture(scope="session")
def speech_pipeline(speech_root):
    from multitalk.pipeline import MultiTalkPipeline

    return MultiTalkPipeline.from_pretrained(str(speech_root))


@pytest.fixture(scope="session")
def stage(speech_pipeline):
    return speech_pipeline.stages.speech


# --------------------------------------------------------------------------- model and loading
def test_tiny_folder_has_the_official_layout(kokoro_dir):
    assert sorted(p.name for p in kokoro_dir.iterdir()) == ["config.json", "kokoro-v1_0.pth", "voices"]
    assert sk.voice_names(kokoro_dir) == ["af_bella", "af_heart", "am_adam"]
    ckpt = torch.load(kokoro_dir / "kokoro-v1_0.pth", map_location="cpu", weights_only=True)
    assert sorted(ckpt) == sorted(sk.COMPONENTS)
    assert all(k.startswith("module.") for state in ckpt.values() for k in state)
    assert "module.generator.ups.0.weight_v" in ckpt["decoder"]  # weight norm as weight_g/weight_v
    with torch.device("meta"):
        model = sk.build_model(sk.TINY_CONFIG)
    identity = sk._identity_norm_keys(model)  # not in the official file
    assert "decoder.encode.norm1.norm.weight" in identity and all(k.endswith((".norm.weight", ".norm.bias"))
                                                                   for k in identity)
    assert sum(len(s) for s in ckpt.values()) == len(model.state_dict()) - len(identity)
    assert tuple(torch.load(kokoro_dir / "voices" / "af_heart.pt", weights_only=True).shape) == (510, 1, 256)


def test_loader_expects_the_official_files_tensors():
    """At the real config the official file holds 548 tensors (81,763,410 parameters): the
    model's 688 less the 140 InstanceNorm affine tensors of its 70 AdaIN1d."""
    real = dict(sk.TINY_CONFIG, max_dur=50, n_layer=3, text_encoder_kernel_size=5,
                plbert=dict(hidden_size=768, num_attention_heads=12, intermediate_size=2048,
                            max_position_embeddings=512, num_hidden_layers=12, dropout=0.1),
                istftnet=dict(sk.TINY_CONFIG["istftnet"], resblock_kernel_sizes=[3, 7, 11],
                              resblock_dilation_sizes=[[1, 3, 5]] * 3))
    with torch.device("meta"):
        model = sk.build_model(real)
    state = sk._official_state(model)
    assert sum(len(s) for s in state.values()) == 548 and len(model.state_dict()) == 688
    assert sum(t.numel() for s in state.values() for t in s.values()) == 81_763_410


def _rewrite(kokoro_dir: Path, tmp_path: Path, edit) -> Path:
    import shutil

    folder = tmp_path / "Kokoro-82M"
    shutil.copytree(kokoro_dir, folder)
    ckpt = torch.load(folder / "kokoro-v1_0.pth", map_location="cpu", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, folder / "kokoro-v1_0.pth")
    return folder


def test_loading_is_strict(kokoro_dir, tmp_path):
    def spoil(ckpt):
        del ckpt["decoder"]["module.generator.conv_post.bias"]
        ckpt["predictor"]["module.extra.weight"] = torch.zeros(3)
        ckpt["bert_encoder"]["module.weight"] = ckpt["bert_encoder"]["module.weight"][:, :5]

    with pytest.raises(CheckpointError) as e:  # every problem at once, each named
        sk.load_model(_rewrite(kokoro_dir, tmp_path / "a", spoil))
    message = str(e.value)
    assert "missing key in checkpoint: for model parameter 'decoder.generator.conv_post.bias'" in message
    assert "unexpected key in checkpoint: 'predictor/module.extra.weight'" in message
    assert "shape mismatch for 'bert_encoder/module.weight'" in message

    with pytest.raises(CheckpointError, match="lacks the Kokoro component.s. text_encoder"):
        sk.load_model(_rewrite(kokoro_dir, tmp_path / "b", lambda c: c.pop("text_encoder")))

    bad_voice = tmp_path / "v.pt"
    torch.save(torch.zeros(510, 1, 128), bad_voice)
    with pytest.raises(CheckpointError, match=r"v.pt.*\(510, 1, 128\)"):
        sk.load_voice(bad_voice)


def test_samples_equal_the_kokoro_pipeline(stage, kokoro_dir):
    """Our stage vs the kokoro package's own KModel loader + KPipeline on the same weights,
    voice and phonemes (the pipeline's noise seeded as ours is)."""
    from kokoro import KModel, KPipeline

    own = KModel(repo_id=str(kokoro_dir), config=str(kokoro_dir / "config.json"),
                 model=str(kokoro_dir / "kokoro-v1_0.pth")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # A "loud" pipeline with a non-English code builds espeak G2P only (no spaCy model);
        # generate_from_tokens takes phonemes as they are.
        pipeline = KPipeline(lang_code="e", repo_id=str(kokoro_dir), model=own)
    worst = 0.0
    for phonemes, voice, speed in [(PHONEMES[0], "af_heart", 1.0), (PHONEMES[2], "am_adam", 1.3)]:
        ours = stage.tts.synthesize_phonemes(phonemes, voice, speed)
        torch.manual_seed(stage.tts.seed)
        (result,) = pipeline.generate_from_tokens(phonemes, voice=str(kokoro_dir / "voices" / f"{voice}.pt"),
                                                   speed=speed)
        assert result.audio.shape == ours.shape and ours.shape[0] % 600 == 0
        worst = max(worst, float((result.audio - ours).abs().max()))
    assert worst == 0.0, worst


def test_synthesis_is_deterministic_and_voices_differ(stage):
    a = stage.tts.synthesize_phonemes(PHONEMES[2], "af_heart")
    assert torch.equal(a, stage.tts.synthesize_phonemes(PHONEMES[2], "af_heart"))
    assert not torch.equal(a, stage.tts.synthesize_phonemes(PHONEMES[2], "am_adam")[: a.shape[0]])


def test_text_is_split_like_the_official_pipeline(stage):
    pieces = stage.tts.phonemize("Do you know multi-talk?\n\nYes, I know it!\n")
    assert len(pieces) == 2 and all(set(p) <= set(sk.VOCAB_V1) for p in pieces)
    long = " ".join(["This sentence is here to make a very long text."] * 30)
    pieces = stage.tts.phonemize(long)
    assert len(pieces) > 1 and all(len(p) <= sk.MAX_PHONEMES for p in pieces)
    assert all(p.endswith(".") for p in pieces)  # cut at sentence ends


def test_split_phonemes_prefers_sentence_ends():
    text = ("ab. " * 100) + "cd, " * 100
    pieces = sk.split_phonemes(text, limit=50)
    assert all(len(p) <= 50 for p in pieces) and "".join(pieces).replace(" ", "") == text.replace(" ", "")
    assert pieces[0].endswith(".")
    assert sk.split_phonemes("x" * 120, limit=50) == ["x" * 50, "x" * 50, "x" * 20]


# --------------------------------------------------------------------------- the official turn layout
def test_script_gives_the_official_turn_layout(stage):
    """Hand-built: each turn synthesised with its speaker's voice at 24 kHz, silence of the
    same length on the other track, tracks concatenated, then resampled to 16 kHz."""
    import librosa

    script = "(s1) Do you know it? (s2) Yes!\n(s1) Me too."
    tracks = stage.synthesize(SpeechRequest(voices=["af_heart", "am_adam"], script=script))
    turns = [("af_heart", "Do you know it?"), ("am_adam", "Yes!"), ("af_heart", "Me too.")]
    audio = [stage.tts.synthesize(text, voice) for voice, text in turns]
    zeros = [np.zeros_like(a) for a in audio]
    s1 = np.concatenate([audio[0], zeros[1], audio[2]])
    s2 = np.concatenate([zeros[0], audio[1], zeros[2]])
    expected = [librosa.resample(t, orig_sr=24000, target_sr=16000, res_type="soxr_hq") for t in (s1, s2)]
    assert len(tracks) == 2 and len(tracks[0]) == len(tracks[1]) == len(expected[0])
    for got, want in zip(tracks, expected):
        np.testing.assert_array_equal(got, want.astype(np.float32))
    # The turns alternate: speaker 2 is silent (up to resampling ringing) during turn 1.
    first = int(len(audio[0]) * 2 / 3) - 200
    assert np.abs(tracks[1][:first]).max() < 1e-3 < np.abs(tracks[0][:first]).max()


def test_the_stage_checks_voices_itself(stage):
    with pytest.raises(InputError) as e:  # called directly, without the driver's checks
        stage.synthesize(SpeechRequest(voices=["af_heart"], script="(s1) Hi. (s2) Hello."))
    assert e.value.field == "voice_2"
    with pytest.raises(InputError, match="unknown voice 'zz'; available: af_bella, af_heart, am_adam"):
        stage.synthesize(SpeechRequest(voices=["zz"], texts=["Hi."]))


def test_per_speaker_texts_are_separate_tracks(stage):
    tracks = stage.synthesize(SpeechRequest(voices=["af_heart", "am_adam"], texts=["Hello there.", "Hi."]))
    assert len(tracks) == 2 and len(tracks[0]) != len(tracks[1]) and all(t.dtype == np.float32 for t in tracks)


def test_official_tts_audio_maps_onto_a_speech_request():
    multi = {"text": "(s1) do you know multi-talk? (s2) yes, I know it, that's amazing! (s1) Me too.",
             "human1_voice": "weights/Kokoro-82M/voices/af_heart.pt",
             "human2_voice": "weights/Kokoro-82M/voices/am_adam.pt"}
    assert speech_from_tts_audio(multi) == SpeechRequest(voices=["af_heart", "am_adam"], script=multi["text"])
    single = {"text": "Welcome to multi-talk.", "human1_voice": "weights/Kokoro-82M/voices/af_heart.pt"}
    assert speech_from_tts_audio(single) == SpeechRequest(voices=["af_heart"], texts=["Welcome to multi-talk."])
    assert speech_from_tts_audio({"text": "(s1) Hi.", "human1_voice": "af_bella", "speed": 1.2}).script == "(s1) Hi."
    for bad, field in [({"human1_voice": "af_heart"}, "tts_audio.text"), ({"text": "hi"}, "tts_audio.human1_voice"),
                       ({"text": "hi", "human1_voice": "a", "voice": "b"}, "tts_audio")]:
        with pytest.raises(InputError) as e:
            speech_from_tts_audio(bad)
        assert e.value.field == field


# --------------------------------------------------------------------------- errors
def _speech_request(fixtures_dir, speech: SpeechRequest, **kw) -> GenerationRequest:
    args = dict(image=(fixtures_dir / "multi1" / "multi1.png").read_bytes(), audio=[], size="multitalk-128",
                frames=17, sampling=SamplingOptions(steps=1), color_correction=0.0, speech=speech)
    args.update(kw)
    return GenerationRequest(**args)


def _error(pipeline, request) -> InputError:
    with pytest.raises(InputError) as e:
        pipeline.generate(request)
    return e.value


def test_request_errors_name_the_field(speech_pipeline, fixtures_dir):
    cases = [
        (SpeechRequest(voices=["af_nobody"], texts=["Hello."]), "voice_1", "af_bella, af_heart, am_adam"),
        (SpeechRequest(voices=["af_heart", "am_nobody"], script="(s1) Hi. (s2) Hello."), "voice_2", "available"),
        (SpeechRequest(voices=["af_heart"], texts=["   "]), "text_1", "empty"),
        (SpeechRequest(voices=["af_heart", "am_adam"], texts=["Hello.", "..."]), "text_2", "empty"),
        (SpeechRequest(voices=["af_heart"], script="(s1) Hi. (s2) Hello."), "voice_2", "(s2)"),
        (SpeechRequest(voices=["af_heart", "am_adam"], script="(s1) Hi. (s3) Hello."), "script", "(s3)"),
        (SpeechRequest(voices=["af_heart", "am_adam"], script="(s1) Hi. (s2)"), "script", "nothing to say"),
        (SpeechRequest(voices=["af_heart", "am_adam"], script="Hi. (s2) Hello."), "script", "before the first"),
        (SpeechRequest(voices=["af_heart"], script="no tags here"), "script", "no turn tags"),
        (SpeechRequest(voices=["af_heart", "am_adam"], script="(s1) Hi. (s1) Hello."), "script", "one speaker"),
        (SpeechRequest(voices=["af_heart"], texts=["Hello."], speed=3.0), "speed", "between"),
        (SpeechRequest(voices=[], texts=["Hello."]), "voice_1", "required"),
        (SpeechRequest(voices=["../../etc/passwd"], texts=["Hello."]), "voice_1", "not a voice name"),
        (SpeechRequest(voices=["af_heart"], texts=["Hello."], script="(s1) Hi."), "text_1", "either"),
    ]
    for speech, field, words in cases:
        err = _error(speech_pipeline, _speech_request(fixtures_dir, speech))
        assert err.field == field and words in err.message and 400 <= err.status < 500, (speech, err)
    both = _speech_request(fixtures_dir, SpeechRequest(voices=["af_heart"], texts=["Hello."]), audio=[b"x"])
    assert _error(speech_pipeline, both).field == "audio_1"


def test_text_over_the_caps_is_refused(speech_pipeline, fixtures_dir):
    from multitalk.api import Limits
    from multitalk.pipeline import MultiTalkPipeline

    capped = MultiTalkPipeline(speech_pipeline.stages, speech_pipeline.checkpoints,
                               Limits(max_speech_chars=20, max_audio_seconds=0.2))
    err = _error(capped, _speech_request(fixtures_dir, SpeechRequest(voices=["af_heart"], texts=["x" * 21])))
    assert (err.field, err.status) == ("text_1", 413) and "21 characters; the limit is 20" in err.message
    err = _error(capped, _speech_request(fixtures_dir, SpeechRequest(voices=["af_heart", "am_adam"],
                                                                     script="(s1) " + "y" * 30 + " (s2) z")))
    assert (err.field, err.status) == ("script", 413)
    # Under the character cap but longer than 0.2 s once spoken.
    err = _error(capped, _speech_request(fixtures_dir, SpeechRequest(voices=["af_heart"], texts=["Hello there."])))
    assert (err.field, err.status) == ("text_1", 413) and "the synthesised speech lasts" in err.message


def test_text_without_kokoro_weights_is_refused(tiny_pipeline, fixtures_dir):
    assert tiny_pipeline.voices == [] and not tiny_pipeline.checkpoints.components["speech"].found
    err = _error(tiny_pipeline, _speech_request(fixtures_dir, SpeechRequest(voices=["af_heart"], texts=["Hi."])))
    assert err.field == "text_1" and "Kokoro-82M" in err.message and err.status == 422
    err = _error(tiny_pipeline, _speech_request(fixtures_dir, SpeechRequest(voices=["af_heart", "am_adam"],
                                                                            script="(s1) Hi. (s2) Hello.")))
    assert err.field == "script" and "Kokoro-82M" in err.message


def test_input_errors_survive_pickling():
    err = pickle.loads(pickle.dumps(InputError("voice_1", "unknown voice 'x'", 422)))
    assert (err.field, err.message, err.status, str(err)) == ("voice_1", "unknown voice 'x'", 422,
                                                              "voice_1: unknown voice 'x'")


# --------------------------------------------------------------------------- discovery
def test_check_reports_the_kokoro_folder(speech_root, tiny_official, capsys):
    from multitalk.cli import main

    assert main(["check", str(speech_root)]) == 0
    speech = json.loads(capsys.readouterr().out)["components"]["speech"]
    assert speech["found"] and speech["path"].endswith("Kokoro-82M") and speech["layout"] == "official"
    assert speech["note"] == "3 voices: af_bella, af_heart, am_adam" and speech["bytes"] > 0
    absent = find_checkpoints(tiny_official)
    assert absent.kind == "multitalk" and not absent.components["speech"].found
    assert "text to speech is unavailable" in absent.components["speech"].note
    from deployments.volume import model_check

    assert model_check(str(speech_root))["components"]["speech"]["found"]


def test_check_says_what_a_kokoro_folder_lacks(kokoro_dir, tmp_path):
    import shutil

    folder = tmp_path / "models" / "Kokoro-82M"
    shutil.copytree(kokoro_dir, folder)
    (folder / "kokoro-v1_0.pth").unlink()
    comp = find_checkpoints(tmp_path / "models").components["speech"]
    assert not comp.found and "kokoro-v1_0.pth" in comp.note
    with pytest.raises(FileNotFoundError, match="speech"):
        from multitalk.stages import SpeechStage

        SpeechStage.from_pretrained(str(tmp_path / "models"))


def test_cli_takes_text_and_script():
    from multitalk.cli import _audio_or_speech, build_parser

    base = ["generate", "--models", "m", "--image", "i.png", "--out", "o.mp4"]
    args = build_parser().parse_args(base + ["--script", "(s1) Hi. (s2) Hello.", "--voice", "af_heart",
                                             "--voice2", "am_adam"])
    assert _audio_or_speech(args) == ([], SpeechRequest(voices=["af_heart", "am_adam"], script="(s1) Hi. (s2) Hello."))
    args = build_parser().parse_args(base + ["--text", "Hi.", "--voice", "af_heart", "--speed", "1.1"])
    assert _audio_or_speech(args) == ([], SpeechRequest(voices=["af_heart"], texts=["Hi."], speed=1.1))
    with pytest.raises(SystemExit):
        _audio_or_speech(build_parser().parse_args(base + ["--text", "Hi."]))


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_script_to_video_end_to_end(speech_pipeline, fixtures_dir):
    """Two-speaker script → mp4 (streaming): its soundtrack is the synthesised dialogue
    (loudness-normalised, as uploaded speech is) and the video lasts as long as it does."""
    import soundfile

    from multitalk.utils.audio import loudness_normalize
    from multitalk.utils.video import probe_mp4

    script = "(s1) Hi there! (s2) Hello, friend. (s1) Bye."
    speech = SpeechRequest(voices=["af_heart", "am_adam"], script=script)
    request = _speech_request(fixtures_dir, speech, mode="streaming", motion_frames=5)
    events = []
    result = speech_pipeline.generate(request, progress=events.append)
    assert events[0].stage == "speech" and "speech" in result.timings

    tracks = speech_pipeline.stages.speech.synthesize(speech)
    dialogue = sum(loudness_normalize(t.astype(np.float64)) for t in tracks).astype(np.float32)
    wav, rate = soundfile.read(io.BytesIO(result.speech_wav), dtype="float32")
    assert rate == 16000 and len(wav) == len(dialogue)
    assert np.abs(wav - np.clip(dialogue, -1, 1)).max() < 1e-4  # 16-bit PCM

    info = probe_mp4(result.video)
    seconds = len(dialogue) / 16000
    assert result.chunks > 1 and info["num_frames"] == result.num_frames
    assert info["num_frames"] / 25 == pytest.approx(seconds, abs=4 / 25)  # official: ends 3 frames early
    assert info["audio_duration"] == pytest.approx(info["num_frames"] / 25, abs=0.05)
    track = mp4_audio(result.video)
    n = min(len(track), len(dialogue))
    assert n > 0.9 * result.num_frames / 25 * 16000
    assert np.corrcoef(track[:n], dialogue[:n])[0, 1] > 0.9
