"""The real application (``pipeline_graph.build_app``, library stages on tiny random weights)
served by Ray Serve with an S3 store over HTTP (moto's threaded server).

One Ray start, one moto server and one ``serve.run`` for the module. Covers: the RunPod
contract (``/run`` + ``/status``, ``/runsync`` actions) writing the mp4 to the bucket, the
native job API and its video route, a Python handle used from a second Serve application,
and an ingress replica killed mid-job (records survive; the unfinished job is re-run).

Ray workers import this module by name (``test_serve_s3``, for ``OtherApp``): the fixture
puts ``tests/`` and the repository root on their PYTHONPATH.
"""
from __future__ import annotations

import time

import pytest
import yaml
from ray import serve

from conftest import free_port, moto_bucket, patched_environ, source_pythonpath

from deployments.launcher import default_config_path

pytestmark = [pytest.mark.serve, pytest.mark.slow, pytest.mark.fixtures, pytest.mark.timeout(600)]

BUCKET = "multitalk-test"
FRAMES = 17
# Small options shared by every job: each job takes seconds on a CPU.
SMALL = {"frames": FRAMES, "size": "multitalk-128", "sample_steps": 2, "seed": 1}
NATIVE_SMALL = {"frames": FRAMES, "size": "multitalk-128", "sampling": {"steps": 2, "seed": 1}}
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")


# --- the second application (instantiated in its own replica) ----------------------------


