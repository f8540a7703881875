"""s3:// targets: S3 or any S3-compatible object store (MinIO, Ceph RGW, ...), through s3fs.

    s3://bucket/prefix     endpoint_url: for a non-AWS store; keys from access_key_env + secret_key_env
                           (or the secret key from password_env / password_secret); none of them: the usual
                           AWS chain (AWS_* variables, ~/.aws, instance role). options: region, timeout,
                           retries (botocore attempts, 3), and any other S3FileSystem keyword.

One PUT is atomic on S3 (an object appears whole or not at all), so blobs are written in place: no
temporary name, no copy+delete "rename". botocore sends a checksum with every PUT and the store verifies it.
The bucket must exist: hotvm never creates buckets (their policy and region are the owner's choice).

Object Lock (`immutable_days`, docs/copies.md): every PUT carries a retention (COMPLIANCE or GOVERNANCE)
until now + immutable_days, the bucket is checked for Object Lock at connect, chunks a new set reuses get
their retention extended (extend_lock), and a delete removes the object's versions explicitly, so the
store itself refuses to delete anything still locked (a plain DELETE would only add a delete marker).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote, urlsplit

from s3fs import S3FileSystem

from hotvm import credentials
from hotvm.config import TargetConfig
from hotvm.errors import ConfigError, TargetConfigError, TargetError
from targets.base import DEFAULT_LIMIT, Target

_AUTH = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidClientTokenId", "InvalidToken",
         "ExpiredToken", "AuthorizationHeaderMalformed", "UnrecognizedClientException"}
_FULL = {"QuotaExceeded", "XMinioStorageFull", "StorageFull", "InsufficientStorage"}


def _client_error(exc: BaseException) -> tuple[str, str] | None:
    """(code, message) of the botocore ClientError behind exc, if there is one."""
    seen = 0
    while exc is not None and seen < 5:
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and "Error" in response:
            return response["Error"].get("Code", ""), response["Error"].get("Message", "")
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


class S3Target(Target):
    scheme = "s3"
    atomic_put = True

    def __init__(self, config: TargetConfig, fs: S3FileSystem, bucket: str, root: str,
                 cred_source: str) -> None:
        super().__init__(config.name, config.url, fs, root)
        self.bucket, self.cred_source = bucket, cred_source
        self.endpoint_url = config.endpoint_url
        self.object_lock_days = config.immutable_days
        self.object_lock_mode = config.object_lock_mode

    @property
    def where(self) -> str:
        return self.endpoint_url or "AWS S3"

    def _translate(self, exc: BaseException, what: str, path: str) -> BaseException | None:
        from botocore.exceptions import (
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        err = _client_error(exc)
        code, message = err if err else ("", "")
        if code in _AUTH:
            return TargetConfigError(
                f"target '{self.name}': {self.where} rejected the access key or secret key ({code}) from "
                f"{self.cred_source}",
                f"check the keys in {self.cred_source}",
            )
        if code == "NoSuchBucket":
            return TargetConfigError(
                f"target '{self.name}': bucket '{self.bucket}' does not exist on {self.where}",
                "create the bucket first (hotvm never creates buckets), or fix the URL")
        if code in _FULL:
            return self.full_error(what, path)
        if code in ("AccessDenied", "AllAccessDisabled", "Forbidden", "403"):
            return self.refused_error(what, path, f"{code}: {message}" if message else code)
        if isinstance(exc, NoCredentialsError):
            return TargetConfigError(
                f"target '{self.name}': no S3 credentials found",
                "set access_key_env and secret_key_env in hotvm.yaml (or AWS_* variables)")
        if isinstance(exc, EndpointConnectionError):
            return self.unreachable_error(ConnectionError("could not connect"))
        if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError)):
            return self.unreachable_error(TimeoutError("timed out"))
        if err:
            return TargetError(f"target '{self.name}' failed {what} {self.display(path)}: {code} {message}",
                               "check the bucket, the endpoint and the store's log")
        return super()._translate(exc, what, path)

    def connect(self) -> None:
        """One LIST of at most one key: proves the endpoint, the keys and the bucket (NoSuchBucket)."""
        from fsspec.asyn import sync

        prefix = self.root.partition("/")[2]
        with self._errors("connecting to", ""):
            try:
                sync(self.fs.loop, self.fs._call_s3, "list_objects_v2", Bucket=self.bucket,
                     Prefix=f"{prefix}/" if prefix else "", MaxKeys=1)
            except FileNotFoundError as exc:  # s3fs's name for NoSuchBucket
                raise self._translate(exc, "connecting to", "") or exc from None

    def check(self) -> None:
        probe = self.full(".hotvm-probe")
        with self._errors("writing to", ""):
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)  # a plain delete: a bucket's default retention may lock the probe

    def _put(self, fs: Any, full_path: str, data: bytes) -> None:
        if self.object_lock_days:
            fs.pipe_file(full_path, data, ObjectLockMode=self.object_lock_mode,
                         ObjectLockRetainUntilDate=self.lock_until())
        else:
            fs.pipe_file(full_path, data)

    def read_bytes(self, path: str, limit: int = DEFAULT_LIMIT) -> bytes:
        """One GET whose body is read to its end or limit + 1 bytes, whichever comes first, and closed
        (s3fs's cat_file reads any body whole); refused at once where the store says it is larger."""
        from fsspec.asyn import sync

        with self._errors("reading", path):
            data, size = sync(self.fs.loop, self._get_upto, self._key(path), limit)
            if size is not None:
                raise self.too_large(path, limit, size)
            return self.bounded(path, data, limit)

    async def _get_upto(self, key: str, limit: int) -> tuple[bytes, int | None]:
        """(the body, up to limit + 1 bytes; None) or (b"", the size the store gives when above limit)."""
        response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=key)
        body = response["Body"]
        try:
            size = response.get("ContentLength")
            if isinstance(size, int) and size > limit:
                return b"", size
            pieces, done = [], 0
            while done <= limit and (piece := await body.read(min(4 << 20, limit + 1 - done))):
                pieces.append(piece)
                done += len(piece)
            return b"".join(pieces), None
        finally:
            body.close()

    # -- Object Lock
    def _s3(self, method: str, **kwargs: Any) -> dict:
        from fsspec.asyn import sync

        return sync(self.fs.loop, self.fs._call_s3, method, **kwargs)

    def _key(self, path: str) -> str:
        return self.full(path).partition("/")[2]

    def lock_until(self, now: dt.datetime | None = None) -> dt.datetime:
        """When an object written now stops being locked."""
        assert self.object_lock_days
        now = now or dt.datetime.now(dt.UTC)
        until = now + dt.timedelta(days=self.object_lock_days)
        return until.replace(microsecond=0) + dt.timedelta(seconds=1)  # whole seconds, never shorter

    def check_object_lock(self) -> None:
        """An immutable target on a bucket without Object Lock would lock nothing: refuse it."""
        with self._errors("reading the Object Lock configuration of", ""):
            try:
                conf = self._s3("get_object_lock_configuration", Bucket=self.bucket)
            except Exception as exc:
                err = _client_error(exc)
                if err is None or "ObjectLock" not in err[0]:
                    raise
                conf = {}
        if conf.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") != "Enabled":
            raise TargetConfigError(
                f"target '{self.name}' sets immutable_days but bucket '{self.bucket}' on {self.where} does "
                "not have Object Lock enabled",
                "create a bucket with Object Lock enabled (it cannot be added to most existing buckets) "
                "or remove immutable_days; see docs/copies.md",
            )

    def retained_until(self, path: str) -> dt.datetime | None:
        """The current version's Object Lock retain-until date (None: not locked, or no such object)."""
        with self._errors("reading the retention of", path):
            try:
                head = self._s3("head_object", Bucket=self.bucket, Key=self._key(path))
            except FileNotFoundError:
                return None
        until = head.get("ObjectLockRetainUntilDate")
        if isinstance(until, str):
            until = dt.datetime.fromisoformat(until.replace("Z", "+00:00"))
        return until if isinstance(until, dt.datetime) else None

    def extend_lock(self, paths: Iterable[str], until: dt.datetime, workers: int = 8) -> int:
        """Make every object in `paths` locked at least until `until` (objects a new set reuses, written
        under an earlier lock); returns how many were extended. A lock is never shortened."""

        def one(path: str) -> int:
            current = self.retained_until(path)
            if current is not None and current >= until:
                return 0
            with self._errors("extending the retention of", path):
                self._s3("put_object_retention", Bucket=self.bucket, Key=self._key(path),
                         Retention={"Mode": self.object_lock_mode, "RetainUntilDate": until})
            return 1

        with ThreadPoolExecutor(max_workers=workers) as pool:
            return sum(pool.map(one, list(paths)))

    def _versions(self, prefix: str, exact: bool) -> list[dict]:
        out: list[dict] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        while True:
            page = self._s3("list_object_versions", **kwargs)
            for v in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
                if not exact or v["Key"] == prefix:
                    out.append({"Key": v["Key"], "VersionId": v["VersionId"]})
            if not page.get("IsTruncated"):
                return out
            kwargs["KeyMarker"] = page.get("NextKeyMarker")
            kwargs["VersionIdMarker"] = page.get("NextVersionIdMarker")

    def _delete_versions(self, versions: list[dict], path: str) -> None:
        """Delete object versions for good; the store refuses those still locked (AccessDenied)."""
        for version in versions:
            try:
                self._s3("delete_object", Bucket=self.bucket, **version)
            except Exception as exc:
                err = _client_error(exc)
                if err and err[0] == "AccessDenied":
                    raise TargetError(
                        f"target '{self.name}' refused deleting {self.display(path)}: it is under S3 Object "
                        f"Lock ({err[1] or 'AccessDenied'})",
                        "wait until its retention expires (hotvm check shows it)",
                    ) from None
                raise

    def _remove(self, fs: Any, full_path: str) -> None:
        if not self.object_lock_days:
            fs.rm_file(full_path)
            return
        key = full_path.partition("/")[2]
        versions = self._versions(key, exact=True)
        if not versions:
            raise FileNotFoundError(full_path)
        self._delete_versions(versions, key)

    def delete_tree(self, path: str) -> None:
        if not self.object_lock_days:
            super().delete_tree(path)
            return
        prefix = self._key(path).rstrip("/") + "/"
        with self._errors("deleting", path):
            self._delete_versions(self._versions(prefix, exact=False), path)

    def _makedirs(self, full_path: str) -> None:
        pass  # no directories in an object store

    def exists(self, path: str) -> bool:
        with self._errors("checking", path):
            try:
                self.fs.info(self.full(path))
                return True
            except FileNotFoundError:
                return False

    def list_flat(self, path: str) -> list[str] | None:
        """One LIST request per 1000 keys, whatever the "directories" (hotvm copy lists chunks/ so)."""
        base = self.full(path).rstrip("/") + "/"
        with self._errors("listing", path):
            keys = self.fs.find(base)
        return sorted(k[len(base):] for k in keys if k.startswith(base))

    def close(self) -> None:
        self.fs.invalidate_cache()


