"""Model weights from an ``s3://bucket/prefix``: mirrored once into a node-local cache.

The loaders (``modules/loading.py``) read local files shard by shard through
memory maps; object storage cannot be memory-mapped, so a models root given as an S3 URL
is first mirrored to local disk and the local mirror is what the loaders see::

    root = resolve_models_root("s3://my-bucket/models", "~/.cache/multitalk")
    # -> "~/.cache/multitalk/s3/my-bucket/models" (expanded), complete and verified

How:

* list the objects under the prefix (``list_objects_v2``, paginated);
* download each one with boto3's transfer manager (``download_file`` with a
  ``TransferConfig``: parallel ranged GETs of ``part_size``, retries of broken streams,
  ``IfMatch`` on every range, a temp file renamed when complete; small objects are one
  GET) into a temp name next to the target, verify it, then ``fsync`` + atomic ``os.replace``;
* verify every file: its size, the ETag when it is a plain MD5 (single-part upload,
  not SSE-KMS), and the SHA-256 when the prefix holds a ``SHA256SUMS`` manifest
  (``sha256sum`` output format: ``<hex>  <relative path>``);
* a ``fcntl.flock`` on a lock file beside the mirror serialises processes (and threads):
  the second one waits, then finds the completion marker and downloads nothing;
* a completion marker (``.multitalk-mirror.json``) records the source, the objects
  (size, ETag) and the timing. With the marker present, later calls return at once
  without touching S3 (``refresh=True`` re-lists and fetches what changed);
* an interrupted mirror resumes: files already in place with the right size and ETag
  (recorded per file in ``.multitalk-mirror.partial.json``) are not fetched again.

boto3 is configured from the environment: ``AWS_REGION`` / ``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (MinIO, moto, ...), the standard credential
chain (env keys, instance profile, IRSA), botocore *standard* retries; the transfer
manager retries reads that break mid-body (``num_download_attempts``).

Command line (cluster ``setup_commands`` warm the cache before Serve starts)::

    python -m multitalk.checkpoints.remote warm s3://bucket/prefix [--cache DIR] [--workers 16]
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Optional

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/multitalk"
MARKER = ".multitalk-mirror.json"
PARTIAL = ".multitalk-mirror.partial.json"
MANIFEST = "SHA256SUMS"
DEFAULT_WORKERS = 16
DEFAULT_PART_SIZE = 64 << 20  # 64 MiB ranges: ~150 GETs for the 9.9 GB adapter
_READ_CHUNK = 4 << 20
_PART_ATTEMPTS = 5  # the transfer manager's attempts per range (a body that breaks mid-read)


class RemoteWeightsError(RuntimeError):
    """The S3 mirror could not be made (listing, download or verification failed)."""


def is_remote(root: Optional[str]) -> bool:
    return bool(root) and str(root).startswith("s3://")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ``("bucket", "some/prefix")``."""
    if not is_remote(url):
        raise ValueError(f"not an s3:// URL: {url!r}")
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}")
    prefix = prefix.strip("/")
    if any(p in (".", "..") for p in prefix.split("/") if prefix):
        raise ValueError(f"prefix of {url!r} must not contain '.' or '..'")
    return bucket, prefix


