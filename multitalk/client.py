"""Small HTTP client for a running MultiTalk Serve (``multitalk submit``).

No Ray here: the local server launcher lives in ``deployments/launcher.py``.

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
    image: Optional[str] = None,
    audio: "Optional[str | list[str]]" = None,
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
    video: Optional[str] = None,
) -> dict:
    """Submit a job and (with ``wait``) follow it to the end; returns the final status.

    ``image`` (or ``video``: a source video to dub, InfiniteTalk) / ``audio`` (one path, or a
    list of up to four, one per speaker) / ``audio2``: local files (uploaded) or references
    the server resolves (a key in its store, a simple
    file name, ``s3://bucket/key``); no audio with
    ``options={"speech": {"voices": [...], "texts": [...] | "script": ...}}`` (text to speech).
    ``options``: further :class:`deployments.schemas.JobRequest` fields (``frames``,
    ``mode``, ``sampling``: {...}, ``output``: {...} ...). ``out``: where to save the mp4.
    Raises :class:`RequestRejected` on 4xx/5xx and :class:`JobFailed` if the job fails.
    (Submit (JSON or multipart), follow and download are one client call; the multipart branch keeps its file handles local.)
    """
    base = url.rstrip("/")
    http = session or requests.Session()
    body: dict[str, Any] = {"prompt": prompt, **(options or {})}
    headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
    audios = [a for a in ([*audio] if isinstance(audio, (list, tuple)) else [audio]) + [audio2] if a]
    visual = [("video", video)] if video else [("image", image)]
    refs = [ref for _, ref in visual] + audios
    if any(_is_local_file(r) for r in refs):
        files = []
        handles = []
        try:
            for field, ref in visual + [("audio", a) for a in audios]:
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
        resp = http.post(f"{base}/v1/jobs", json={**body, **dict(visual), "audio": audios}, headers=headers)
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