def open_s3(config: TargetConfig) -> S3Target:
    parts = urlsplit(config.url)
    bucket = parts.netloc
    if not bucket or "@" in bucket:
        raise ConfigError(f"target '{config.name}': s3 URL needs a bucket: {config.url}",
                          "write it as s3://bucket/prefix (keys go in access_key_env / secret_key_env)")
    prefix = unquote(parts.path).strip("/")
    root = f"{bucket}/{prefix}" if prefix else bucket

    key = secret = None
    sources = []
    if config.access_key_env:
        key = credentials.from_env(credentials.target(config), config.access_key_env, "S3 access key").value
        sources.append(f"environment variable {config.access_key_env}")
    if config.secret_key_env:
        if config.password_env or config.password_secret:
            raise TargetConfigError(
                f"target '{config.name}' sets both secret_key_env and password_env/_secret",
                "keep one of them for the S3 secret key")
        cred = credentials.from_env(credentials.target(config), config.secret_key_env, "S3 secret key")
    else:
        cred = credentials.password(config, "S3 secret key")
    secret = cred.value
    if secret is not None:
        sources.append(cred.source)
    if (key is None) != (secret is None):
        raise TargetConfigError(
            f"target '{config.name}': an S3 access key needs its secret key and the other way round",
            "set both access_key_env and secret_key_env (or password_env / password_secret)",
        )
    cred_source = " and ".join(sources) if sources else "the default AWS credential chain"

    opts = dict(config.options)
    timeout = float(opts.pop("timeout", 20))
    attempts = int(opts.pop("retries", 3))
    client_kwargs: dict[str, Any] = {}
    if config.endpoint_url:
        client_kwargs["endpoint_url"] = config.endpoint_url
    if "region" in opts:
        client_kwargs["region_name"] = str(opts.pop("region"))
    fs = S3FileSystem(
        key=key, secret=secret, client_kwargs=client_kwargs,
        config_kwargs={"connect_timeout": timeout, "read_timeout": timeout * 3,
                       "retries": {"max_attempts": attempts, "mode": "standard"}},
        use_listings_cache=False, skip_instance_cache=True, **opts,
    )
    target = S3Target(config, fs, bucket, root, cred_source)
    target.connect()
    if target.object_lock_days:
        target.check_object_lock()
    return target
