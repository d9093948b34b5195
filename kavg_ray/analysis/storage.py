"""Where results live: a local (or shared) folder, or an object-store URI (docs/design.md
section 5).

``--storage`` (and ``$KAVG_STORAGE``) is a folder path, or a URI that pyarrow's filesystems
serve, as Ray Train's ``RunConfig(storage_path=...)`` takes it: ``s3://BUCKET/PREFIX`` or
``gs://BUCKET/PREFIX`` (``gcs://`` is the same). pyarrow's URI options go in the query and
travel with the URI, to the results store and to Ray alike, for example an S3-compatible
server: ``s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http``. Credentials are
the nodes' own (``AWS_ACCESS_KEY_ID`` ..., an instance role, ``gcloud`` defaults); kavg
never copies them. Any other scheme (``foo://``, ``file://``, ``hdfs://``) and a known
scheme without its two slashes (``s3:bucket``) are refused: never taken as a local path.

:class:`RemotePath` is the part of :class:`pathlib.Path` that the store needs, over
``pyarrow.fs``. It has no ``__fspath__``: nothing can open it as a local file by mistake
(which is how ``s3://b/p`` once became a local folder ``s3:/b/p``).

What cannot live in an object store stays on this machine, under :func:`local_dir`:
the lock that serialises the store's writers, and Ray's and the workers' logs.

Imports neither torch nor ray.
"""

from __future__ import annotations

import datetime as _dt
import functools
import importlib.util
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

from kavg_ray.errors import BadInputError, KavgError

__all__ = [
    "SCHEMES",
    "RemotePath",
    "StorageError",
    "check_uri",
    "is_uri",
    "join",
    "local_dir",
    "storage_root",
]

#: The URI schemes kavg serves, and the pyarrow module that serves each.
SCHEMES: dict[str, str] = {"s3": "pyarrow._s3fs", "gs": "pyarrow._gcsfs", "gcs": "pyarrow._gcsfs"}
_FILESYSTEM_NAMES = {"s3": "S3", "gs": "Google Cloud Storage", "gcs": "Google Cloud Storage"}
# scheme://...: any scheme (RFC 3986), so that foo://x is refused rather than made a folder.
_URI_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# s3:bucket, gs:/bucket: a known scheme that lost its slashes (would be a folder "s3:").
_BROKEN_URI_RE = re.compile(r"^(s3|gs|gcs|file|hdfs|az|abfss?|https?):", re.IGNORECASE)
SERVED = "s3://BUCKET/PREFIX or gs://BUCKET/PREFIX"


class StorageError(KavgError):
    """An object store that fails at run time (unreachable, access denied): exit 1."""


def is_uri(storage: str | os.PathLike[str]) -> bool:
    """Whether ``storage`` is a URI (``scheme://...``), served or not, rather than a path."""
    return isinstance(storage, RemotePath) or bool(_URI_RE.match(str(storage).strip()))


def _served(scheme: str) -> bool:
    """Whether this pyarrow was built with the filesystem of ``scheme``."""
    try:
        return importlib.util.find_spec(SCHEMES[scheme]) is not None
    except (ImportError, ValueError):
        return False


def check_uri(storage: str, option: str = "--storage") -> str:
    """``storage`` when it is a URI kavg serves; BadInputError (exit 2) with one line
    (naming ``option``) otherwise. Paths (no scheme) are returned unchanged. Nothing is
    contacted."""
    text = str(storage).strip()
    match = _URI_RE.match(text)
    if match is None:
        if _BROKEN_URI_RE.match(text):
            scheme = text.split(":", 1)[0]
            raise BadInputError(
                f"{option} {storage}: not a URI (write {scheme}://BUCKET/PREFIX) and not "
                "taken as a local folder"
            )
        return storage
    scheme = match.group(1).lower()
    if scheme not in SCHEMES:
        raise BadInputError(
            f"{option} {storage}: kavg cannot store results at {scheme}:// URIs; give a "
            f"folder (local, or shared by every node) or {SERVED}"
        )
    if not _served(scheme):
        raise BadInputError(
            f"{option} {storage}: this pyarrow has no {_FILESYSTEM_NAMES[scheme]} "
            f"filesystem ({SCHEMES[scheme]}); install a pyarrow built with it, or give a "
            "folder"
        )
    if not urlsplit(text).netloc:
        raise BadInputError(f"{option} {storage}: names no bucket; expected {SERVED}")
    return storage


def storage_root(storage: str | os.PathLike[str]) -> Path | RemotePath:
    """The store's root: a :class:`RemotePath` for a served URI, else a local Path.
    BadInputError for a URI kavg cannot serve (:func:`check_uri`)."""
    if isinstance(storage, RemotePath):
        return storage
    text = str(storage)
    if is_uri(text) or _BROKEN_URI_RE.match(text.strip()):
        return RemotePath(check_uri(text.strip()))
    return Path(text)


def join(storage: str | os.PathLike[str], *parts: str) -> str:
    """``storage`` with ``parts`` below it, as the user would write it (a URI keeps its
    query at the end): for messages such as ``results: s3://b/p/sweep``."""
    root = storage_root(storage)
    if isinstance(root, RemotePath):
        return str(root.joinpath(*parts))
    return os.path.join(str(storage), *parts)


