"""Object storage behind one small interface: a local folder or an S3 bucket.

The serving layer keeps three kinds of objects in the same store, side by side:

* ``inputs/...``          uploaded images and audio (and anything users put there)
* ``jobs/{id}.json``      job records (see ``jobs.py``)
* ``outputs/{id}.mp4``    finished videos

Job records are written conditionally (:meth:`Store.put_if`): a write names the version it
was based on (an S3 ETag, ``If-Match`` / ``If-None-Match``; a generation number kept beside
the file in a :class:`LocalStore`) and fails when another writer got there first, so two
ingress replicas never overwrite each other's record unnoticed (``deployments/jobs.py``).

Keys are always ``/``-separated relative names. Every key that comes from a user goes
through :func:`validate_key` first, and :class:`LocalStore` additionally checks the
*resolved* path, so neither ``..``, absolute paths, URL-encoded tricks nor symlinks can
reach outside the store's root.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import tempfile
import urllib.parse
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Protocol, runtime_checkable

from multitalk.api import InputError

logger = logging.getLogger(__name__)

DEFAULT_REGION = "eu-west-1"
DEFAULT_LOCAL_ROOT = "~/.cache/multitalk/store"
_MAX_KEY_LEN = 1024
# %xx escapes: keys are taken literally, so an encoded name is almost certainly an attempt
# to smuggle ``/`` or ``..`` past a naive check. Reject instead of guessing.
_PCT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_DRIVE = re.compile(r"^[A-Za-z]:")


class NotFound(KeyError):
    """The key does not exist in the store."""


def validate_key(key: str, field: str = "key") -> str:
    """Return ``key`` if it is a safe relative object key, else raise :class:`InputError`.

    Rejected: empty keys, absolute paths (``/x``, ``C:x``, ``~x``), ``.``/``..``/empty
    segments, backslashes, control characters, and %-escapes.
    """
    if not isinstance(key, str) or not key.strip():
        raise InputError(field, "empty file name or key")
    if len(key) > _MAX_KEY_LEN:
        raise InputError(field, f"key longer than {_MAX_KEY_LEN} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        raise InputError(field, "key contains control characters")
    if "\\" in key:
        raise InputError(field, "key contains a backslash")
    if _PCT_ESCAPE.search(key):
        raise InputError(field, "URL-encoded keys are not accepted; send the plain name")
    if key.startswith(("/", "~")) or _DRIVE.match(key):
        raise InputError(field, "absolute paths are not accepted; give a key relative to the store")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InputError(field, "key must not contain '.', '..' or empty path segments")
    return key


@runtime_checkable
class Store(Protocol):
    """What the serving layer needs from a blob store."""

    kind: str  # "local" | "s3"

    def get(self, key: str) -> bytes: ...

    def put(self, key: str, data: bytes, content_type: Optional[str] = None) -> None: ...

    def put_file(self, key: str, path: str, content_type: Optional[str] = None) -> None:
        """Store the file at ``path`` under ``key`` without reading it into memory whole
        (S3: a multipart upload for large files)."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int:
        """Bytes of the object at ``key`` without reading it (``NotFound`` if absent)."""
        ...

    def create(self, key: str, data: bytes, content_type: Optional[str] = None) -> bool:
        """Put only if ``key`` does not exist yet, atomically; ``False`` if it did.

        Several ingress replicas race for the same orphaned job through this: exactly one wins.
        """
        ...

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """The object and its version (``NotFound`` if absent): what :meth:`put_if` compares."""
        ...

    def version(self, key: str) -> Optional[str]:
        """The current version of ``key`` without reading it (``None`` if absent)."""
        ...

    def put_if(self, key: str, data: bytes, content_type: Optional[str] = None, *,
               if_version: Optional[str]) -> Optional[str]:
        """Write ``data`` only if ``key`` is still at ``if_version`` (``None``: only if it does
        not exist), atomically; the new version, or ``None`` when the condition failed."""
        ...

    def put_versioned(self, key: str, data: bytes, content_type: Optional[str] = None) -> str:
        """An unconditional write that returns the new version."""
        ...

    def presigned_url(self, key: str, expires: int = 3600) -> str: ...

    def list(self, prefix: str = "", start_after: Optional[str] = None, limit: Optional[int] = None) -> list[str]:
        """Keys under ``prefix`` in lexicographic order; only those after ``start_after``, at
        most ``limit`` of them (S3 serves such a page without listing the rest)."""
        ...

    def delete(self, key: str) -> None: ...

    def stream(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]: ...

    def describe(self) -> str: ...