@serve.deployment(ray_actor_options={"num_cpus": 0.05})
class OtherApp:
    """Another team's app: runs a MultiTalk job through a Python handle, answers its status."""

    async def __call__(self, request):
        body = await request.json()
        handle = serve.get_app_handle("multitalk")
        status = await handle.generate.remote(body, timeout=240)
        return status.model_dump(mode="json")


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_serve(tmp_path_factory, fixtures_dir, embedded_cache):
    import ray
    from pipeline_graph import build_app

    tmp = tmp_path_factory.mktemp("serve-s3")
    env = {"PYTHONPATH": source_pythonpath(), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    # Environment before ray.init: the workers inherit it.
    with patched_environ(env), moto_bucket(BUCKET, fixtures_dir) as (endpoint, s3):
        port = free_port()
        ray.init(num_cpus=4, include_dashboard=False, namespace="serve-s3", log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # The embedded CPU default's own args (its request defaults included), with this
        # test's store, cache and a faster progress interval.
        args = yaml.safe_load(default_config_path().read_text())["applications"][0]["args"]
        args.update({"cache_dir": embedded_cache,
                     "store": {"bucket": BUCKET, "region": "us-east-1", "endpoint_url": endpoint}})
        args["ingress"].update({"persist_interval_s": 0.2, "max_concurrent_jobs": 1,
                                "local_output_dir": str(tmp / "out")})
        app = build_app(args)
        serve.run(app, name="multitalk", route_prefix="/")
        s3.put_object(Bucket=BUCKET, Key="single.wav", Body=(fixtures_dir / "single" / "1.wav").read_bytes())
        s3.put_object(Bucket=BUCKET, Key="ref_video.mp4", Body=(fixtures_dir / "video" / "ref_video.mp4").read_bytes())
        try:
            yield {"url": f"http://127.0.0.1:{port}", "s3": s3, "tmp": tmp, "jobs": [], "args": args}
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()


def _poll(url: str, path: str, key: str, timeout: float = 300, states=TERMINAL) -> dict:
    import requests

    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"{url}{path}", timeout=10)
            if r.status_code == 200:
                body = r.json()
                if body[key] in states:
                    return body
        except requests.RequestException:
            pass  # the ingress may be restarting
        time.sleep(0.2)
    raise AssertionError(f"{path} did not reach {states}: {body}")


def _check_mp4(data: bytes) -> dict:
    from multitalk.utils.video import probe_mp4

    info = probe_mp4(data)
    assert info["video_codec"] == "h264", info
    assert abs(info["fps"] - 25) < 1e-6, info
    assert info["num_frames"] == FRAMES, info
    assert info["audio_codec"] == "aac", info
    return info


# --- tests -------------------------------------------------------------------------------


def test_runpod_contract_s3(s3_serve):
    import requests

    url, s3 = s3_serve["url"], s3_serve["s3"]
    body = {"input": {"action": "generate", "audio_1": "1.wav", "condition_image": "multi1.png",
                      "prompt": "two people talking", "output_format": "s3", **SMALL}}
    r = requests.post(f"{url}/run", json=body, timeout=60)
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    s3_serve["jobs"].append(job_id)
    status = _poll(url, f"/status/{job_id}", "status")
    assert status["status"] == "COMPLETED", status
    out = status["output"]
    assert out["output_format"] == "s3" and out["frames"] == FRAMES, out
    key = out["video_key"]
    video = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()  # the mp4 is in the bucket
    _check_mp4(video)
    assert s3.head_object(Bucket=BUCKET, Key=f"jobs/{job_id}.json")  # the job record too

    r = requests.post(f"{url}/runsync", json={"input": {"action": "model_check"}}, timeout=120)
    assert r.status_code == 200 and r.json()["status"] == "COMPLETED", r.text
    assert r.json()["output"], r.json()
    r = requests.post(f"{url}/runsync", json={"input": {"action": "volume_explore", "max_depth": 2}}, timeout=120)
    assert r.status_code == 200 and r.json()["status"] == "COMPLETED", r.text
    assert r.json()["output"], r.json()


def test_predecessor_sample_body_on_the_embedded_default(s3_serve):
    """The predecessor's own sample job, exactly: no frames, no size, no steps. The speech
    (multi1/1.wav, 1.76 s) is shorter than the official 81 frames: the clip is fitted to it
    and the embedded default's request defaults keep it to seconds on a CPU."""
    import requests

    url = s3_serve["url"]
    body = {"input": {"action": "generate", "audio_1": "1.wav", "condition_image": "multi1.png",
                      "output_format": "s3"}}
    started = time.monotonic()
    r = requests.post(f"{url}/run", json=body, timeout=60)
    assert r.status_code == 200, r.text
    status = _poll(url, f"/status/{r.json()['id']}", "status")
    elapsed = time.monotonic() - started
    print(f"predecessor sample body on the embedded default: {elapsed:.1f} s submit to COMPLETED")
    assert status["status"] == "COMPLETED", status
    out = status["output"]
    assert out["frames"] == 41 and out["options_applied"]["frames"]["source"] == "fitted to the audio"
    assert out["options_applied"]["size"]["source"] == "server default"
    data = s3_serve["s3"].get_object(Bucket=BUCKET, Key=out["s3_key"])["Body"].read()
    from multitalk.utils.video import probe_mp4

    info = probe_mp4(data)
    assert info["num_frames"] == 41 and info["audio_codec"] == "aac", info


def test_two_speaker_script_through_jobs_and_runpod_tts_audio(s3_serve):
    """Text to speech served: a two-speaker script through /v1/jobs and the official
    ``tts_audio`` object through /run. The soundtrack is the synthesised dialogue (the
    speech wav stored beside the video) and the video lasts as long as it does."""
    import io

    import numpy as np
    import requests
    import soundfile
    from inputs import mp4_audio

    from multitalk.utils.video import probe_mp4

    url, s3 = s3_serve["url"], s3_serve["s3"]
    voices = requests.get(f"{url}/v1/models", timeout=60).json()["speech_voices"]
    assert {"af_heart", "am_adam"} <= set(voices), voices
    script = "(s1) Hi there! (s2) Hello, friend. (s1) Bye."
    native = {"image": "multi1.png", "speech": {"voices": ["af_heart", "am_adam"], "script": script},
              "mode": "streaming", "motion_frames": 5, "frames": 17, "sampling": {"steps": 1}}
    runpod = {"input": {"action": "generate", "condition_image": "multi1.png", "output_format": "s3",
                        "tts_audio": {"text": script, "human1_voice": "weights/Kokoro-82M/voices/af_heart.pt",
                                      "human2_voice": "am_adam"},
                        "mode": "streaming", "motion_frames": 5, "frames": 17, "sample_steps": 1}}
    r1 = requests.post(f"{url}/v1/jobs", json=native, timeout=60)
    r2 = requests.post(f"{url}/run", json=runpod, timeout=60)
    assert r1.status_code == 202 and r2.status_code == 200, (r1.text, r2.text)
    native_status = _poll(url, f"/v1/jobs/{r1.json()['id']}", "state")
    runpod_status = _poll(url, f"/status/{r2.json()['id']}", "status")
    assert native_status["state"] == "COMPLETED" and runpod_status["status"] == "COMPLETED", (native_status,
                                                                                             runpod_status)
    keys = [(native_status["result"]["key"], native_status["result"]["speech_key"]),
            (runpod_status["output"]["s3_key"], runpod_status["output"]["speech_key"])]
    for video_key, speech_key in keys:
        video = s3.get_object(Bucket=BUCKET, Key=video_key)["Body"].read()
        speech, rate = soundfile.read(io.BytesIO(s3.get_object(Bucket=BUCKET, Key=speech_key)["Body"].read()),
                                      dtype="float32")
        info = probe_mp4(video)
        assert rate == 16000 and info["audio_codec"] == "aac"
        assert info["num_frames"] / 25 == pytest.approx(len(speech) / 16000, abs=4 / 25)  # ends 3 frames early
        track = mp4_audio(video)
        n = min(len(track), len(speech))
        assert np.corrcoef(track[:n], speech[:n])[0, 1] > 0.9
    # same script, same voices, same seed: both front doors synthesise the same dialogue
    assert native_status["result"]["frames"] == runpod_status["output"]["frames"]
    r = requests.post(f"{url}/v1/jobs", json={**native, "speech": {"voices": ["af_nobody"], "texts": ["hi"]}},
                      timeout=60)
    assert r.status_code == 422 and r.json()["error"]["field"] == "speech.voices[0]", r.text
    assert "af_heart" in r.json()["error"]["message"]


def _frames(video: bytes):
    """Decoded RGB frames [T, H, W, 3] of an mp4 (fragmented or not), through the bundled ffmpeg."""
    import subprocess

    import imageio_ffmpeg
    import numpy as np

    from multitalk.utils.video import probe_mp4

    info = probe_mp4(video)
    raw = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", "pipe:0", "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "pipe:1"], input=video, capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, info["height"], info["width"], 3)


