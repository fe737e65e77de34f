"""Small HTTP client for a running MultiTalk Serve (``multitalk submit``) and the local
server launcher (``multitalk serve``).

``submit`` uploads local files (multipart) or passes references (store keys, ``s3://``
URLs) as JSON, then polls ``GET /v1/jobs/{id}`` and shows stage/step progress.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import requests


class JobFailed(RuntimeError):
    """The job ended FAILED or CANCELLED; ``status`` is the final job status."""

    def __init__(self, status: dict):
        err = status.get("error") or {}
        where = f"{err.get('field')}: " if err.get("field") else ""
        super().__init__(f"job {status.get('id')} {status.get('state')}: {where}{err.get('message', '')}")
        self.status = status


class RequestRejected(RuntimeError):
    """The server refused the submission (4xx/5xx)."""

    def __init__(self, status_code: int, body: Any):
        err = body.get("error", {}) if isinstance(body, dict) else {}
        msg = err.get("message") or str(body)
        field = err.get("field")
        super().__init__(f"HTTP {status_code}: {field + ': ' if field else ''}{msg}")
        self.status_code = status_code
        self.body = body


def _is_local_file(ref: str) -> bool:
    return not ref.startswith("s3://") and Path(ref).expanduser().is_file()


def _raise_for(resp: requests.Response) -> None:
    if resp.status_code >= 400:
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        raise RequestRejected(resp.status_code, body)


def submit(
    url: str,
    image: str,
    audio: str,
    audio2: Optional[str] = None,
    prompt: str = "",
    wait: bool = True,
    out: Optional[str] = None,
    progress: bool = True,
    options: Optional[dict] = None,
    poll_interval: float = 1.0,
    timeout: Optional[float] = None,
    idempotency_key: Optional[str] = None,
    session: Optional[requests.Session] = None,
) -> dict:
    """Submit a job and (with ``wait``) follow it to the end; returns the final status.

    ``image``/``audio``/``audio2``: local files (uploaded) or references the server
    resolves (a key in its store, a simple file name, ``s3://bucket/key``).
    ``options``: further :class:`deployments.schemas.JobRequest` fields (``frames``,
    ``mode``, ``sampling``: {...}, ``output``: {...} ...). ``out``: where to save the mp4.
    Raises :class:`RequestRejected` on 4xx/5xx and :class:`JobFailed` if the job fails.
    """
    base = url.rstrip("/")
    http = session or requests.Session()
    body: dict[str, Any] = {"prompt": prompt, **(options or {})}
    headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
    audios = [a for a in (audio, audio2) if a]
    refs = [image] + audios
    if any(_is_local_file(r) for r in refs):
        files = []
        handles = []
        try:
            for field, ref in [("image", image)] + [("audio", a) for a in audios]:
                if _is_local_file(ref):
                    fh = open(Path(ref).expanduser(), "rb")
                    handles.append(fh)
                    files.append((field, (Path(ref).name, fh)))
                else:
                    files.append((field, (None, ref)))  # plain form field: a reference
            resp = http.post(f"{base}/v1/jobs", files=files, data={"request": json.dumps(body)}, headers=headers)
        finally:
            for fh in handles:
                fh.close()
    else:
        resp = http.post(f"{base}/v1/jobs", json={**body, "image": image, "audio": audios}, headers=headers)
    _raise_for(resp)
    job_id = resp.json()["id"]
    if not wait:
        return http.get(f"{base}/v1/jobs/{job_id}").json()
    status = follow(base, job_id, progress=progress, poll_interval=poll_interval, timeout=timeout, session=http)
    if status["state"] != "COMPLETED":
        raise JobFailed(status)
    if out:
        download(base, job_id, out, session=http)
        status["saved_to"] = str(out)
    return status


def follow(
    url: str,
    job_id: str,
    progress: bool = True,
    poll_interval: float = 1.0,
    timeout: Optional[float] = None,
    session: Optional[requests.Session] = None,
) -> dict:
    """Poll a job until it ends, with a tqdm bar over stage and sampler steps."""
    http = session or requests.Session()
    base = url.rstrip("/")
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=0, desc="queued", unit="step", file=sys.stderr, dynamic_ncols=True)
    try:
        while True:
            resp = http.get(f"{base}/v1/jobs/{job_id}")
            _raise_for(resp)
            status = resp.json()
            if bar is not None:
                p = status.get("progress") or {}
                chunk = f" chunk {p.get('chunk', 0) + 1}/{p.get('total_chunks', 1)}" if p.get("total_chunks", 1) > 1 else ""
                bar.set_description(f"{p.get('stage', status['state'])}{chunk}")
                if p.get("total_steps") and bar.total != p["total_steps"]:
                    bar.total = p["total_steps"]
                    bar.refresh()
                if p.get("step", 0) > bar.n:
                    bar.update(p["step"] - bar.n)
            if status["state"] in ("COMPLETED", "FAILED", "CANCELLED"):
                return status
            if deadline is not None and time.monotonic() > deadline:
                return status
            time.sleep(poll_interval)
    finally:
        if bar is not None:
            bar.close()


def download(url: str, job_id: str, out: str, session: Optional[requests.Session] = None) -> Path:
    """Save a finished job's mp4 to ``out`` (streamed)."""
    http = session or requests.Session()
    target = Path(out).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    with http.get(f"{url.rstrip('/')}/v1/jobs/{job_id}/video", stream=True) as resp:
        _raise_for(resp)
        tmp = target.with_suffix(target.suffix + ".part")
        with open(tmp, "wb") as f:
            for block in resp.iter_content(1 << 20):
                f.write(block)
        os.replace(tmp, target)
    return target


# --- the local server -------------------------------------------------------------------


def default_config_path() -> Path:
    """The embedded CPU config, packaged as ``multitalk/configs/serve_cpu.yaml``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs" / "serve_cpu.yaml",):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("multitalk/configs/serve_cpu.yaml not found")


def load_serve_config(config: Optional[str] = None, host: Optional[str] = None, port: Optional[int] = None):
    """Parse a Serve config file (default: the embedded CPU one) into ``ServeDeploySchema``,
    with ``host``/``port`` overriding its ``http_options``."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = Path(config).expanduser() if config else default_config_path()
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    http = dict(raw.get("http_options") or {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = int(port)
    raw["http_options"] = http
    return ServeDeploySchema.model_validate(raw)


def serve_main(config: Optional[str] = None, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True,
               log_to_driver: bool = True):
    """Start a local Ray, deploy the config's applications and block (``multitalk serve``).

    Same mechanism as ``serve run config.yaml``: per-deployment overrides in the config
    (replicas, resources, autoscaling, queue limits) are applied by Serve itself.
    """
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions

    schema = load_serve_config(config, host, port)
    # Replicas import `pipeline_graph` / `deployments` by name: make the source tree
    # importable for every worker this Ray starts (inherited through the environment).
    root = str(Path(__file__).resolve().parent.parent)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root] + paths)
    if not ray.is_initialized():
        ray.init(namespace="serve", log_to_driver=log_to_driver)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
    )
    client.deploy_apps(schema, _blocking=False)
    url = f"http://{schema.http_options.host}:{schema.http_options.port}"
    names = [a.name for a in schema.applications]
    print(f"MultiTalk Serve: deploying {', '.join(names)} at {url} (docs: {url}/docs)", file=sys.stderr)
    if not blocking:
        return url
    try:
        ready = False
        while True:
            time.sleep(2)
            if not ready:
                statuses = serve.status().applications
                if all(statuses.get(n) and statuses[n].status == "RUNNING" for n in names):
                    ready = True
                    print(f"MultiTalk Serve: ready at {url}", file=sys.stderr)
                elif any(statuses.get(n) and statuses[n].status == "DEPLOY_FAILED" for n in names):
                    msg = "; ".join(f"{n}: {statuses[n].message}" for n in names if statuses.get(n))
                    raise RuntimeError(f"deployment failed: {msg}")
    except KeyboardInterrupt:
        print("MultiTalk Serve: shutting down", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()


# --- the demo ---------------------------------------------------------------------------

# Small enough for a CPU on tiny random weights: one clip at ~128 px, 4 sampler steps.
# The sample speech (multi1/1.wav) lasts 1.76 s = 44 frames, so the clip has 41.
DEMO_OPTIONS = {"frames": 41, "size": "multitalk-128", "sampling": {"steps": 4}}


def _find_fixtures(fixtures: Optional[str]) -> Path:
    candidates = [Path(fixtures).expanduser()] if fixtures else []
    env = os.environ.get("MULTITALK_FIXTURES")
    if env:
        candidates.append(Path(env))
    here = Path(__file__).resolve().parent
    candidates += [here.parent.parent / "shared" / "fixtures", Path.cwd() / "fixtures"]
    for c in candidates:
        if (c / "multi1" / "1.wav").is_file() and (c / "multi1" / "multi1.png").is_file():
            return c
    raise FileNotFoundError(
        "sample inputs not found (multi1/1.wav, multi1/multi1.png); pass --fixtures or set MULTITALK_FIXTURES. "
        f"Looked in: {', '.join(str(c) for c in candidates)}"
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_main(out: str = "outputs/demo.mp4", fixtures: Optional[str] = None, options: Optional[dict] = None,
              config: Optional[str] = None, port: Optional[int] = None, ready_timeout: float = 900.0) -> int:
    """``multitalk demo``: serve locally (embedded CPU config, tiny weights), submit the
    predecessor's sample job (``1.wav`` + ``multi1.png``) over HTTP, write the mp4."""
    import ray
    from ray import serve

    fx = _find_fixtures(fixtures)
    prompt = ""
    try:
        prompt = json.loads((fx / "prompts.json").read_text())["multi1"]["prompt"]
    except (OSError, KeyError, ValueError):
        pass
    url = serve_main(config, host="127.0.0.1", port=port or _free_port(), blocking=False, log_to_driver=False)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:  # replicas load (and generate tiny weights on first use) before answering
            status = serve.status().applications.get("multitalk")
            if status is not None and status.status == "RUNNING":
                break
            if status is not None and status.status == "DEPLOY_FAILED":
                print(f"deployment failed: {status.message}", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print("the application did not become ready in time", file=sys.stderr)
                return 1
            time.sleep(2)
        print(f"MultiTalk Serve: ready at {url}; submitting the sample job", file=sys.stderr)
        try:
            final = submit(url, str(fx / "multi1" / "multi1.png"), str(fx / "multi1" / "1.wav"), prompt=prompt,
                           wait=True, out=out, options={**DEMO_OPTIONS, **(options or {})})
        except (JobFailed, RequestRejected) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        result = final.get("result") or {}
        print(json.dumps({"out": str(out), "job": final["id"], "frames": result.get("frames"),
                          "width": result.get("width"), "height": result.get("height"),
                          "lip_sync": result.get("lip_sync"), "timings": final.get("timings")}, indent=2))
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
