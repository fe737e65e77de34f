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
def s3_serve(tmp_path_factory, fixtures_dir):
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
        args.update({"cache_dir": str(tmp / "cache"),
                     "store": {"bucket": BUCKET, "region": "us-east-1", "endpoint_url": endpoint}})
        args["ingress"].update({"persist_interval_s": 0.2, "max_concurrent_jobs": 1,
                                "local_output_dir": str(tmp / "out")})
        app = build_app(args)
        serve.run(app, name="multitalk", route_prefix="/")
        try:
            yield {"url": f"http://127.0.0.1:{port}", "s3": s3, "tmp": tmp, "jobs": []}
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