def _psnr(a, b) -> float:
    import numpy as np

    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_chunks_are_readable_while_a_streaming_job_runs(s3_serve):
    """A 5-chunk streaming job: as soon as the status lists a finished chunk, GET /video
    answers the chunks so far as a fragmented MP4 (the job still running), which decodes
    to exactly those frames; at the end the route serves the final mp4."""
    import requests

    from multitalk.utils.video import probe_mp4

    url = s3_serve["url"]
    body = {"image": "multi1.png", "audio": ["single.wav"], "mode": "streaming", "frames": 61, "motion_frames": 9,
            "size": "multitalk-64", "sampling": {"steps": 1}}
    job_id = requests.post(f"{url}/v1/jobs", json=body, timeout=60).json()["id"]
    status = _poll(url, f"/v1/jobs/{job_id}", "state", states=TERMINAL + ("IN_PROGRESS",))
    deadline = time.monotonic() + 300
    while not status["chunks"] and status["state"] not in TERMINAL:
        assert time.monotonic() < deadline
        time.sleep(0.1)
        status = requests.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
    r = requests.get(f"{url}/v1/jobs/{job_id}/video", timeout=60)
    done, total = (int(x) for x in r.headers["X-MultiTalk-Chunks"].split("/"))
    assert 1 <= done < total == 5, r.headers  # served while chunks were still to come
    first = status["chunks"][0]
    info = probe_mp4(r.content)
    listed = requests.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()["chunks"]
    assert info["num_frames"] == listed[done - 1]["frames_so_far"] and first["frames"] == 61, (info, listed)
    assert info["audio_codec"] == "aac"
    playlist = requests.get(f"{url}/v1/jobs/{job_id}/chunks/index.m3u8", timeout=10).text
    assert "#EXT-X-MAP:URI=\"init.mp4\"" in playlist and "00000.m4s" in playlist
    final = _poll(url, f"/v1/jobs/{job_id}", "state")
    assert final["state"] == "COMPLETED" and len(final["chunks"]) == 5, final
    video = requests.get(f"{url}/v1/jobs/{job_id}/video", timeout=60)
    assert "X-MultiTalk-Chunks" not in video.headers and probe_mp4(video.content)["num_frames"] == 264
    assert final["chunks"][-1]["frames_so_far"] == 264


