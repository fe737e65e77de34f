"""The browser front end at ``/``: headless Chromium (Playwright) drives the page against
the served app (real stages on tiny weights): upload an image and a speech track, submit,
follow the progress, play the result, and save ``docs/screenshot.png``.

Needs the Debian ``chromium`` package (``/usr/bin/chromium``, or ``MULTITALK_CHROMIUM``) and
the ``playwright`` Python package; Playwright's own browser download is not used.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from conftest import local_serve

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHROMIUM = os.environ.get("MULTITALK_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required"]
SCREENSHOT = ROOT / "docs" / "screenshot.png"



@pytest.fixture(scope="module")
def browser():
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium)")
    from playwright import sync_api
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, embedded_cache):
    from ray import serve

    import yaml

    from deployments.launcher import default_config_path
    from pipeline_graph import build_app

    tmp = tmp_path_factory.mktemp("web")
    with local_serve(tmp, num_cpus=2, namespace="serve") as (url, _):
        # The embedded CPU default (its presets and LoRA), with this test's store and cache.
        args = yaml.safe_load(default_config_path().read_text())["applications"][0]["args"]
        args.update({"cache_dir": embedded_cache, "store": {"local_root": str(tmp / "store")}})
        args["ingress"]["persist_interval_s"] = 0.2
        app = build_app(args)
        serve.run(app, name="multitalk-web", route_prefix="/")
        yield url


def test_page_and_job_list_routes(tmp_path):
    """Without Ray or a browser: ``/`` serves the page, ``GET /v1/jobs`` lists jobs newest first."""
    from fastapi.testclient import TestClient

    from deployments.routes import create_app
    from deployments.schemas import JobRequest
    from deployments.service import JobService
    from deployments.storage import LocalStore

    store = LocalStore(tmp_path)
    service = JobService(store=store, stages=None)
    for i, prompt in enumerate(["first", "second"]):
        rec, _ = service.jobs.create(JobRequest(image="a.png", audio=["a.wav"], prompt=prompt), None, "api")
        rec.created_at = 1000.0 + i
        service.jobs.save(rec)
    with TestClient(create_app(service)) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for element in ('id="image-file"', 'id="audio-file-1"', 'id="result-video"', 'id="download"',
                        'id="jobs"', 'id="api-key"'):
            assert element in page.text
        jobs = client.get("/v1/jobs").json()["jobs"]
        assert [j["prompt"] for j in jobs] == ["second", "first"]
        assert {"id", "state", "progress", "video_url", "error"} <= set(jobs[0])
        assert len(client.get("/v1/jobs?limit=1").json()["jobs"]) == 1
        assert client.get("/v1/jobs?limit=0").status_code == 422


@pytest.mark.serve
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_page_runs_a_job_and_plays_it(browser, served, fixtures_dir, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(served + "/")
    assert page.title() == "MultiTalk Serve"
    # The server's offer is on the page: its voices (text to speech), presets and LoRAs.
    page.wait_for_function("document.querySelectorAll('#voice-1 option').length >= 3", timeout=60_000)
    assert "fast" in page.eval_on_selector_all("#preset option", "os => os.map(o => o.value)")
    assert "distill" in page.eval_on_selector_all("#lora option", "os => os.map(o => o.value)")

    page.set_input_files("#image-file", str(fixtures_dir / "multi1" / "multi1.png"))
    page.set_input_files("#audio-file-1", str(fixtures_dir / "multi1" / "1.wav"))
    page.fill("#prompt", "A man and a woman talking in a cozy living room")
    page.fill("#frames", "17")
    page.fill("#steps", "2")
    page.select_option("#size", "multitalk-128")
    page.click("#submit")

    page.wait_for_function("document.getElementById('job-id').textContent.length > 8", timeout=60_000)
    job_id = page.text_content("#job-id")
    stages_seen = set()
    deadline = time.monotonic() + 420
    while True:  # follow the live progress the page shows
        state = page.text_content("#state")
        active = page.query_selector("#stages li.active")
        if active is not None:
            stages_seen.add(active.text_content())
        if state in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        assert time.monotonic() < deadline, f"job {job_id} still {state}"
        time.sleep(0.25)
    assert state == "COMPLETED", page.text_content("#job-error")
    assert stages_seen, "no stage was shown as active while the job ran"
    assert page.text_content("#step-label").strip() == "diffusion step 2 / 2"

    # The <video> plays: loaded enough to play, and its clock advances after play().
    page.wait_for_selector("#result-video:not(.hidden)", timeout=60_000)
    played = page.evaluate("""async () => {
        const v = document.getElementById('result-video');
        if (v.readyState < 2) await new Promise((ok, bad) => {
            v.addEventListener('canplay', ok, {once: true});
            v.addEventListener('error', () => bad(new Error('video error ' + (v.error && v.error.code))), {once: true});
            setTimeout(() => bad(new Error('no canplay in 30 s, readyState ' + v.readyState)), 30000);
        });
        const ready = v.readyState;
        v.muted = true;
        await v.play();
        const t0 = v.currentTime;
        const until = Date.now() + 10000;
        while (v.currentTime <= t0 && Date.now() < until) await new Promise(r => setTimeout(r, 50));
        const t1 = v.currentTime;
        v.pause();
        v.currentTime = Math.min(0.3, v.duration / 2);
        await new Promise(r => v.addEventListener('seeked', r, {once: true}));
        return {ready, t0, t1, duration: v.duration, w: v.videoWidth, h: v.videoHeight};
    }""")
    assert played["ready"] >= 2 and played["t1"] > played["t0"], played
    assert played["w"] > 0 and abs(played["duration"] - 17 / 25) < 0.1, played

    # Download link: the mp4 itself.
    with page.expect_download() as dl:
        page.click("#download")
    target = tmp_path / "download.mp4"
    dl.value.save_as(str(target))
    assert target.read_bytes()[4:8] == b"ftyp"

    # Recent jobs list has this job.
    page.click("#refresh-jobs")
    page.wait_for_selector(f"#jobs tr[data-id='{job_id}']", timeout=10_000)
    assert errors == [], errors

    SCREENSHOT.parent.mkdir(exist_ok=True)
    shot = tmp_path / "screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    shutil.copyfile(shot, SCREENSHOT)
    page.close()
