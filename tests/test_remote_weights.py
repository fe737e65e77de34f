"""Weights from ``s3://``: tiny weights uploaded to a moto server over real HTTP, mirrored
into a node-local cache by two processes at once (one downloads, the other waits and finds
them), verified, discovered and used for a tiny generation."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import patched_environ

from multitalk.checkpoints import remote
from multitalk.checkpoints.discovery import find_checkpoints

pytestmark = [pytest.mark.subprocess, pytest.mark.timeout(180)]  # two mirroring processes
ROOT = Path(__file__).resolve().parents[1]
BUCKET = "mt-weights"
PREFIX = "models/v1"
PART = 64 << 10  # 64 KiB ranges: every shard above that size comes down in several GETs


@pytest.fixture(scope="module")
def moto_endpoint(moto_endpoint):
    """conftest's moto server, with the region and endpoint in the environment: what
    ``remote.s3_client`` reads (and the subprocesses inherit)."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per ranged GET otherwise
    with patched_environ({"AWS_REGION": "eu-west-1", "AWS_ENDPOINT_URL": moto_endpoint}):
        yield moto_endpoint


@pytest.fixture(scope="module")
def uploaded(moto_endpoint, tiny_official):
    """The tiny set under s3://mt-weights/models/v1, the VAE as a multipart upload (ETag "-N")
    and a SHA256SUMS manifest for every file."""
    import boto3
    from boto3.s3.transfer import TransferConfig

    s3 = boto3.client("s3", region_name="eu-west-1", endpoint_url=moto_endpoint)
    s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    files = sorted(p for p in Path(tiny_official).rglob("*") if p.is_file())
    sums = []
    import moto.s3.models as moto_s3

    min_part = moto_s3.S3_UPLOAD_PART_MIN_SIZE
    moto_s3.S3_UPLOAD_PART_MIN_SIZE = 256  # S3 wants parts >= 5 MiB; the tiny VAE is 3.7 MB
    try:
        for p in files:
            rel = p.relative_to(tiny_official).as_posix()
            # The VAE as a multipart upload (ETag "<md5 of md5s>-N": size + sha256 checks only).
            chunk = (1 << 20) if p.name == "Wan2.1_VAE.pth" else (64 << 20)
            cfg = TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk, use_threads=False)
            s3.upload_file(str(p), BUCKET, f"{PREFIX}/{rel}", Config=cfg)
            sums.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {rel}")
    finally:
        moto_s3.S3_UPLOAD_PART_MIN_SIZE = min_part
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{remote.MANIFEST}", Body=("\n".join(sums) + "\n").encode())
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/empty-folder/", Body=b"")  # console-made "folder": ignored
    etags = {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX)["Contents"]}
    return {"local": Path(tiny_official), "files": files, "etags": etags, "url": f"s3://{BUCKET}/{PREFIX}"}


def _same_tree(a: Path, b: Path):
    rels = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    for rel in rels:
        assert (b / rel).read_bytes() == (a / rel).read_bytes(), rel
    return rels


def test_local_path_is_returned_as_is(tmp_path):
    assert remote.resolve_models_root(str(tmp_path), tmp_path / "cache") == str(tmp_path)
    assert remote.resolve_models_root("/runpod-volume/models") == "/runpod-volume/models"
    assert remote.parse_s3_url("s3://b/a/b/") == ("b", "a/b")
    with pytest.raises(ValueError):
        remote.parse_s3_url("s3://b/../x")


def test_two_processes_mirror_once(uploaded, tmp_path):
    """Two `warm` processes at once: both succeed, one downloads, the other waits and finds
    the complete mirror; files identical to the source; then discovery sees a MultiTalk set."""
    assert any("-" in e for e in uploaded["etags"].values()), "expected one multipart object"
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "multitalk.checkpoints.remote", "warm", uploaded["url"], "--cache", str(cache),
           "--workers", "4", "--part-size-mb", str(PART / 2**20)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    stats = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    n = len(uploaded["files"]) + 1  # + SHA256SUMS
    downloaders = [s for s in stats if s["downloaded_files"]]
    assert len(downloaders) == 1, stats
    assert downloaders[0]["downloaded_files"] == n and downloaders[0]["get_requests"] > n  # ranged GETs
    assert downloaders[0]["verified"]["sha256"] == n - 1 and downloaders[0]["verified"]["md5"] >= n - 1
    other = next(s for s in stats if s is not downloaders[0])
    assert other["cached"] and other["downloaded_files"] == 0 and other["files"] == n
    # The log says what came from where and how long it took.
    log = "".join(err for _, err in outs)
    assert f"mirrored {uploaded['url']} -> " in log and "GiB in" in log

    mirror = Path(stats[0]["path"])
    assert mirror == remote.mirror_path(uploaded["url"], cache)
    _same_tree(uploaded["local"], mirror)
    assert not list(mirror.rglob(".*.part-*")) and not (mirror / remote.PARTIAL).exists()
    assert (mirror / remote.MARKER).is_file() and not (mirror / "empty-folder").exists()
    assert find_checkpoints(mirror).kind == "multitalk"

    assert remote.mirrored_path(uploaded["url"], cache) == str(mirror)
    assert remote.mirrored_path(uploaded["url"], tmp_path / "elsewhere") is None
    # A third call returns from the marker without any S3 request.
    again = remote.mirror(uploaded["url"], cache, client=object())
    assert again.cached and again.downloaded_files == 0