# Beside a conditionally written file ``name``: ``.gen-name`` holds its generation number
# and is the lock every write of ``name`` takes (flock: also across processes on one host).
_GEN_PREFIX = ".gen-"
_HIDDEN_PREFIXES = (".tmp-", _GEN_PREFIX)


class LocalStore:
    """A folder on local disk. ``presigned_url`` gives a ``file://`` URL.

    Versions (:meth:`put_if`) are generation numbers kept in a small file beside the object,
    which is also the lock its writers take: a conditional write reads the generation,
    compares, writes and counts up under an exclusive ``flock``.
    """

    kind = "local"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """The file for ``key``; raises :class:`InputError` if it would leave the root.

        Checked on the resolved path, so a symlink inside the root pointing outside it
        is refused too (``Path.resolve`` follows links, also for missing leaf names).
        """
        validate_key(key)
        p = (self.root / key).resolve()
        if p != self.root and self.root not in p.parents:
            raise InputError("key", f"'{key}' resolves outside the store")
        return p

    def get(self, key: str) -> bytes:
        p = self.path(key)
        if not p.is_file():
            raise NotFound(key)
        return p.read_bytes()

    def stream(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        p = self.path(key)
        if not p.is_file():
            raise NotFound(key)

        def chunks() -> Iterator[bytes]:
            with open(p, "rb") as f:
                while block := f.read(chunk_size):
                    yield block

        return chunks()

    def _write(self, key: str, data: "bytes | Callable[[object], None]", place: Callable[[str, Path], None]) -> None:
        """Write ``data`` (bytes, or a function writing to the open file) to a temporary file
        beside ``key``'s, then ``place(tmp, path)`` it: readers (another ingress replica
        polling a job record) never see a half-written file."""
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                if callable(data):
                    data(f)
                else:
                    f.write(data)
            place(tmp, p)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:  # renamed into place
                pass

    def put(self, key: str, data: bytes, content_type: Optional[str] = None) -> None:
        p = self.path(key)
        if self._gen_path(p).exists():  # a versioned object: a plain write counts too
            self.put_versioned(key, data, content_type)
            return
        self._write(key, data, os.replace)

    def put_file(self, key: str, path: str, content_type: Optional[str] = None) -> None:
        import shutil

        def copy(target) -> None:
            with open(path, "rb") as source:
                shutil.copyfileobj(source, target, 1 << 20)

        self._write(key, copy, os.replace)

    # --- versions (generation numbers) ---------------------------------------------------
    @staticmethod
    def _gen_path(p: Path) -> Path:
        return p.with_name(_GEN_PREFIX + p.name)

    @contextlib.contextmanager
    def _generation(self, p: Path, exclusive: bool):
        """The lock on ``p``'s generation file, held while the body runs; yields its fd.
        Readers (shared lock) do not create it: an object never written with a version
        is at generation 0, and reading a missing key leaves nothing behind."""
        if exclusive:
            p.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self._gen_path(p), os.O_RDWR | (os.O_CREAT if exclusive else 0), 0o644)
        except FileNotFoundError:
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield fd
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _read_generation(fd: Optional[int]) -> int:
        raw = os.pread(fd, 32, 0).strip() if fd is not None else b""
        return int(raw) if raw else 0

    def _count_up(self, fd: int) -> str:
        generation = str(self._read_generation(fd) + 1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, generation.encode(), 0)
        return generation

    def _bump(self, key: str, fd: int, data: bytes) -> str:
        self._write(key, data, os.replace)
        return self._count_up(fd)

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        p = self.path(key)
        with self._generation(p, exclusive=False) as fd:
            return self.get(key), str(self._read_generation(fd))

    def version(self, key: str) -> Optional[str]:
        p = self.path(key)
        with self._generation(p, exclusive=False) as fd:
            return str(self._read_generation(fd)) if p.is_file() else None

    def put_if(self, key: str, data: bytes, content_type: Optional[str] = None, *,
               if_version: Optional[str]) -> Optional[str]:
        p = self.path(key)
        with self._generation(p, exclusive=True) as fd:
            current = str(self._read_generation(fd)) if p.is_file() else None
            if current != if_version:
                return None
            if if_version is None:  # link(): atomic against create() as well
                try:
                    self._write(key, data, os.link)
                except FileExistsError:
                    return None
                return self._count_up(fd)
            return self._bump(key, fd, data)

    def put_versioned(self, key: str, data: bytes, content_type: Optional[str] = None) -> str:
        p = self.path(key)
        with self._generation(p, exclusive=True) as fd:
            return self._bump(key, fd, data)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        path = self.path(key)
        if not path.is_file():
            raise NotFound(key)
        return path.stat().st_size

    def create(self, key: str, data: bytes, content_type: Optional[str] = None) -> bool:
        # link() fails if the name exists: creation is atomic, the first writer wins.
        try:
            self._write(key, data, os.link)
            return True
        except FileExistsError:
            return False

    def presigned_url(self, key: str, expires: int = 3600) -> str:
        return self.path(key).as_uri()

    def list(self, prefix: str = "", start_after: Optional[str] = None, limit: Optional[int] = None) -> list[str]:
        # Walk only the deepest folder the prefix names, like an S3 prefix listing.
        base = self.root
        if "/" in prefix:
            base = self.path(prefix.rsplit("/", 1)[0])
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(_HIDDEN_PREFIXES)]
            for name in filenames:
                if name.startswith(_HIDDEN_PREFIXES):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix) and (start_after is None or key > start_after):
                    keys.append(key)
        keys.sort()
        return keys if limit is None else keys[:limit]

    def delete(self, key: str) -> None:
        p = self.path(key)
        # A versioned object keeps its generation file (another process may hold its lock);
        # deleting counts as a write, so a conditional writer based on the old one fails.
        lock = self._generation(p, exclusive=True) if self._gen_path(p).exists() else contextlib.nullcontext()
        with lock as fd:
            try:
                p.unlink()
            except FileNotFoundError:
                return
            if fd is not None:
                self._count_up(fd)

    def describe(self) -> str:
        return str(self.root)


