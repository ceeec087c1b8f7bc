"""Object storage: a local directory (embedded default) or an S3-compatible bucket.

Keys are derived from job ids only (never from client file names).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["Storage", "LocalStorage", "S3Storage", "StorageError", "StorageNotFound",
           "open_storage",
           "input_key", "output_key", "request_key", "job_prefix", "input_prefix", "output_prefix"]


class StorageError(RuntimeError):
    """The storage backend failed (unreachable, denied, missing object)."""


class StorageNotFound(StorageError):
    """The object does not exist (not a fault to retry)."""


def job_prefix(job_id: str) -> str:
    """Every object of a job lies under this prefix (deleting it deletes the job's)."""
    return f"jobs/{job_id}/"


def request_key(job_id: str) -> str:
    return f"{job_prefix(job_id)}request.json"


def input_prefix(job_id: str) -> str:
    return f"{job_prefix(job_id)}input/"


def input_key(job_id: str, kind: str, index: int) -> str:
    return f"{input_prefix(job_id)}{kind}_{index}"


def output_prefix(job_id: str) -> str:
    return f"{job_prefix(job_id)}output/"


def output_key(job_id: str, name: str) -> str:
    return f"{output_prefix(job_id)}{name}.png"


class Storage:
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def stream(self, key: str, chunk: int = 1 << 16) -> Iterator[bytes]:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove one object (no error if it is not there)."""
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> None:
        raise NotImplementedError

    def presign(self, key: str, expires_s: int) -> str | None:
        """A URL clients can download from directly, or None."""
        return None

    def job_ages(self) -> dict[str, float]:
        """Every job id with objects in storage -> the time (epoch s) its newest object
        was written."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise StorageError unless the backend is usable."""


class LocalStorage(Storage):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if self.root not in p.parents:
            raise StorageError(f"key escapes the storage root: {key!r}")
        return p

    def put(self, key, data, content_type="application/octet-stream"):
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: readers never see half a file.
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise StorageError(f"could not write {key}: {e}") from e

    def get(self, key):
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as e:
            raise StorageNotFound(f"no object {key}") from e
        except OSError as e:
            raise StorageError(f"could not read {key}: {e}") from e

    def exists(self, key):
        return self._path(key).is_file()

    def stream(self, key, chunk=1 << 16):
        try:
            f = self._path(key).open("rb")
        except OSError as e:
            raise StorageError(f"could not read {key}: {e}") from e

        def gen():
            with f:
                while block := f.read(chunk):
                    yield block

        return gen()

    def delete(self, key):
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"could not delete {key}: {e}") from e

    def delete_prefix(self, prefix):
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if base.is_dir():
            for p in sorted(base.rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
            base.rmdir()

    def job_ages(self):
        out: dict[str, float] = {}
        jobs_dir = self.root / "jobs"
        if not jobs_dir.is_dir():
            return out
        for d in jobs_dir.iterdir():
            times = [p.stat().st_mtime for p in d.rglob("*") if p.is_file()]
            out[d.name] = max(times, default=d.stat().st_mtime)
        return out

    def check(self):
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"storage root is not writable: {self.root}")


class S3Storage(Storage):
    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 region: str = "us-east-1", public_url: str | None = None):
        import boto3
        from botocore.config import Config

        cfg = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=3,
                     read_timeout=30, signature_version="s3v4")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region,
                                   config=cfg)
        self.public_client = (boto3.client("s3", endpoint_url=public_url, region_name=region,
                                           config=cfg) if public_url else None)

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError) as e:
            raise StorageError(f"{what}: {e}") from e

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists; another process creating it at the same
        moment is not an error."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError:
            pass
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou",
                                                               "BucketAlreadyExists"):
                raise StorageError(f"create bucket: {e}") from e

    def put(self, key, data, content_type="application/octet-stream"):
        self._call(f"put {key}", self.client.put_object, Bucket=self.bucket, Key=self._k(key),
                   Body=data, ContentType=content_type)

    def get(self, key):
        from botocore.exceptions import ClientError

        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._k(key))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise StorageNotFound(f"no object {key}") from e
            raise StorageError(f"get {key}: {e}") from e
        except Exception as e:  # noqa: BLE001 - botocore's connection errors
            raise StorageError(f"get {key}: {e}") from e
        return self._call(f"read {key}", obj["Body"].read)

    def exists(self, key):
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except ClientError:
            return False

    def stream(self, key, chunk=1 << 16):
        obj = self._call(f"get {key}", self.client.get_object, Bucket=self.bucket,
                         Key=self._k(key))
        return obj["Body"].iter_chunks(chunk)

    def delete(self, key):
        self._call(f"delete {key}", self.client.delete_object, Bucket=self.bucket,
                   Key=self._k(key))

    def delete_prefix(self, prefix):
        resp = self._call("list", self.client.list_objects_v2, Bucket=self.bucket,
                          Prefix=self._k(prefix))
        keys = [{"Key": o["Key"]} for o in resp.get("Contents", [])]
        if keys:
            self._call("delete", self.client.delete_objects, Bucket=self.bucket,
                       Delete={"Objects": keys})

    def presign(self, key, expires_s):
        if self.public_client is None:
            return None
        return self.public_client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._k(key)},
            ExpiresIn=expires_s)

    def job_ages(self):
        out: dict[str, float] = {}
        base = self._k("jobs/")
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                      Prefix=base)
        for page in self._call("list jobs", list, pages):
            for obj in page.get("Contents", []):
                job_id = obj["Key"][len(base):].split("/", 1)[0]
                stamp = obj["LastModified"].timestamp()
                out[job_id] = max(out.get(job_id, 0.0), stamp)
        return out

    def check(self):
        self._call("head bucket", self.client.head_bucket, Bucket=self.bucket)


def open_storage(url: str, *, endpoint_url: str | None = None, region: str = "us-east-1",
                 public_url: str | None = None, create_bucket: bool = True) -> Storage:
    """`file:///path` (or a bare path) or `s3://bucket[/prefix]` (its bucket created
    when missing, with `create_bucket`)."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme else url
        if parsed.netloc and parsed.netloc != "localhost":  # file://./data style
            path = parsed.netloc + parsed.path
        return LocalStorage(path)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"STORAGE_URL {url!r} names no bucket")
        s = S3Storage(parsed.netloc, parsed.path, endpoint_url=endpoint_url, region=region,
                      public_url=public_url)
        if create_bucket:
            s.ensure_bucket()
        return s
    raise ValueError(f"STORAGE_URL must be file://... or s3://..., got {url!r}")