def mirror_path(url: str, cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """Where ``url`` is mirrored: ``<cache>/s3/<bucket>/<prefix>``."""
    bucket, prefix = parse_s3_url(url)
    base = Path(cache_dir or os.environ.get("MULTITALK_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser()
    return base / "s3" / bucket / prefix if prefix else base / "s3" / bucket


def s3_client(max_pool_connections: int = DEFAULT_WORKERS + 4, max_attempts: int = 10):
    """A boto3 S3 client from the environment, with botocore standard retries."""
    import boto3
    from botocore.config import Config

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    return boto3.client(
        "s3",
        region_name=region,
        endpoint_url=endpoint,
        config=Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            max_pool_connections=max_pool_connections,
            connect_timeout=10,
            read_timeout=60,
            signature_version="s3v4",
        ),
    )


@dataclass
class _Object:
    key: str
    rel: str
    size: int
    etag: str
    sha256: Optional[str] = None


@dataclass
class MirrorStats:
    """What one call did (``downloaded_files == 0`` when the mirror was already there)."""

    source: str
    path: str
    files: int = 0
    bytes: int = 0
    downloaded_files: int = 0
    downloaded_bytes: int = 0
    skipped_files: int = 0
    seconds: float = 0.0
    waited_s: float = 0.0
    cached: bool = False
    get_requests: int = 0
    verified: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _safe_rel(rel: str) -> str:
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")) or "\\" in rel:
        raise RemoteWeightsError(f"refusing object key that would leave the mirror: {rel!r}")
    return rel


def _list(client, bucket: str, prefix: str) -> list[_Object]:
    from botocore.exceptions import ClientError

    start = prefix + "/" if prefix else ""
    out = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start):
            for o in page.get("Contents", []):
                key = o["Key"]
                if key.endswith("/"):  # "folder" placeholder objects
                    continue
                out.append(_Object(key, _safe_rel(key[len(start):]), int(o["Size"]), str(o.get("ETag", "")).strip('"')))
    except ClientError as e:
        raise RemoteWeightsError(f"cannot list s3://{bucket}/{start}: {e}") from e
    if not out:
        raise RemoteWeightsError(f"no objects under s3://{bucket}/{start}")
    return sorted(out, key=lambda o: o.rel)


def _read_manifest(client, bucket: str, objects: list[_Object]) -> None:
    """Attach SHA-256 sums from a ``SHA256SUMS`` object at the prefix root, if there is one."""
    man = next((o for o in objects if o.rel == MANIFEST), None)
    if man is None:
        return
    body = client.get_object(Bucket=bucket, Key=man.key)["Body"].read().decode()
    sums = {}
    for line in body.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        name = name.strip().lstrip("*").removeprefix("./")
        sums[name] = digest.lower()
    for o in objects:
        o.sha256 = sums.get(o.rel)


def _is_plain_md5(etag: str) -> bool:
    return len(etag) == 32 and "-" not in etag and all(c in "0123456789abcdef" for c in etag.lower())


class _Downloader:
    """boto3's transfer manager (``download_file`` with a :class:`TransferConfig`: parallel
    ranged GETs of ``part_size``, its own retries of broken streams, a temp file renamed when
    complete, ``IfMatch`` on every range so an object changed mid-download fails), then our
    checks before the file takes its place in the mirror."""

    def __init__(self, client, bucket: str, dest: Path, workers: int, part_size: int):
        from boto3.s3.transfer import TransferConfig

        self.client, self.bucket, self.dest = client, bucket, dest
        part_size = max(int(part_size), 1 << 10)
        self.config = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size,
                                     max_concurrency=max(1, workers), num_download_attempts=_PART_ATTEMPTS,
                                     use_threads=True, preferred_transfer_client="classic")
        self.get_requests = 0
        self.kms: set[str] = set()
        self._current = ""
        self._lock = threading.Lock()
        # Counted and inspected through botocore's events: the transfer manager makes the calls.
        events = client.meta.events
        events.register("before-call.s3.GetObject", self._count_get)
        events.register("after-call.s3.HeadObject", self._note_encryption)

    def close(self) -> None:
        events = self.client.meta.events
        events.unregister("before-call.s3.GetObject", self._count_get)
        events.unregister("after-call.s3.HeadObject", self._note_encryption)

    def _count_get(self, **kwargs) -> None:
        with self._lock:
            self.get_requests += 1

    def _note_encryption(self, parsed=None, **kwargs) -> None:
        """The transfer manager's HeadObject of the object being fetched (one at a time)."""
        if parsed and parsed.get("ServerSideEncryption") == "aws:kms":  # the ETag is then no MD5
            with self._lock:
                self.kms.add(self._current)

    def fetch(self, objects: list[_Object], on_done) -> None:
        """Download ``objects`` one after another (each over ``workers`` ranges); ``on_done(obj)``
        after each is verified and in place. Nothing half-written is ever left at a target name."""
        from botocore.exceptions import BotoCoreError, ClientError

        for obj in objects:
            target = self.dest / obj.rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".{target.name}.part-{os.getpid()}-{threading.get_ident()}"
            try:
                self._current = obj.key
                try:
                    self.client.download_file(self.bucket, obj.key, str(tmp), Config=self.config)
                except ClientError as e:
                    code = str(e.response.get("Error", {}).get("Code", ""))
                    if code in ("PreconditionFailed", "412"):
                        raise RemoteWeightsError(f"{obj.key} changed in the bucket while it was being mirrored") from e
                    raise RemoteWeightsError(f"cannot read s3://{self.bucket}/{obj.key}: {e}") from e
                except (BotoCoreError, OSError) as e:  # retries spent on a broken connection
                    raise RemoteWeightsError(f"download of s3://{self.bucket}/{obj.key} failed: {e}") from e
                self._verify(obj, tmp)
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
                on_done(obj)
            finally:
                tmp.unlink(missing_ok=True)

    def _verify(self, obj: _Object, tmp: Path) -> None:
        size = tmp.stat().st_size
        if size != obj.size:
            raise RemoteWeightsError(f"{obj.key}: size {size} != {obj.size} listed")
        check_md5 = _is_plain_md5(obj.etag) and obj.key not in self.kms
        if not (check_md5 or obj.sha256):
            return
        md5 = hashlib.md5() if check_md5 else None
        sha = hashlib.sha256() if obj.sha256 else None
        with open(tmp, "rb") as f:
            while chunk := f.read(_READ_CHUNK):
                if md5 is not None:
                    md5.update(chunk)
                if sha is not None:
                    sha.update(chunk)
        if sha is not None and sha.hexdigest() != obj.sha256:
            raise RemoteWeightsError(f"{obj.key}: sha256 {sha.hexdigest()} != {obj.sha256} (SHA256SUMS)")
        if md5 is not None and md5.hexdigest() != obj.etag.lower():
            raise RemoteWeightsError(f"{obj.key}: MD5 {md5.hexdigest()} != ETag {obj.etag}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _lock(lock_path: Path, timeout: Optional[float]):
    """Open and exclusively flock ``lock_path``; returns (file, seconds waited)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock_path, "a")
    t0 = time.monotonic()
    logged = 0.0
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f, time.monotonic() - t0
        except BlockingIOError:
            waited = time.monotonic() - t0
            if timeout is not None and waited > timeout:
                f.close()
                raise TimeoutError(f"waited {waited:.0f}s for {lock_path} (another mirror in progress)")
            if waited - logged >= 30 or logged == 0.0:
                logger.info("another process is mirroring into %s; waiting (%.0fs)", lock_path.parent, waited)
                logged = waited or 1e-9
            time.sleep(0.2)


def mirror(url: str, cache_dir: Optional[str | os.PathLike] = None, *, client=None, workers: int = DEFAULT_WORKERS,
           part_size: int = DEFAULT_PART_SIZE, refresh: bool = False,
           lock_timeout: Optional[float] = None) -> MirrorStats:
    """Mirror ``url`` into the cache (once per node) and report what happened.
    (One locked transaction (lock, list, verify, download in parallel, verify, rename): split, the lock and the temp folder would have to travel between the parts.)
    """
    t0 = time.monotonic()
    bucket, prefix = parse_s3_url(url)
    dest = mirror_path(url, cache_dir)
    stats = MirrorStats(source=url, path=str(dest))
    marker = dest / MARKER

    def finish_cached(info: dict) -> MirrorStats:
        stats.cached = True
        stats.files = len(info.get("objects", {}))
        stats.bytes = int(info.get("bytes", 0))
        stats.seconds = time.monotonic() - t0
        return stats

    if not refresh and marker.is_file():
        return finish_cached(_read_json(marker))

    lock_file, stats.waited_s = _lock(dest.parent / f".{dest.name}.lock", lock_timeout)
    try:
        if not refresh and marker.is_file():  # someone else finished while we waited
            logger.info("%s was mirrored by another process while this one waited %.1fs", url, stats.waited_s)
            return finish_cached(_read_json(marker))
        dest.mkdir(parents=True, exist_ok=True)
        for stale in dest.rglob(".*.part-*"):  # left by a process that died holding the lock
            stale.unlink(missing_ok=True)
        client = client or s3_client(max_pool_connections=workers + 4)
        objects = _list(client, bucket, prefix)
        _read_manifest(client, bucket, objects)
        stats.files = len(objects)
        stats.bytes = sum(o.size for o in objects)

        done = _read_json(dest / PARTIAL).get("objects", {}) if (dest / PARTIAL).is_file() else {}
        if refresh and marker.is_file():
            done = {**_read_json(marker).get("objects", {}), **done}
        todo = []
        for o in objects:
            prev = done.get(o.rel)
            local = dest / o.rel
            if prev and prev.get("etag") == o.etag and prev.get("size") == o.size and local.is_file() \
                    and local.stat().st_size == o.size:
                stats.skipped_files += 1
            else:
                todo.append(o)
        record = {k: v for k, v in done.items() if k in {o.rel for o in objects} and k not in {o.rel for o in todo}}
        record_lock = threading.Lock()
        # What is already in place survives a failure of this run (the marker goes first).
        _write_json(dest / PARTIAL, {"source": url, "objects": record})
        marker.unlink(missing_ok=True)

        def on_done(o: _Object):
            with record_lock:
                record[o.rel] = {"size": o.size, "etag": o.etag, **({"sha256": o.sha256} if o.sha256 else {})}
                stats.downloaded_files += 1
                stats.downloaded_bytes += o.size
                _write_json(dest / PARTIAL, {"source": url, "objects": record})
            logger.info("mirrored %s (%.1f MiB)", o.key, o.size / 2**20)

        logger.info("mirroring %s -> %s: %d objects, %.2f GiB (%d already present)", url, dest, len(objects),
                    stats.bytes / 2**30, stats.skipped_files)
        need = sum(o.size for o in todo)
        free = shutil.disk_usage(dest).free
        if need > free:
            raise RemoteWeightsError(f"{dest} has {free / 2**30:.1f} GiB free, the mirror needs {need / 2**30:.1f} GiB more")
        dl = _Downloader(client, bucket, dest, workers, part_size)
        try:
            dl.fetch(todo, on_done)
        finally:
            dl.close()
        stats.get_requests = dl.get_requests
        stats.verified = {
            "size": len(objects),
            "md5": sum(1 for o in todo if _is_plain_md5(o.etag) and o.key not in dl.kms),
            "sha256": sum(1 for o in todo if o.sha256),
        }
        stats.seconds = time.monotonic() - t0
        _write_json(marker, {
            "source": url, "bucket": bucket, "prefix": prefix, "bytes": stats.bytes,
            "objects": {o.rel: record[o.rel] for o in objects},
            "completed_at": time.time(), "seconds": round(stats.seconds, 3),
            "downloaded_bytes": stats.downloaded_bytes, "host": os.uname().nodename, "pid": os.getpid(),
        })
        (dest / PARTIAL).unlink(missing_ok=True)
        rate = stats.downloaded_bytes / 2**20 / max(stats.seconds, 1e-6)
        logger.info("mirrored %s -> %s: downloaded %d files, %.2f GiB in %.1fs (%.0f MiB/s), %d GETs; %d already present",
                    url, dest, stats.downloaded_files, stats.downloaded_bytes / 2**30, stats.seconds, rate,
                    stats.get_requests, stats.skipped_files)
        return stats
    finally:
        fcntl.flock(lock_file, fcntl.LOCK_UN)
        lock_file.close()


def mirrored_path(url: str, cache_dir: Optional[str | os.PathLike] = None) -> Optional[str]:
    """The local mirror of ``url`` if it is complete on this node, else ``None`` (no S3
    request, no download: for reports on nodes that should not hold the weights)."""
    dest = mirror_path(url, cache_dir)
    return str(dest) if (dest / MARKER).is_file() else None


def resolve_models_root(root: str, cache_dir: Optional[str | os.PathLike] = None, **kw) -> str:
    """A local models root as is; an ``s3://bucket/prefix`` mirrored into ``cache_dir``
    (default ``$MULTITALK_CACHE_DIR`` or ``~/.cache/multitalk``) and its local path."""
    if not is_remote(root):
        return root
    return mirror(root, cache_dir, **kw).path


# --- command line -------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multitalk.checkpoints.remote",
                                     description="Mirror model weights from S3 into the node-local cache.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    warm = sub.add_parser("warm", help="mirror s3://bucket/prefix into the cache (no-op when already complete)")
    warm.add_argument("url", help="s3://bucket/prefix (a local path is accepted and left alone)")
    warm.add_argument("--cache", default=None, help="cache dir (default $MULTITALK_CACHE_DIR or ~/.cache/multitalk)")
    warm.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="parallel ranged GETs")
    warm.add_argument("--part-size-mb", type=float, default=DEFAULT_PART_SIZE / 2**20, help="bytes per ranged GET")
    warm.add_argument("--refresh", action="store_true", help="re-list and fetch objects that changed")
    warm.add_argument("--lock-timeout", type=float, default=None, help="give up waiting for another mirror after S")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("MULTITALK_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not is_remote(args.url):
        print(json.dumps({"source": args.url, "path": args.url, "local": True}))
        return 0
    try:
        stats = mirror(args.url, args.cache, workers=args.workers, part_size=int(args.part_size_mb * 2**20),
                       refresh=args.refresh, lock_timeout=args.lock_timeout)
    except (RemoteWeightsError, TimeoutError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(stats.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