class S3Store:
    """An S3 bucket (or an S3-compatible endpoint such as MinIO or moto).

    ``prefix`` is prepended to every key, so several deployments can share a bucket.
    Retries use botocore's *standard* mode (exponential backoff on throttling and 5xx).
    Files (finished videos) go up through boto3's transfer manager: a multipart upload in
    ``multipart_chunksize`` parts once a file reaches ``multipart_threshold``, a few parts at
    a time (``upload_concurrency``), read from disk as they are sent.
    """

    kind = "s3"

    def __init__(
        self,
        bucket: str,
        region: str = DEFAULT_REGION,
        endpoint_url: Optional[str] = None,
        prefix: str = "",
        max_attempts: int = 4,
        client=None,
        multipart_threshold: int = 8 << 20,
        multipart_chunksize: int = 8 << 20,
        upload_concurrency: int = 4,
    ):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if not bucket:
            raise ValueError("S3Store needs a bucket name")
        self.bucket = bucket
        self.region = region or DEFAULT_REGION
        self.endpoint_url = endpoint_url or None
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.max_attempts = max_attempts
        self.client = client or boto3.client(
            "s3",
            region_name=self.region,
            endpoint_url=self.endpoint_url,
            config=Config(
                retries={"mode": "standard", "max_attempts": max_attempts},
                signature_version="s3v4",
            ),
        )
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize,
                                       max_concurrency=upload_concurrency)

    def _k(self, key: str) -> str:
        return self.prefix + validate_key(key)

    @staticmethod
    def _is_missing(err) -> bool:
        code = str(err.response.get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")

    def _get_object(self, key: str) -> dict:
        """``get_object`` with a missing key as :class:`NotFound`."""
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))
        except ClientError as e:
            if self._is_missing(e):
                raise NotFound(key) from None
            raise

    def get(self, key: str) -> bytes:
        return self._get_object(key)["Body"].read()

    def stream(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        return self._get_object(key)["Body"].iter_chunks(chunk_size)

    def put(self, key: str, data: bytes, content_type: Optional[str] = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, **extra)

    def put_file(self, key: str, path: str, content_type: Optional[str] = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        self.client.upload_file(path, self.bucket, self._k(key), ExtraArgs=extra or None, Config=self.transfer)

    def create(self, key: str, data: bytes, content_type: Optional[str] = None) -> bool:
        return self.put_if(key, data, content_type, if_version=None) is not None

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
            return True
        except NotFound:
            return False

    def size(self, key: str) -> int:
        return self.size_external(self.bucket, self._k(key))

    # --- versions (ETags) ---------------------------------------------------------------
    def get_versioned(self, key: str) -> tuple[bytes, str]:
        obj = self._get_object(key)
        return obj["Body"].read(), obj["ETag"]

    def version(self, key: str) -> Optional[str]:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._k(key))["ETag"]
        except ClientError as e:
            if self._is_missing(e):
                return None
            raise

    def put_if(self, key: str, data: bytes, content_type: Optional[str] = None, *,
               if_version: Optional[str]) -> Optional[str]:
        from botocore.exceptions import ClientError

        extra = {"ContentType": content_type} if content_type else {}
        condition = {"IfNoneMatch": "*"} if if_version is None else {"IfMatch": if_version}
        try:  # S3 conditional writes: 412 when the condition fails
            return self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, **condition,
                                          **extra)["ETag"]
        except ClientError as e:
            # 409 ConditionalRequestConflict: a concurrent conditional write to the same key
            # won; 404: If-Match on an object deleted meanwhile.
            if self._condition_failed(e) or (if_version is not None and self._is_missing(e)):
                return None
            raise

    def put_versioned(self, key: str, data: bytes, content_type: Optional[str] = None) -> str:
        extra = {"ContentType": content_type} if content_type else {}
        return self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, **extra)["ETag"]

    @staticmethod
    def _condition_failed(err) -> bool:
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = err.response.get("Error", {}).get("Code")
        return status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")

    def presigned_url(self, key: str, expires: int = 3600) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._k(key)}, ExpiresIn=int(expires)
        )

    def list(self, prefix: str = "", start_after: Optional[str] = None, limit: Optional[int] = None) -> list[str]:
        keys = []
        paginator = self.client.get_paginator("list_objects_v2")
        kwargs = {"StartAfter": self.prefix + start_after} if start_after else {}
        if limit is not None:
            kwargs["PaginationConfig"] = {"MaxItems": limit, "PageSize": min(limit, 1000)}
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix, **kwargs):
            for obj in page.get("Contents", []):
                keys.append(obj["Key"][len(self.prefix):])
        return sorted(keys)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._k(key))

    def get_external(self, bucket: str, key: str) -> bytes:
        """Read ``key`` (no prefix applied) from another allowed bucket with this client."""
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as e:
            if self._is_missing(e):
                raise NotFound(key) from None
            raise

    def exists_external(self, bucket: str, key: str) -> bool:
        try:
            self.size_external(bucket, key)
            return True
        except NotFound:
            return False

    def size_external(self, bucket: str, key: str) -> int:
        """Bytes of ``key`` (no prefix applied) in ``bucket``, from a HEAD request."""
        from botocore.exceptions import ClientError

        try:
            return int(self.client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        except ClientError as e:
            if self._is_missing(e):
                raise NotFound(key) from None
            raise

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def store_from_settings(settings: Optional[Mapping] = None, env: Optional[Mapping[str, str]] = None) -> Store:
    """Build the store from explicit settings, falling back to the environment.

    ``settings`` keys (all optional): ``bucket``, ``region``, ``endpoint_url``, ``prefix``,
    ``local_root``. Environment: ``AWS_S3_BUCKET_NAME``, ``AWS_REGION`` (default
    ``eu-west-1``), ``AWS_ENDPOINT_URL``, ``MULTITALK_S3_PREFIX``, ``MULTITALK_STORE_DIR``.
    Credentials are boto3's business (``AWS_ACCESS_KEY_ID`` ... or an instance role).
    """
    settings = dict(settings or {})
    env = os.environ if env is None else env
    bucket = settings.get("bucket") or env.get("AWS_S3_BUCKET_NAME")
    if bucket:
        return S3Store(
            bucket=bucket,
            region=settings.get("region") or env.get("AWS_REGION") or DEFAULT_REGION,
            endpoint_url=settings.get("endpoint_url") or env.get("AWS_ENDPOINT_URL") or None,
            prefix=settings.get("prefix") or env.get("MULTITALK_S3_PREFIX") or "",
        )
    root = settings.get("local_root") or env.get("MULTITALK_STORE_DIR") or DEFAULT_LOCAL_ROOT
    return LocalStore(root)


def store_from_env(env: Optional[Mapping[str, str]] = None) -> Store:
    """S3 when ``AWS_S3_BUCKET_NAME`` is set, else a :class:`LocalStore`."""
    return store_from_settings(None, env)


def parse_s3_url(ref: str, field: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(ref)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket or not key or parsed.query or parsed.fragment:
        raise InputError(field, f"'{ref}' is not an s3://bucket/key URL")
    return bucket, key


def allow_list_covers(allowed: tuple[str, ...], bucket: str, key: str) -> bool:
    """Whether an ``allowed_buckets`` entry covers ``s3://bucket/key``: an entry is a whole
    ``bucket`` or ``bucket/prefix``, the prefix a folder (``ext/pub`` covers ``pub/a.wav``,
    not ``public/a.wav``)."""
    for entry in allowed:
        name, _, prefix = entry.strip().strip("/").partition("/")
        if name == bucket and (not prefix or key.startswith(prefix.rstrip("/") + "/")):
            return True
    return False


def check_input(ref: str, store: Store, field: str, allowed_buckets: tuple[str, ...] = (),
                confine: Optional[Callable[[str], None]] = None) -> str:
    """Validate an input reference and check it exists; return the canonical reference.

    Accepted: ``s3://bucket/key`` inside the store's own bucket and prefix, or covered by an
    ``allowed_buckets`` entry (:func:`allow_list_covers`), or a key/simple file name in
    ``store`` (looked up as given, then under ``inputs/``). ``confine(key)`` sees every key
    inside this store (relative to its prefix) before its existence is checked, and raises
    to refuse it (``deployments.admission``: job records, other tenants' areas). Raises
    :class:`InputError` (422 bad reference, 403 not allowed, 404 missing).
    """
    if not isinstance(ref, str) or not ref.strip():
        raise InputError(field, "missing input reference")
    ref = ref.strip()
    confine = confine or (lambda key: None)
    scheme = urllib.parse.urlparse(ref).scheme.lower()
    if scheme == "s3":
        bucket, key = parse_s3_url(ref, field)
        validate_key(key, field)
        own = isinstance(store, S3Store) and bucket == store.bucket
        if own and key.startswith(store.prefix):
            confine(key[len(store.prefix):])
        elif not allow_list_covers(allowed_buckets, bucket, key):
            if own:
                raise InputError(field, f"'{ref}' is outside this service's prefix", 403)
            if any(entry.strip().strip("/").partition("/")[0] == bucket for entry in allowed_buckets):
                raise InputError(field, f"'{ref}' is outside the prefixes of bucket '{bucket}' this service "
                                        "reads from", 403)
            raise InputError(field, f"bucket '{bucket}' is not one this service reads from", 403)
        if not isinstance(store, S3Store):
            raise InputError(field, "s3:// references need an S3 store (set AWS_S3_BUCKET_NAME)")
        if not store.exists_external(bucket, key):
            raise InputError(field, f"'{ref}' not found", 404)
        return ref
    if scheme and len(scheme) > 1:  # one letter would be a Windows drive, caught below
        raise InputError(field, f"'{scheme}://' references are not accepted; use s3://bucket/key or a file name")
    validate_key(ref, field)
    try:
        for key in (ref, "inputs/" + ref):
            confine(key)
            if store.exists(key):
                return key
    except InputError as e:  # symlink escaping a LocalStore root: report the right field
        raise InputError(field, e.message, e.status) from None
    raise InputError(field, f"'{ref}' not found in {store.describe()}", 404)


def input_size(canonical: str, store: Store, field: str) -> int:
    """Bytes of an input (a reference :func:`check_input` returned), without reading it."""
    try:
        if canonical.startswith("s3://"):
            bucket, key = parse_s3_url(canonical, field)
            return store.size_external(bucket, key)  # type: ignore[union-attr]
        return store.size(canonical)
    except NotFound:
        raise InputError(field, f"'{canonical}' not found", 404) from None


def resolve_input(
    ref: str | bytes | bytearray | memoryview,
    store: Store,
    field: str = "input",
    allowed_buckets: tuple[str, ...] = (),
    confine: Optional[Callable[[str], None]] = None,
) -> bytes:
    """Fetch an input's bytes: uploaded bytes pass through, references are read from the
    store after the same checks as :func:`check_input`."""
    if isinstance(ref, (bytes, bytearray, memoryview)):
        if not len(ref):
            raise InputError(field, "empty upload")
        return bytes(ref)
    canonical = check_input(ref, store, field, allowed_buckets, confine)
    try:
        if canonical.startswith("s3://"):
            bucket, key = parse_s3_url(canonical, field)
            return store.get_external(bucket, key)  # type: ignore[union-attr]
        return store.get(canonical)
    except NotFound:
        raise InputError(field, f"'{ref}' not found", 404) from None
