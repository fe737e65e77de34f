"""Observability: the Ray Serve custom metrics (``deployments/metrics.py``) of one job run
through the served app on tiny weights, scraped from Ray's Prometheus endpoint.

Ray exports custom metrics through each node's metrics agent, started here on a free
port with ``ray.init(_metrics_export_port=...)``; the export is periodic, so the test
polls ``/metrics`` (up to 90 s) until the names appear.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import free_port, source_pythonpath
from deployments import metrics



def test_metrics_are_noops_without_ray():
    """In-process (no Ray): recording is silent and keeps the state bookkeeping."""
    m = metrics.JobMetrics()
    m.state("j1", "IN_QUEUE")
    m.state("j1", "IN_PROGRESS")
    assert m.states == {"j1": "IN_PROGRESS"}
    m.finished("j1", "COMPLETED", {"diffusion": 1.0, "total": 2.0})
    assert m.states == {}


def test_prometheus_lines():
    page = "\n".join([
        "# HELP ray_multitalk_stage_seconds x",
        'ray_multitalk_stage_seconds_bucket{stage="mux",le="0.1"} 1.0',
        'ray_multitalk_job_transitions_total{state="COMPLETED"} 1.0',
        'ray_multitalk_jobs{state="IN_QUEUE"} 0.0',
        'ray_multitalk_jobs_other 3',
    ])
    found = metrics.prometheus_lines(page)
    assert len(found["multitalk_stage_seconds"]) == 1
    assert len(found["multitalk_job_transitions"]) == 1
    assert found["multitalk_jobs"] == ['ray_multitalk_jobs{state="IN_QUEUE"} 0.0']



@pytest.mark.serve
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_served_job_metrics(tmp_path, fixtures_dir, monkeypatch, embedded_cache):
    import ray
    import requests
    from ray import serve

    from pipeline_graph import build_app

    monkeypatch.setenv("PYTHONPATH", source_pythonpath())  # before ray.init: the workers inherit it
    metrics_port, http_port = free_port(), free_port()
    ray.init(num_cpus=2, include_dashboard=False, namespace="serve", log_to_driver=False,
             _metrics_export_port=metrics_port)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        url = f"http://127.0.0.1:{http_port}"
        store_dir = tmp_path / "store"
        store_dir.mkdir()
        (store_dir / "1.wav").write_bytes((fixtures_dir / "multi1" / "1.wav").read_bytes())
        (store_dir / "multi1.png").write_bytes((fixtures_dir / "multi1" / "multi1.png").read_bytes())
        app = build_app({"device": "cpu", "dtype": "float32", "cache_dir": embedded_cache,
                         "store": {"local_root": str(store_dir)}, "ingress": {"persist_interval_s": 0.2}})
        # JSON logs, as serve_config.yaml has them: the job id becomes a field of its own.
        serve.run(app, name="multitalk-metrics", route_prefix="/", logging_config={"encoding": "JSON"})

        body = {"image": "multi1.png", "audio": ["1.wav"], "prompt": "two people talking", "frames": 5,
                "size": "multitalk-128", "sampling": {"steps": 3}}
        r = requests.post(f"{url}/v1/jobs", json=body, timeout=60)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 300
        while True:
            status = requests.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
            if status["state"] in ("COMPLETED", "FAILED", "CANCELLED"):
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        assert status["state"] == "COMPLETED", status

        wanted = {"multitalk_job_transitions", "multitalk_jobs", "multitalk_queue_depth",
                  "multitalk_stage_seconds", "multitalk_diffusion_step_seconds"}
        stages = {"prepare", "encode", "diffusion", "decode", "mux", "total"}
        deadline = time.monotonic() + 90
        found: dict = {}
        while True:
            try:
                page = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
                found = metrics.prometheus_lines(page)
            except requests.RequestException:
                page = ""
            present = {n for n in wanted if found.get(n)}
            text = "\n".join(found.get("multitalk_stage_seconds", []))
            tagged = {s for s in stages if f'stage="{s}"' in text}
            completed = any('state="COMPLETED"' in line for line in found.get("multitalk_job_transitions", []))
            if present == wanted and tagged == stages and completed:
                break
            assert time.monotonic() < deadline, (
                f"metrics not exported in time: missing {sorted(wanted - present)}, stages {sorted(tagged)}, "
                f"completed transition {completed}")
            time.sleep(2)

        transitions = "\n".join(found["multitalk_job_transitions"])
        for state in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED"):
            assert f'state="{state}"' in transitions, transitions
        assert 'deployment="MultiTalkIngress"' in transitions  # Serve's own tags are added
        steps = [ln for ln in found["multitalk_diffusion_step_seconds"] if "_count" in ln.split("{")[0]]
        assert steps and float(steps[0].rsplit(" ", 1)[1]) >= 2, steps  # 3 steps: 2 measured intervals
        # Structured logs: the job id in the ingress' and the stage replicas' Serve logs.
        from ray.serve._private.logging_utils import get_serve_logs_dir

        logs = Path(get_serve_logs_dir())
        tagged_logs = {p.name.split("_")[2] for p in logs.glob("replica_multitalk-metrics_*.log")
                       if f"[job {job_id}]" in p.read_text(errors="replace")}
        assert {"MultiTalkIngress", "AudioEncoder", "Diffusion", "VaeDecoder"} <= tagged_logs, tagged_logs
        # ... and as a field of its own in the JSON lines.
        fielded = set()
        for p in logs.glob("replica_multitalk-metrics_*.log"):
            for line in p.read_text(errors="replace").splitlines():
                try:
                    if json.loads(line).get("multitalk_job_id") == job_id:
                        fielded.add(p.name.split("_")[2])
                except (ValueError, AttributeError):
                    continue
        assert {"MultiTalkIngress", "AudioEncoder", "Diffusion", "VaeDecoder"} <= fielded, fielded
        # No CUDA here: the GPU gauge stays absent rather than reporting zeros.
        import torch
        if not torch.cuda.is_available():
            assert not found["multitalk_gpu_max_memory_bytes"]
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