def cache_home() -> Path:
    """This machine's folder for what remote storage cannot hold: ``$KAVG_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/kavg``, else ``~/.cache/kavg``."""
    explicit = os.environ.get("KAVG_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg, "kavg")


def _safe_part(part: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", part)
    return "_" if safe in ("", ".", "..") else safe


def local_dir(root: RemotePath, *parts: str) -> Path:
    """The local folder that stands in for ``root / parts`` on this machine (not created):
    ``<cache_home>/remote/<scheme>/<bucket>/<prefix...>/<parts...>``. The query (endpoint,
    options) is left out: one bucket and prefix is one place."""
    split = urlsplit(root.root)
    names = [split.scheme.lower(), split.netloc.rsplit("@", 1)[-1], *split.path.split("/"),
             *root.parts, *parts]  # fmt: skip
    return cache_home().joinpath("remote", *(_safe_part(n) for n in names if n))


@functools.lru_cache(maxsize=32)
def _filesystem(root: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) of a storage URI, made once per URI."""
    import pyarrow.fs

    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(root)
    except ValueError as exc:  # ArrowInvalid: an option pyarrow does not know, say
        raise BadInputError(f"--storage {root}: {_first_line(exc)}") from None
    except OSError as exc:
        raise StorageError(f"storage {root}: {_first_line(exc)}") from None
    return fs, path.rstrip("/")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class RemotePath:
    """A file or folder under an object-store root URI (``root``, query included), named
    by ``parts`` below it: enough of :class:`pathlib.Path` for the results store.

    Object stores have no folders: a folder exists when an object lies under it,
    :meth:`mkdir` does nothing, and one write (one PUT) is atomic: a reader sees the old
    object or the new one, never part of either. pyarrow's errors other than a missing
    file become :class:`StorageError` (one line, exit 1).
    """

    root: str
    parts: tuple[str, ...] = ()

    def __truediv__(self, part: str | os.PathLike[str]) -> RemotePath:
        return RemotePath(self.root, self.parts + tuple(p for p in str(part).split("/") if p))

    def __str__(self) -> str:
        split = urlsplit(self.root)
        path = "/".join([split.path.rstrip("/"), *self.parts])
        query = f"?{split.query}" if split.query else ""
        return f"{split.scheme}://{split.netloc}{path}{query}"

    def joinpath(self, *parts: str | os.PathLike[str]) -> RemotePath:
        out = self
        for part in parts:
            out = out / part
        return out

    @property
    def name(self) -> str:
        return self.parts[-1] if self.parts else self.fs_path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.root, self.parts[:-1])

    @property
    def filesystem(self) -> Any:
        return _filesystem(self.root)[0]

    @property
    def fs_path(self) -> str:
        """The path on :attr:`filesystem` (bucket and key, no scheme)."""
        return "/".join([_filesystem(self.root)[1], *self.parts])

    def resolve(self) -> RemotePath:
        return self

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StorageError(f"cannot {what} {self}: {_first_line(exc)}") from None

    def _info(self) -> Any:
        return self._call("read", self.filesystem.get_file_info, self.fs_path)

    def exists(self) -> bool:
        import pyarrow.fs

        return self._info().type != pyarrow.fs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs

        return self._info().type == pyarrow.fs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs

        return self._info().type == pyarrow.fs.FileType.Directory

    def iterdir(self) -> Iterator[RemotePath]:
        import pyarrow.fs

        selector = pyarrow.fs.FileSelector(self.fs_path, allow_not_found=True)
        infos = self._call("list", self.filesystem.get_file_info, selector)
        for info in sorted(infos, key=lambda i: i.path):
            yield self / info.base_name

    def stat(self) -> SimpleNamespace:
        info = self._info()
        if info.type.name == "NotFound":
            raise FileNotFoundError(str(self))
        mtime = info.mtime or _dt.datetime.now(_dt.timezone.utc)
        return SimpleNamespace(st_mtime=mtime.timestamp(), st_size=info.size or 0)

    def read_bytes(self) -> bytes:
        def read() -> bytes:
            with self.filesystem.open_input_stream(self.fs_path) as fh:
                return fh.read()

        return self._call("read", read)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        def write() -> None:
            with self.filesystem.open_output_stream(self.fs_path) as fh:
                fh.write(data)

        self._call("write", write)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def upload(self, local_file: str | os.PathLike[str]) -> None:
        """Put the local file's bytes here (one write)."""
        with open(local_file, "rb") as fh:
            self.write_bytes(fh.read())

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing: an object's key makes its folders."""

    def check_bucket(self) -> None:
        """BadInputError (exit 2) when the bucket does not exist or these credentials
        cannot see it; StorageError when the store cannot be reached."""
        import pyarrow.fs

        bucket = self.fs_path.split("/", 1)[0]
        info = self._call("read", self.filesystem.get_file_info, bucket)
        if info.type == pyarrow.fs.FileType.NotFound:
            raise BadInputError(
                f"--storage {RemotePath(self.root)}: bucket '{bucket}' does not exist (or these "
                "credentials cannot see it); create it first"
            )

    def remove_tree(self) -> None:
        """Delete this folder and everything under it (nothing if absent)."""
        if self.is_dir():
            self._call("delete", self.filesystem.delete_dir, self.fs_path)
