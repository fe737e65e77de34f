"""Shared pytest fixtures."""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import pytest

# Sample inputs live next to the repository (../shared/fixtures), not inside it.
FIXTURES_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Path of the shared sample inputs; skips the test when they are not present."""
    if not FIXTURES_DIR.is_dir():
        pytest.skip(f"sample inputs not found at {FIXTURES_DIR}")
    return FIXTURES_DIR


@pytest.fixture(scope="session")
def tiny_official(tmp_path_factory) -> Path:
    """A tiny random-weight MultiTalk set in the official layout (seed 0)."""
    from multitalk.checkpoints.tiny import make_tiny_weights

    return make_tiny_weights(tmp_path_factory.mktemp("tiny-official"), "official", seed=0)


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory) -> Path:
    """The same weights (seed 0) in the diffusers layout."""
    from multitalk.checkpoints.tiny import make_tiny_weights

    return make_tiny_weights(tmp_path_factory.mktemp("tiny-diffusers"), "diffusers", seed=0)


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory) -> str:
    """A cache folder holding the embedded default's tiny weights (every optional component:
    Kokoro, InfiniteTalk, a LoRA), made once per session for every served test's app
    (``cache_dir``): each module would otherwise spend ~20 s writing the same files."""
    from multitalk.checkpoints.tiny import ensure_tiny_weights

    cache = tmp_path_factory.mktemp("embedded-cache")
    ensure_tiny_weights(str(cache))
    return str(cache)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_official):
    from multitalk.pipeline import MultiTalkPipeline

    return MultiTalkPipeline.from_pretrained(str(tiny_official))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def patched_environ(values: dict):
    """Set environment variables (before ``ray.init``: Ray workers inherit them); restore on exit."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def source_pythonpath() -> str:
    """The repository and tests folder first on PYTHONPATH, so Ray workers import
    ``pipeline_graph``/``deployments`` and test helper modules by name."""
    here = Path(__file__).resolve().parent
    return os.pathsep.join([str(here.parent), str(here)]
                           + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


@pytest.fixture(scope="module")
def moto_endpoint():
    """A moto S3 server over real HTTP on loopback for one test module, with fake AWS
    credentials in the environment; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    session = os.environ.pop("AWS_SESSION_TOKEN", None)
    with patched_environ({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}):
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()
    if session is not None:
        os.environ["AWS_SESSION_TOKEN"] = session


@contextlib.contextmanager
def moto_bucket(bucket: str, fixtures_dir: Path):
    """A moto S3 server over real HTTP with ``bucket`` holding the two-speaker sample
    inputs (``1.wav``, ``multi1.png``); yields ``(endpoint_url, boto3 client)``. Set fake
    AWS credentials first (:func:`patched_environ`)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    for name in ("1.wav", "multi1.png"):
        s3.put_object(Bucket=bucket, Key=name, Body=(fixtures_dir / "multi1" / name).read_bytes())
    try:
        yield endpoint, s3
    finally:
        server.stop()


@contextlib.contextmanager
def local_serve(tmp_dir: Path, num_cpus: int, namespace: str):
    """A local Ray + Serve for one test module; yields ``(base_url, tmp_dir)``.

    The repository and tests folder go on PYTHONPATH first so Ray workers import
    ``pipeline_graph``/``deployments`` and test helper modules by name.
    """
    import ray
    from ray import serve

    with patched_environ({"PYTHONPATH": source_pythonpath()}):
        port = free_port()
        ray.init(num_cpus=num_cpus, include_dashboard=False, namespace=namespace, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            yield f"http://127.0.0.1:{port}", tmp_dir
        finally:
            serve.shutdown()
            ray.shutdown()
