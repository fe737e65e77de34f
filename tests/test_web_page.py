"""The browser front end at ``/``: headless Chromium (Playwright) drives the page against
the served app (real stages on tiny weights): upload an image and a speech track, submit,
follow the progress, play the result, and take a screenshot (``docs/screenshot.png`` with
MULTITALK_UPDATE_SCREENSHOT=1).

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
        # The page's speaker-box helper: the job's own checks (here: no picture, 5 speakers).
        r = client.post("/v1/speaker-boxes", files=[("image", ("x.png", b"not a picture"))], data={"speakers": "2"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "image"
        r = client.post("/v1/speaker-boxes", files=[("image", ("x.png", b"\x89PNG"))], data={"speakers": "5"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "speakers"


@pytest.fixture
def boxes_app(tmp_path):
    """The HTTP app over fake stages (no Ray, no models) on a loopback port: the page and its
    speaker-box route are real; the detection runs for real at submit too."""
    import threading

    import uvicorn
    from fakes import FakeStages, fake_generate

    from deployments.routes import create_app
    from deployments.service import JobService, ServiceSettings
    from deployments.storage import LocalStore

    service = JobService(store=LocalStore(tmp_path / "store"), stages=FakeStages(), generate_fn=fake_generate,
                         settings=ServiceSettings(precheck_inputs=True, persist_interval_s=0.05,
                                                  models_root=str(tmp_path)))
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", service
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _bbox_field(page) -> list[list[int]]:
    return [[int(v) for v in box.split(",")] for box in page.input_value("#bbox").split(";")]


@pytest.mark.timeout(300)
def test_page_shows_the_speaker_boxes_and_lets_them_be_moved_and_redrawn(browser, boxes_app, fixtures_dir):
    from multitalk.utils.faces import boxes_for_image

    url, service = boxes_app
    image = fixtures_dir / "multi1" / "multi1.png"
    found = boxes_for_image(image.read_bytes(), 2)["boxes"]
    page = browser.new_page(viewport={"width": 1280, "height": 1600})  # the whole form in view: no scrolling
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.set_input_files("#image-file", str(image))
    page.set_input_files("#audio-file-1", str(fixtures_dir / "multi1" / "1.wav"))
    assert page.is_hidden("#box-editor")  # one speaker: the whole frame, no boxes
    page.set_input_files("#audio-file-2", str(fixtures_dir / "multi1" / "2.wav"))
    page.wait_for_selector(".speaker-box[data-speaker='2']", timeout=30_000)
    # The detected boxes, labelled per speaker, where the image shows them (speaker 1 on the left).
    assert _bbox_field(page) == found
    labels = page.eval_on_selector_all(".speaker-box .label", "ls => ls.map(l => l.textContent)")
    assert labels == ["Speaker 1", "Speaker 2"]
    scale = page.evaluate("(() => { const i = document.getElementById('box-image'); "
                          "return i.clientWidth / i.naturalWidth; })()")
    one, two = (page.query_selector(f".speaker-box[data-speaker='{k}']").bounding_box() for k in (1, 2))
    stage = page.query_selector("#box-stage").bounding_box()
    assert one["x"] - stage["x"] == pytest.approx(found[0][1] * scale, abs=1.5)
    assert one["width"] == pytest.approx((found[0][3] - found[0][1]) * scale, abs=1.5)
    assert one["x"] + one["width"] <= two["x"]

    # Drag speaker 1's box 30 px right and 10 px up.
    page.mouse.move(one["x"] + one["width"] / 2, one["y"] + one["height"] / 2)
    page.mouse.down()
    page.mouse.move(one["x"] + one["width"] / 2 + 15, one["y"] + one["height"] / 2 - 5, steps=3)
    page.mouse.move(one["x"] + one["width"] / 2 + 30, one["y"] + one["height"] / 2 - 10, steps=3)
    page.mouse.up()
    moved = _bbox_field(page)[0]
    shift = [-10 / scale, 30 / scale, -10 / scale, 30 / scale]
    assert moved == pytest.approx([v + d for v, d in zip(found[0], shift)], abs=1 / scale + 1)

    # Redraw speaker 2's box: pick the speaker, drag a new rectangle between the two people.
    page.select_option("#box-speaker", "1")
    x0, y0 = stage["x"] + (1480 * scale), stage["y"] + (200 * scale)  # between box 1 (now to 1434) and box 2
    x1, y1 = stage["x"] + (2300 * scale), stage["y"] + (1000 * scale)
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=3)
    page.mouse.move(x1, y1, steps=3)
    page.mouse.up()
    drawn = _bbox_field(page)[1]
    assert drawn == pytest.approx([200, 1480, 1000, 2300], abs=2 / scale + 1)
    assert _bbox_field(page)[0] == moved

    # Submitted as shown: the job's bbox is the edited boxes.
    page.fill("#frames", "17")
    with page.expect_response(lambda r: r.url.endswith("/v1/jobs") and r.request.method == "POST") as reply:
        page.click("#submit")
    assert reply.value.status == 202, reply.value.text()
    job = reply.value.json()["id"]
    record = service.jobs.get(job)
    assert record.request.bbox == [moved, drawn]

    # A picture with fewer faces than speakers: the 422 is shown, and the boxes are drawn by hand.
    page.set_input_files("#image-file", str(fixtures_dir / "single" / "single1.png"))
    page.wait_for_function("document.getElementById('box-note').textContent.includes('bbox')", timeout=30_000)
    assert "1 face" in page.text_content("#box-note") and page.query_selector(".speaker-box") is None
    assert errors == [], errors
    page.close()


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

    shot = tmp_path / "screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("MULTITALK_UPDATE_SCREENSHOT"):  # the docs' picture, on request only: a test run
        shutil.copyfile(shot, SCREENSHOT)             # must not rewrite a tracked file
    page.close()
