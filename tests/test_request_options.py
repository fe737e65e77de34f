"""Options a request leaves out: the clip fitted to the speech, presets, server defaults."""
from __future__ import annotations

import pytest
from fakes import wait_state
from inputs import err, face, png, tone, wav

from deployments.request_options import apply_layers
from deployments.service import ServiceSettings
from multitalk.api import GenerationRequest, InputError, Limits
from multitalk.generation.planning import fit_frames


def _req(**kw) -> GenerationRequest:
    return GenerationRequest(image=b"", audio=[b""], **kw)


@pytest.mark.parametrize("audio_frames, fitted", [
    (44, 41),    # the predecessor's sample speech (1.76 s): the longest 4n+1 clip below 44 frames
    (42, 41), (41, 37), (82, 81), (83, 81), (500, 81),  # never longer than the official 81
    (6, 5),      # the shortest clip the limits allow
])
def test_clip_is_fitted_to_the_speech(audio_frames, fitted):
    frames = fit_frames(_req(), audio_frames, Limits())
    assert frames == fitted and frames % 4 == 1 and frames < audio_frames


def test_fitting_below_the_minimum_is_refused_naming_the_audio():
    with pytest.raises(InputError) as e:
        fit_frames(_req(), 5, Limits())
    assert e.value.field == "audio" and "too short" in e.value.message
    with pytest.raises(InputError):
        fit_frames(_req(), 30, Limits(min_fit_frames=33))  # a configured minimum
    assert fit_frames(_req(), 40, Limits(min_fit_frames=33)) == 37


def test_explicit_frames_and_streaming_are_not_fitted():
    assert fit_frames(_req(frames=81), 44, Limits()) == 81  # refused later, as the official does
    assert fit_frames(_req(mode="streaming"), 44, Limits()) == 81


def test_layers_request_wins_then_preset_then_server_defaults():
    presets = {"fast": {"sampling": {"steps": 8, "text_scale": 1.0}, "size": "multitalk-256"}}
    defaults = {"size": "multitalk-128", "sampling": {"steps": 4, "seed": 7}, "prompt": "p"}
    out, applied = apply_layers({"preset": "fast", "prompt": "mine", "sampling": {"seed": 3}}, presets, defaults)
    assert out["prompt"] == "mine" and out["size"] == "multitalk-256"
    assert out["sampling"] == {"seed": 3, "steps": 8, "text_scale": 1.0}
    assert applied == {"sampling.steps": {"value": 8, "source": "preset fast"},
                       "sampling.text_scale": {"value": 1.0, "source": "preset fast"},
                       "size": {"value": "multitalk-256", "source": "preset fast"}}
    out, applied = apply_layers({}, presets, defaults)
    assert out == {"size": "multitalk-128", "sampling": {"steps": 4, "seed": 7}, "prompt": "p"}
    assert set(applied) == {"size", "sampling.steps", "sampling.seed", "prompt"}
    with pytest.raises(InputError) as e:
        apply_layers({"preset": "fastest"}, presets, defaults)
    assert e.value.field == "preset" and "fast" in e.value.message


def test_config_refuses_presets_and_defaults_that_set_unknown_fields():
    with pytest.raises(ValueError, match="stepz"):
        ServiceSettings(request_defaults={"stepz": 4})
    with pytest.raises(ValueError, match="presets.fast"):
        ServiceSettings(presets={"fast": {"image": "x.png"}})


@pytest.mark.slow
def test_predecessor_body_without_frames_is_fitted_and_reported(tmp_path, tiny_pipeline):
    """The predecessor's sample body (no frames, short speech) runs through the real driver
    on tiny weights; the job reports the fitted clip and the server defaults it ran with."""
    from fastapi.testclient import TestClient

    from deployments.routes import create_app
    from deployments.service import JobService
    from deployments.storage import LocalStore

    store = LocalStore(tmp_path / "store")
    store.put("short.wav", wav(tone(1.76)))  # 44 frames of speech, like multi1/1.wav
    store.put("face.png", png(face()))
    settings = ServiceSettings(persist_interval_s=0.05, models_root=str(tmp_path),
                               request_defaults={"size": "multitalk-64", "sampling": {"steps": 2}},
                               presets={"fast": {"sampling": {"steps": 1}}})
    service = JobService(store=store, stages=tiny_pipeline.stages, settings=settings)
    with TestClient(create_app(service)) as client:
        r = client.post("/run", json={"input": {"action": "generate", "audio_1": "short.wav",
                                                "condition_image": "face.png", "output_format": "s3"}})
        assert r.status_code == 200, r.text
        st = wait_state(client, r.json()["id"], timeout=300)
        assert st["state"] == "COMPLETED", st
        assert st["options_applied"]["size"] == {"value": "multitalk-64", "source": "server default"}
        assert st["options_applied"]["sampling.steps"] == {"value": 2, "source": "server default"}
        assert st["options_applied"]["frames"] == {"value": 41, "source": "fitted to the audio"}
        assert st["result"]["frames"] == 41 and st["request"]["frames"] is None
        # a preset, and a field the request sets itself
        r = client.post("/v1/jobs", json={"image": "face.png", "audio": ["short.wav"], "preset": "fast",
                                          "size": "multitalk-32"})
        st = wait_state(client, r.json()["id"], timeout=300)
        assert st["state"] == "COMPLETED", st
        assert st["request"]["sampling"]["steps"] == 1 and st["request"]["size"] == "multitalk-32"
        assert st["options_applied"]["sampling.steps"]["source"] == "preset fast"
        assert "size" not in st["options_applied"]
        err(client.post("/v1/jobs", json={"image": "face.png", "audio": ["short.wav"], "preset": "slowest"}),
            422, "preset", "fast")
        err(client.post("/run", json={"input": {"action": "generate", "audio_1": "short.wav",
                                                "condition_image": "face.png", "preset": "x"}}), 422, "preset")
        # speech too short for any clip: refused at submit, naming the audio
        store.put("blip.wav", wav(tone(0.16)))
        err(client.post("/v1/jobs", json={"image": "face.png", "audio": ["blip.wav"]}), 422, "audio", "too short")
