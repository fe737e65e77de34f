"""Storage: local path safety, S3 against a real moto server over HTTP, input references."""
from __future__ import annotations

import os
import urllib.request

import pytest
from fakes import make_bucket

from deployments.storage import (
    LocalStore,
    NotFound,
    S3Store,
    check_input,
    resolve_input,
    store_from_env,
    validate_key,
)
from multitalk.api import InputError

BAD_KEYS = [
    "",
    "../etc/passwd",
    "a/../../b",
    "a/./b",
    "a//b",
    "/etc/passwd",
    "~/x",
    "C:/windows",
    "a\\..\\b",
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e/secret",
    "a/%2E%2E/b",
    "x\x00y",
    "a/..",
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_validate_key_rejects(key):
    with pytest.raises(InputError) as e:
        validate_key(key, "audio_1")
    assert e.value.field == "audio_1"
    assert e.value.status in (400, 422)


@pytest.mark.parametrize("key", ["1.wav", "inputs/a b.png", "outputs/x.mp4", "a..b/c.wav", "ünï.wav"])
def test_validate_key_accepts(key):
    assert validate_key(key) == key


def test_local_store_roundtrip(tmp_path):
    store = LocalStore(tmp_path / "root")
    store.put("inputs/a.wav", b"abc", "audio/wav")
    store.put("jobs/1.json", b"{}")
    assert store.get("inputs/a.wav") == b"abc"
    assert store.exists("inputs/a.wav") and not store.exists("inputs/b.wav")
    assert store.list("inputs/") == ["inputs/a.wav"]
    assert store.list("") == ["inputs/a.wav", "jobs/1.json"]
    assert store.list("jo") == ["jobs/1.json"]
    assert b"".join(store.stream("inputs/a.wav", 2)) == b"abc"
    assert store.presigned_url("inputs/a.wav").startswith("file://")
    store.delete("inputs/a.wav")
    store.delete("inputs/a.wav")  # deleting twice is fine
    with pytest.raises(NotFound):
        store.get("inputs/a.wav")
    # No temp files left behind by the atomic writes.
    assert not [p for p in (tmp_path / "root").rglob(".tmp-*")]


@pytest.mark.parametrize("key", BAD_KEYS[1:])
def test_local_store_rejects_traversal(tmp_path, key):
    (tmp_path / "secret").write_bytes(b"s")
    store = LocalStore(tmp_path / "root")
    with pytest.raises(InputError):
        store.get(key)
    with pytest.raises(InputError):
        store.put(key, b"x")


def test_local_store_rejects_symlink_escape(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.wav").write_bytes(b"secret")
    store = LocalStore(tmp_path / "root")
    os.symlink(outside, tmp_path / "root" / "link")
    os.symlink(outside / "secret.wav", tmp_path / "root" / "file.wav")
    for key in ("link/secret.wav", "file.wav"):
        with pytest.raises(InputError):
            store.get(key)
        with pytest.raises(InputError) as e:
            resolve_input(key, store, "audio_1")
        assert e.value.field == "audio_1"
    with pytest.raises(InputError):
        store.put("link/new.wav", b"x")
    assert not (outside / "new.wav").exists()


def test_local_store_allows_symlink_inside(tmp_path):
    store = LocalStore(tmp_path / "root")
    store.put("inputs/real.wav", b"r")
    os.symlink(tmp_path / "root" / "inputs" / "real.wav", tmp_path / "root" / "alias.wav")
    assert store.get("alias.wav") == b"r"


def test_resolve_input_local(tmp_path):
    store = LocalStore(tmp_path)
    store.put("1.wav", b"one")
    store.put("inputs/multi1.png", b"png")
    assert resolve_input("1.wav", store, "audio_1") == b"one"
    assert resolve_input("multi1.png", store, "condition_image") == b"png"  # found under inputs/
    assert check_input("multi1.png", store, "condition_image") == "inputs/multi1.png"
    assert resolve_input(b"raw", store, "audio_1") == b"raw"
    with pytest.raises(InputError) as e:
        resolve_input("missing.wav", store, "audio_2")
    assert e.value.field == "audio_2" and e.value.status == 404 and "missing.wav" in e.value.message
    for ref in ("../1.wav", "/etc/passwd", "http://example.com/a.wav", "file:///etc/passwd", "s3://b/k"):
        with pytest.raises(InputError) as e:
            resolve_input(ref, store, "audio_1")
        assert e.value.field == "audio_1"
    with pytest.raises(InputError):
        resolve_input(b"", store, "audio_1")


def test_store_from_env(tmp_path):
    local = store_from_env({"MULTITALK_STORE_DIR": str(tmp_path / "s")})
    assert isinstance(local, LocalStore) and local.root == (tmp_path / "s").resolve()
    s3 = store_from_env({"AWS_S3_BUCKET_NAME": "b", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert isinstance(s3, S3Store) and s3.bucket == "b" and s3.region == "eu-west-1"
    assert s3.client.meta.config.retries["mode"] == "standard"


# --- S3 against a moto server over real HTTP -----------------------------------------


def test_s3_store_roundtrip(moto_endpoint):
    make_bucket(moto_endpoint, "mt-store")
    store = S3Store("mt-store", endpoint_url=moto_endpoint, prefix="svc")
    store.put("inputs/1.wav", b"RIFF", "audio/wav")
    store.put("jobs/a.json", b"{}", "application/json")
    assert store.get("inputs/1.wav") == b"RIFF"
    assert store.exists("inputs/1.wav") and not store.exists("inputs/2.wav")
    assert store.list("inputs/") == ["inputs/1.wav"]
    assert store.list() == ["inputs/1.wav", "jobs/a.json"]
    assert b"".join(store.stream("inputs/1.wav")) == b"RIFF"
    # The prefix is applied to the real bucket keys.
    assert store.client.head_object(Bucket="mt-store", Key="svc/inputs/1.wav")["ContentLength"] == 4
    url = store.presigned_url("inputs/1.wav", 60)
    assert "X-Amz-Signature" in url
    with urllib.request.urlopen(url) as resp:  # the presigned URL really works
        assert resp.read() == b"RIFF"
    with pytest.raises(NotFound):
        store.get("inputs/none.wav")
    store.delete("inputs/1.wav")
    assert not store.exists("inputs/1.wav")
    with pytest.raises(InputError):
        store.put("../escape", b"x")


def test_s3_resolve_input(moto_endpoint):
    make_bucket(moto_endpoint, "mt-inputs")
    make_bucket(moto_endpoint, "mt-other")
    make_bucket(moto_endpoint, "mt-forbidden")
    store = S3Store("mt-inputs", endpoint_url=moto_endpoint)
    store.put("1.wav", b"one")
    store.put("inputs/multi1.png", b"png")
    store.client.put_object(Bucket="mt-other", Key="a/2.wav", Body=b"two")
    store.client.put_object(Bucket="mt-forbidden", Key="x.wav", Body=b"no")

    assert resolve_input("1.wav", store, "audio_1") == b"one"
    assert resolve_input("multi1.png", store, "condition_image") == b"png"
    assert resolve_input("s3://mt-inputs/1.wav", store, "audio_1") == b"one"
    assert resolve_input("s3://mt-other/a/2.wav", store, "audio_2", allowed_buckets=("mt-other",)) == b"two"
    with pytest.raises(InputError) as e:
        resolve_input("s3://mt-forbidden/x.wav", store, "audio_2")
    assert e.value.field == "audio_2" and e.value.status == 403
    with pytest.raises(InputError) as e:
        resolve_input("s3://mt-inputs/nope.wav", store, "audio_1")
    assert e.value.status == 404
    with pytest.raises(InputError) as e:
        resolve_input("nope.wav", store, "audio_1")
    assert e.value.status == 404 and "nope.wav" in e.value.message
    with pytest.raises(InputError):
        resolve_input("s3://mt-inputs/../secret", store, "audio_1")


def test_files_are_stored_without_reading_them_whole(tmp_path, moto_endpoint):
    """A finished video goes up from its file: locally copied into place, to S3 through the
    transfer manager as a multipart upload (three 5 MiB parts here), content type kept."""
    data = os.urandom(11 << 20)
    path = tmp_path / "video.mp4"
    path.write_bytes(data)
    local = LocalStore(tmp_path / "store")
    local.put_file("outputs/a.mp4", str(path), "video/mp4")
    assert local.get("outputs/a.mp4") == data and not list((tmp_path / "store" / "outputs").glob(".tmp-*"))

    make_bucket(moto_endpoint, "mt-files")
    store = S3Store("mt-files", endpoint_url=moto_endpoint, prefix="svc", multipart_threshold=5 << 20,
                    multipart_chunksize=5 << 20)
    calls = []
    store.client.meta.events.register("before-call.s3", lambda model, **kw: calls.append(model.name))
    store.put_file("outputs/a.mp4", str(path), "video/mp4")
    assert calls.count("CreateMultipartUpload") == 1 and calls.count("UploadPart") == 3
    assert calls.count("CompleteMultipartUpload") == 1 and "PutObject" not in calls
    head = store.client.head_object(Bucket="mt-files", Key="svc/outputs/a.mp4")
    assert head["ContentType"] == "video/mp4" and store.get("outputs/a.mp4") == data


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_conditional_writes(kind, tmp_path, request):
    """put_if: create-if-absent, then only over the version read; a delete counts as a write."""
    if kind == "local":
        store, other = LocalStore(tmp_path / "s"), LocalStore(tmp_path / "s")
    else:
        endpoint = request.getfixturevalue("moto_endpoint")
        make_bucket(endpoint, "mt-conditional")
        store, other = (S3Store("mt-conditional", endpoint_url=endpoint, prefix="svc") for _ in range(2))
    v1 = store.put_if("jobs/a.json", b"1", if_version=None)
    assert v1 is not None and other.put_if("jobs/a.json", b"x", if_version=None) is None
    assert other.get_versioned("jobs/a.json") == (b"1", v1) and store.version("jobs/a.json") == v1
    v2 = other.put_if("jobs/a.json", b"2", if_version=v1)
    assert v2 is not None and v2 != v1
    assert store.put_if("jobs/a.json", b"3", if_version=v1) is None and store.get("jobs/a.json") == b"2"
    v3 = store.put_versioned("jobs/a.json", b"3")
    assert other.put_if("jobs/a.json", b"4", if_version=v2) is None and store.version("jobs/a.json") == v3
    store.delete("jobs/a.json")
    assert store.version("jobs/a.json") is None and other.put_if("jobs/a.json", b"5", if_version=v3) is None
    assert store.list("jobs/") == [] and store.version("jobs/missing.json") is None
    with pytest.raises(NotFound):
        store.get_versioned("jobs/missing.json")