def test_threads_share_the_lock_and_resume(uploaded, tmp_path):
    """Two threads in one process serialise on the flock too; a changed object is fetched
    again on refresh, unchanged ones are not."""
    cache = tmp_path / "cache"
    results, errors = [], []

    def run():
        try:
            results.append(remote.mirror(uploaded["url"], cache, workers=3, part_size=PART))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(r.downloaded_files for r in results)[0] == 0 and sum(r.cached for r in results) == 1

    import boto3

    s3 = boto3.client("s3", region_name="eu-west-1")
    key = f"{PREFIX}/TINY_RANDOM_WEIGHTS.txt"
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"changed\n")
    try:
        # The manifest now disagrees with the changed object: verification must catch it.
        with pytest.raises(remote.RemoteWeightsError, match="sha256"):
            remote.mirror(uploaded["url"], cache, refresh=True, part_size=PART)
    finally:
        s3.upload_file(str(uploaded["local"] / "TINY_RANDOM_WEIGHTS.txt"), BUCKET, key)
    mirror = remote.mirror_path(uploaded["url"], cache)
    assert not (mirror / remote.MARKER).exists()  # incomplete after the failure
    stats = remote.mirror(uploaded["url"], cache, refresh=True, part_size=PART)
    assert stats.downloaded_files == 1 and stats.skipped_files == stats.files - 1
    _same_tree(uploaded["local"], mirror)


def test_corrupt_download_is_refused(uploaded, tmp_path):
    """A body that differs from the object (same size, one bit flipped in every GET of a
    config.json, past the transfer manager) fails the ETag/SHA check; nothing is left in place."""
    import io

    from botocore.response import StreamingBody

    client = remote.s3_client()

    def mark(params=None, context=None, **kwargs):  # the request's context travels to after-call
        context["corrupt"] = params["Key"].endswith("config.json")

    def corrupt(parsed=None, context=None, **kwargs):
        if context.get("corrupt") and parsed.get("Body") is not None:
            data = parsed["Body"].read()
            parsed["Body"] = StreamingBody(io.BytesIO(bytes([data[0] ^ 1]) + data[1:]), len(data))

    client.meta.events.register("before-parameter-build.s3.GetObject", mark)
    client.meta.events.register("after-call.s3.GetObject", corrupt)
    cache = tmp_path / "cache"
    with pytest.raises(remote.RemoteWeightsError, match="config.json"):
        remote.mirror(uploaded["url"], cache, client=client, part_size=PART)
    mirror = remote.mirror_path(uploaded["url"], cache)
    assert not (mirror / remote.MARKER).exists() and not list(mirror.rglob(".*.part-*"))


def test_downloads_go_through_the_transfer_manager(uploaded, tmp_path, monkeypatch):
    """Every object comes down through boto3's ``download_file`` with one TransferConfig
    (ranges of the part size, several at once), not through a downloader of our own."""
    calls = []
    client = remote.s3_client()
    real = client.download_file

    def download_file(bucket, key, filename, Config=None, **kw):
        calls.append((key, Config))
        return real(bucket, key, filename, Config=Config, **kw)

    monkeypatch.setattr(client, "download_file", download_file)
    stats = remote.mirror(uploaded["url"], tmp_path / "cache", client=client, workers=3, part_size=PART)
    assert sorted(k for k, _ in calls) == sorted(k for k in uploaded["etags"] if not k.endswith("/"))
    assert stats.downloaded_files == len(calls)
    config = calls[0][1]
    assert config.multipart_chunksize == PART and config.multipart_threshold == PART and config.max_concurrency == 3
    assert stats.get_requests > len(calls)  # the shards above PART came down in several ranged GETs


@pytest.mark.slow
def test_generate_from_the_mirror(uploaded, tmp_path, fixtures_dir):
    from multitalk.api import GenerationRequest, SamplingOptions
    from multitalk.pipeline import MultiTalkPipeline
    from multitalk.utils.video import probe_mp4

    root = remote.resolve_models_root(uploaded["url"], tmp_path / "cache")
    assert Path(root).is_dir() and find_checkpoints(root).kind == "multitalk"
    pipe = MultiTalkPipeline.from_pretrained(root)
    req = GenerationRequest(image=(fixtures_dir / "single" / "single1.png").read_bytes(),
                            audio=[(fixtures_dir / "single" / "1.wav").read_bytes()], prompt="a person talking",
                            size="multitalk-128", frames=17, sampling=SamplingOptions(steps=1), color_correction=0.0)
    result = pipe.generate(req)
    info = probe_mp4(result.video)
    assert info["num_frames"] == 17 and result.lip_sync
