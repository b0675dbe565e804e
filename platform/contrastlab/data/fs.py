"""Where dataset files live: a local path, or any URI a pyarrow filesystem understands.

``data.root`` / ``data.test_root`` may be a local path (as before) or a URI such as
``s3://bucket/prefix``, ``gs://bucket/prefix``, ``hdfs://...`` or ``file:///abs/path``. The URI
is resolved by :func:`pyarrow.fs.FileSystem.from_uri`, so the same ``(filesystem, path)`` pair
can be handed to other pyarrow-based readers (Ray Data's ``read_parquet(filesystem=...)``).

Credentials never come from the config (it is logged to MLflow): pyarrow reads the standard
environment of the process. For S3 and S3-compatible stores (MinIO, Ceph, R2, moto):
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``), or
``AWS_PROFILE`` with ``~/.aws/credentials``, or an instance role; ``AWS_REGION`` /
``AWS_DEFAULT_REGION``; ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for a store other
than AWS, e.g. ``http://minio.internal:9000``. For GCS: ``GOOGLE_APPLICATION_CREDENTIALS`` or
the machine's default credentials.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from .core import DataError

# Fragments of pyarrow's S3/GCS error texts, mapped to what a person should check.
_HINTS = (
    (
        ("NETWORK_CONNECTION", "Could not connect", "curlCode", "Couldn't resolve", "timed out"),
        "the endpoint is unreachable; check the network and AWS_ENDPOINT_URL (S3-compatible "
        "stores) or the store's address",
    ),
    (
        ("INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "ACCESS_DENIED", "AccessDenied"),
        "the store refused the credentials; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
        "(or AWS_PROFILE) in the environment of this process (on a cluster: of every node)",
    ),
    (("NO_SUCH_BUCKET", "bucket does not exist"), "the bucket does not exist"),
)


def is_uri(location: str | Path) -> bool:
    """True when ``location`` names a filesystem by scheme (``s3://``, ``file://``, ...)."""
    return "://" in str(location)


@dataclass(frozen=True)
class Location:
    """A directory or file on some filesystem.

    Attributes:
        fs: the pyarrow filesystem.
        path: the path inside ``fs`` (``bucket/prefix`` for S3).
        prefix: what turns a path of ``fs`` back into a name a person knows (``"s3://"``;
            empty for local paths).
    """

    fs: pafs.FileSystem
    path: str
    prefix: str = ""

    def name(self, path: str | None = None) -> str:
        """``path`` (default: this location) as a person would write it: ``s3://b/k``."""
        return self.prefix + (self.path if path is None else path)

    def child(self, name: str) -> str:
        """The path of ``name`` inside this location (a path of ``fs``)."""
        return self.path.rstrip("/") + "/" + name


def open_fs(location: str | Path) -> Location:
    """Resolve a local path or URI to its filesystem and path.

    Args:
        location: ``/data/x``, ``~/x``, ``s3://bucket/prefix``, ``gs://...``, ``file:///...``.

    Returns:
        The :class:`Location`. Nothing is contacted yet (pyarrow connects lazily).

    Raises:
        DataError: the URI's scheme or options are not understood.
    """
    text = str(location)
    if not is_uri(text):
        return Location(pafs.LocalFileSystem(), str(Path(text).expanduser()))
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{text}: not a filesystem URI pyarrow can open ({e})") from None
    scheme = text.split("://", 1)[0]
    prefix = "" if isinstance(fs, pafs.LocalFileSystem) else f"{scheme}://"
    return Location(fs, path, prefix)


def storage_error(where: str, e: BaseException, what: str | None = None) -> DataError:
    """A :class:`DataError` naming ``where`` and, when the error text says so, what to check
    (unreachable endpoint, refused credentials, missing bucket); else ``what`` went wrong."""
    text = str(e).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__
    hint = next((h for keys, h in _HINTS if any(k in str(e) for k in keys)), None)
    if hint is None and what is None:
        return DataError(f"{where}: {text}")
    return DataError(f"{where}: {hint or what} ({text})")


def file_info(loc: Location, path: str | None = None) -> pafs.FileInfo:
    """Stat one path; storage errors become a :class:`DataError` naming it."""
    path = loc.path if path is None else path
    try:
        return loc.fs.get_file_info(path)
    except (OSError, pa.ArrowException) as e:
        raise storage_error(loc.name(path), e) from None


def not_found(loc: Location, what: str) -> DataError:
    """The error for a location that does not exist; on an object store, says whether its
    bucket is missing (a typo there otherwise looks like an empty prefix)."""
    bucket = loc.path.split("/", 1)[0]
    if loc.prefix and bucket != loc.path and file_info(loc, bucket).type == pafs.FileType.NotFound:
        return DataError(
            f"{what} not found: {loc.name()}: the bucket does not exist "
            f"({loc.name(bucket)}, at the endpoint the environment names)"
        )
    return DataError(f"{what} not found: {loc.name()} does not exist")


def list_files(loc: Location, recursive: bool) -> list[pafs.FileInfo]:
    """The files under ``loc`` (a directory), sorted by path.

    Raises:
        DataError: the directory cannot be listed (unreachable, refused, no such bucket).
    """
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=recursive))
    except (OSError, pa.ArrowException) as e:
        raise storage_error(loc.name(), e) from None
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def read_bytes(loc: Location, path: str) -> bytes:
    """The whole content of file ``path`` of ``loc.fs``."""
    try:
        with loc.fs.open_input_stream(path) as f:
            return f.read()
    except (OSError, pa.ArrowException) as e:
        raise storage_error(loc.name(path), e) from None


def write_bytes(loc: Location, path: str, data: bytes) -> None:
    """Write ``data`` to file ``path`` of ``loc.fs`` (parent folders created as needed)."""
    try:
        if isinstance(loc.fs, pafs.LocalFileSystem):  # object stores have no folders to make
            loc.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with loc.fs.open_output_stream(path) as f:
            f.write(data)
    except (OSError, pa.ArrowException) as e:
        raise storage_error(loc.name(path), e) from None


__all__ = [
    "Location",
    "file_info",
    "is_uri",
    "list_files",
    "not_found",
    "open_fs",
    "read_bytes",
    "storage_error",
    "write_bytes",
]