def test_presets_and_loras_per_request_on_one_diffusion_replica(s3_serve):
    """Two jobs, the embedded default's 'fast' preset (a LoRA, 8 steps, text scale 1) and a
    plain one with the LoRA at another scale, run on the one Diffusion replica without a
    reload; each equals the same settings run in-process on the same weights."""
    import requests
    from ray import serve as _serve

    from multitalk.api import GenerationRequest, LoraChoice, SamplingOptions
    from multitalk.checkpoints.tiny import EMBEDDED_LORA, ensure_tiny_weights
    from multitalk.pipeline import MultiTalkPipeline

    url, s3 = s3_serve["url"], s3_serve["s3"]
    diffusion = _serve.get_deployment_handle("Diffusion", app_name="multitalk")
    before = diffusion.loaded_with.remote().result()
    jobs = {
        "fast": {"image": "multi1.png", "audio": ["1.wav"], "preset": "fast", "frames": 17, "sampling": {"steps": 2}},
        "half": {"image": "multi1.png", "audio": ["1.wav"], "frames": 17, "sampling": {"steps": 2},
                 "loras": [{"name": "distill", "scale": 0.5}]},
    }
    results = {}
    for name, body in jobs.items():
        r = requests.post(f"{url}/v1/jobs", json=body, timeout=60)
        assert r.status_code == 202, r.text
        results[name] = _poll(url, f"/v1/jobs/{r.json()['id']}", "state")
        assert results[name]["state"] == "COMPLETED", results[name]
    after = diffusion.loaded_with.remote().result()
    assert after["replica"] == before["replica"] and after["loads"] == before["loads"] == 1  # no reload
    assert results["fast"]["result"]["loras"] == [{"name": "distill", "scale": 1.0}]
    assert results["half"]["result"]["loras"] == [{"name": "distill", "scale": 0.5}]
    assert results["fast"]["request"]["sampling"]["text_scale"] == 1.0  # from the preset
    assert results["fast"]["options_applied"]["sampling.text_scale"]["source"] == "preset fast"
    bad = requests.post(f"{url}/v1/jobs", json={**jobs["half"], "loras": [{"name": "nope"}]}, timeout=60)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "loras" and "distill" in bad.text
    bad = requests.post(f"{url}/v1/jobs", json={**jobs["half"], "loras": [{"name": "distill", "scale": 9}]}, timeout=60)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "loras"

    models = ensure_tiny_weights(s3_serve["args"]["cache_dir"])
    pipe = MultiTalkPipeline.from_pretrained(models, lora_registry={"distill": EMBEDDED_LORA})
    image = s3.get_object(Bucket=BUCKET, Key="multi1.png")["Body"].read()
    audio = s3.get_object(Bucket=BUCKET, Key="1.wav")["Body"].read()
    local = {}
    for name, (loras, sampling) in {
        "fast": ([LoraChoice("distill", 1.0)], SamplingOptions(steps=2, text_scale=1.0, audio_scale=2.0)),
        "half": ([LoraChoice("distill", 0.5)], SamplingOptions(steps=2)),
    }.items():
        local[name] = pipe.generate(GenerationRequest(image=image, audio=[audio], frames=17, size="multitalk-128",
                                                      sampling=sampling, loras=loras)).video
    served = {name: s3.get_object(Bucket=BUCKET, Key=st["result"]["key"])["Body"].read() for name, st in results.items()}
    for name in jobs:
        assert _psnr(_frames(served[name]), _frames(local[name])) > 40, name  # the same settings, the same video
    assert _psnr(_frames(served["fast"]), _frames(served["half"])) < 35  # and the two jobs did differ


def test_infinitetalk_dubs_the_sample_video(s3_serve):
    """The InfiniteTalk model served as a second application: the sample video dubbed with
    single/1.wav through /v1/jobs and through /run (condition_video): mp4s as long as the
    audio, 25 fps, audio muxed."""
    import requests

    from multitalk.utils.video import probe_mp4
    from pipeline_graph import build_app

    url, s3 = s3_serve["url"], s3_serve["s3"]
    args = {**s3_serve["args"], "model": "infinitetalk"}
    args["ingress"] = {**args["ingress"], "max_concurrent_jobs": 2,  # the two dubs at once
                       "request_defaults": {"size": "infinitetalk-32", "sampling": {"steps": 1}}}
    serve.run(build_app(args), name="infinitetalk", route_prefix="/infinitetalk")
    try:
        base = f"{url}/infinitetalk"
        r1 = requests.post(f"{base}/v1/jobs", json={"video": "ref_video.mp4", "audio": ["single.wav"]}, timeout=60)
        r2 = requests.post(f"{base}/run", json={"input": {"action": "generate", "condition_video": "ref_video.mp4",
                                                          "audio_1": "single.wav"}}, timeout=60)
        assert r1.status_code == 202 and r2.status_code == 200, (r1.text, r2.text)
        native = _poll(base, f"/v1/jobs/{r1.json()['id']}", "state")
        runpod = _poll(base, f"/status/{r2.json()['id']}", "status")
        assert native["state"] == "COMPLETED" and runpod["status"] == "COMPLETED", (native, runpod)
        assert native["request"]["mode"] == "streaming" and native["request"]["motion_frames"] == 9
        for key in (native["result"]["key"], runpod["output"]["s3_key"]):
            info = probe_mp4(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
            assert info["num_frames"] == 267 and abs(info["fps"] - 25) < 1e-6, info  # 10.68 s of speech
            assert info["audio_codec"] == "aac" and abs(info["audio_duration"] - 267 / 25) < 0.1, info
        both = requests.post(f"{base}/v1/jobs", json={"video": "ref_video.mp4", "image": "multi1.png",
                                                     "audio": ["single.wav"]}, timeout=60)
        assert both.status_code == 422 and both.json()["error"]["field"] == "video", both.text
        not_video = requests.post(f"{base}/v1/jobs", json={"video": "single.wav", "audio": ["single.wav"]}, timeout=60)
        assert not_video.status_code == 422 and not_video.json()["error"]["field"] == "video", not_video.text
        on_multitalk = requests.post(f"{url}/v1/jobs", json={"video": "ref_video.mp4", "audio": ["single.wav"]},
                                     timeout=60)
        assert on_multitalk.status_code == 422 and "InfiniteTalk" in on_multitalk.text
    finally:
        serve.delete("infinitetalk")


def test_native_api_s3(s3_serve):
    import requests

    url, s3 = s3_serve["url"], s3_serve["s3"]
    body = {"image": "multi1.png", "audio": ["1.wav"], "prompt": "two people talking", **NATIVE_SMALL}
    r = requests.post(f"{url}/v1/jobs", json=body, timeout=60)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    s3_serve["jobs"].append(job_id)
    status = _poll(url, f"/v1/jobs/{job_id}", "state")
    assert status["state"] == "COMPLETED", status
    result = status["result"]
    assert result["store"] == "s3" and result["frames"] == FRAMES, result
    from_bucket = s3.get_object(Bucket=BUCKET, Key=result["key"])["Body"].read()
    r = requests.get(f"{url}/v1/jobs/{job_id}/video", timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4", r.headers
    assert r.content == from_bucket
    _check_mp4(r.content)


def test_handle_from_second_app(s3_serve):
    import requests

    url = s3_serve["url"]
    serve.run(OtherApp.bind(), name="other", route_prefix="/other")
    try:
        body = {"image": "multi1.png", "audio": ["1.wav"], "prompt": "from another app", **NATIVE_SMALL}
        r = requests.post(f"{url}/other", json=body, timeout=300)
        assert r.status_code == 200, r.text
        status = r.json()
        s3_serve["jobs"].append(status["id"])
        assert status["state"] == "COMPLETED", status
        assert status["result"]["key"] and status["result"]["frames"] == FRAMES, status
        assert s3_serve["s3"].head_object(Bucket=BUCKET, Key=status["result"]["key"])
    finally:
        serve.delete("other")


def _ingress_actor_names(ray) -> list[tuple[str, str]]:
    return [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if "multitalk" in a["name"] and "MultiTalkIngress" in a["name"] and "REPLICA" in a["name"].upper()]


def test_ingress_restart_mid_job(s3_serve):
    import ray
    import requests

    url = s3_serve["url"]
    before = _ingress_actor_names(ray)
    assert len(before) == 1, before
    body = {"image": "multi1.png", "audio": ["1.wav"], "prompt": "interrupted",
            **{**NATIVE_SMALL, "sampling": {"steps": 6, "seed": 2}}}
    job_id = requests.post(f"{url}/v1/jobs", json=body, timeout=60).json()["id"]
    s3_serve["jobs"].append(job_id)
    _poll(url, f"/v1/jobs/{job_id}", "state", timeout=120, states=("IN_PROGRESS",))

    name, ns = before[0]
    killed_at = time.time()
    ray.kill(ray.get_actor(name, namespace=ns), no_restart=True)
    deadline = time.monotonic() + 180
    while True:  # Serve's controller starts a new ingress replica
        assert time.monotonic() < deadline, "ingress replica was not replaced"
        after = _ingress_actor_names(ray)
        if after and after != before:
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
        time.sleep(0.5)

    for jid in s3_serve["jobs"]:  # every record is still known to the new replica
        r = requests.get(f"{url}/v1/jobs/{jid}", timeout=30)
        assert r.status_code == 200, (jid, r.text)
        assert r.json()["id"] == jid
        if jid != job_id:
            assert r.json()["state"] == "COMPLETED", r.json()
        else:
            assert r.json()["state"] in ("IN_QUEUE", "IN_PROGRESS"), r.json()  # it was interrupted
    final = _poll(url, f"/v1/jobs/{job_id}", "state", timeout=300)
    assert final["state"] == "COMPLETED", final  # re-run by the new replica at start-up
    assert final["started_at"] > killed_at, final  # started again after the kill
    assert final["result"]["frames"] == FRAMES
    _check_mp4(s3_serve["s3"].get_object(Bucket=BUCKET, Key=final["result"]["key"])["Body"].read())


def test_runpod_sdk_through_v2_on_the_served_app(s3_serve, monkeypatch):
    """The unmodified ``runpod`` SDK, ``RUNPOD_ENDPOINT_BASE_URL`` at the server's ``/v2``:
    health, a generate job run to COMPLETED (status and output read, the mp4 in the bucket),
    another cancelled."""
    import runpod

    url, s3 = s3_serve["url"], s3_serve["s3"]
    monkeypatch.setenv("RUNPOD_ENDPOINT_BASE_URL", f"{url}/v2")
    monkeypatch.setattr(runpod, "endpoint_url_base", f"{url}/v2")  # the SDK read the variable at import
    monkeypatch.setattr(runpod, "api_key", "open-server")
    endpoint = runpod.Endpoint("multitalk-endpoint")
    health = endpoint.health()
    assert set(health["jobs"]) == {"completed", "failed", "inProgress", "inQueue", "retried"}, health
    assert health["workers"]["idle"] + health["workers"]["running"] == 1, health
    job = endpoint.run({"action": "generate", "audio_1": "1.wav", "condition_image": "multi1.png",
                        "output_format": "s3", **SMALL})
    s3_serve["jobs"].append(job.job_id)
    output = job.output(timeout=300)
    assert job.status() == "COMPLETED", output
    assert output["frames"] == FRAMES and output["s3_key"] == f"outputs/{job.job_id}.mp4", output
    _check_mp4(s3.get_object(Bucket=BUCKET, Key=output["s3_key"])["Body"].read())
    slow = endpoint.run({"action": "generate", "audio_1": "1.wav", "condition_image": "multi1.png",
                         **{**SMALL, "sample_steps": 40}})
    cancelled = slow.cancel(timeout=30)
    assert cancelled["status"] == "CANCELLED" and slow.status() == "CANCELLED", cancelled
    assert endpoint.health()["jobs"]["inQueue"] == 0


def test_openai_sdk_makes_a_talking_video_on_the_served_app(s3_serve, fixtures_dir):
    """The unmodified ``openai`` SDK against ``/v1``: the image uploaded as
    ``input_reference``, the speech as vLLM-Omni's ``audio_reference`` object holding a
    presigned URL of the bucket; polled to completed; the mp4 downloaded has H.264 video and
    AAC audio as long as asked; listed; deleted with its files."""
    import warnings

    from openai import NotFoundError, OpenAI

    from multitalk.utils.video import probe_mp4

    warnings.simplefilter("ignore", DeprecationWarning)  # the SDK marks the hosted API as retired
    url, s3 = s3_serve["url"], s3_serve["s3"]
    client = OpenAI(base_url=f"{url}/v1", api_key="open-server", max_retries=0)
    presigned = s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "1.wav"}, ExpiresIn=600)
    image = (fixtures_dir / "multi1" / "multi1.png").read_bytes()
    video = client.videos.create(prompt="a man and a woman talking", model="multitalk",
                                 input_reference=("multi1.png", image, "image/png"), seconds="0.68",
                                 extra_body={"audio_reference": {"audio_url": presigned}, "num_inference_steps": 2})
    deadline = time.monotonic() + 300
    while (video := client.videos.retrieve(video.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline and 0 <= video.progress <= 100, video
        time.sleep(0.5)
    assert video.status == "completed" and video.progress == 100, video
    mp4 = client.videos.download_content(video.id).read()
    info = probe_mp4(mp4)
    assert video.seconds == "0.68" and video.size == f"{info['width']}x{info['height']}", (video, info)
    assert info["video_codec"] == "h264" and info["num_frames"] == FRAMES and abs(info["fps"] - 25) < 1e-6, info
    assert info["audio_codec"] == "aac" and abs(info["audio_duration"] - FRAMES / 25) < 0.1, info
    assert client.videos.download_content(video.id, variant="thumbnail").read()[:2] == b"\xff\xd8"
    assert video.id in [v.id for v in client.videos.list(limit=5).data]
    key = f"outputs/{video.id}.mp4"
    assert s3.head_object(Bucket=BUCKET, Key=key)
    assert client.videos.delete(video.id).deleted
    with pytest.raises(NotFoundError):
        client.videos.retrieve(video.id)
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"outputs/{video.id}")
