"""Where a run's checkpoints, outputs and a sweep's state live: a local folder (one machine, or an NFS
mount every node sees) or a bucket URI (s3://bucket/prefix, gs://bucket/prefix), reached through the
pyarrow filesystems Ray Train itself uses. Credentials and endpoints come from each node's
environment (AWS_* / GOOGLE_*), as they do for Ray.

`Storage` is the small surface the platform needs: join a sub-path, read and write a small text file,
upload a folder. Ray Train and Tune take `Storage.uri` as their storage_path.
"""

from __future__ import annotations

import posixpath
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# Schemes a pyarrow build can serve; "file" and plain paths are local.
BUCKET_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss")
PROBE_SECONDS = 10.0


class StorageError(ValueError):
    """A storage setting that cannot be used; the message names the setting when the caller knows it."""


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def scheme_problem(location: str) -> str | None:
    """Why `location` cannot name storage, judged from its form alone (no connection)."""
    if not is_uri(location):
        return None
    scheme = urlparse(location).scheme
    if scheme == "file":
        return None
    if scheme not in BUCKET_SCHEMES:
        return f"no filesystem for the scheme {scheme!r}: expected a folder, s3://bucket/prefix or gs://bucket/prefix"
    if not urlparse(location).netloc:
        return f"no bucket named: expected {scheme}://bucket/prefix"
    return None


@dataclass(frozen=True)
class Storage:
    """A storage root: `uri` for Ray, `filesystem` + `path` for the platform's own reads and writes."""

    uri: str
    filesystem: Any
    path: str

    @classmethod
    def at(cls, location: str | Path) -> Storage:
        """The storage at a folder or URI; raises StorageError when its filesystem is not installed."""
        import pyarrow.fs

        location = str(location)
        problem = scheme_problem(location)
        if problem:
            raise StorageError(problem)
        if not is_uri(location):
            location = str(Path(location).expanduser().resolve())
            Path(location).mkdir(parents=True, exist_ok=True)
            return cls(location, pyarrow.fs.LocalFileSystem(), location)
        scheme = urlparse(location).scheme
        try:
            filesystem, path = pyarrow.fs.FileSystem.from_uri(location)
        except (ImportError, NotImplementedError, OSError, pyarrow.ArrowException) as exc:
            # e.g. a pyarrow built without S3, or hdfs:// without libhdfs and a JVM on this node
            raise StorageError(
                f"the filesystem for {scheme}:// cannot be loaded on this machine ({_first_line(exc)}): "
                "install what it needs on every node, or use a mounted folder"
            ) from None
        except ValueError as exc:
            raise StorageError(f"cannot open {location}: {_first_line(exc)}") from None
        return cls(location.rstrip("/"), filesystem, path.rstrip("/"))

    @property
    def is_local(self) -> bool:
        return not is_uri(self.uri)

    def join(self, *parts: str) -> Storage:
        sub = posixpath.join(*parts)
        uri = str(Path(self.uri) / sub) if self.is_local else f"{self.uri}/{sub}"
        return Storage(uri, self.filesystem, posixpath.join(self.path, sub))

    def exists(self, name: str) -> bool:
        import pyarrow.fs

        return self.filesystem.get_file_info(posixpath.join(self.path, name)).type != pyarrow.fs.FileType.NotFound

    def read_text(self, name: str) -> str | None:
        if not self.exists(name):
            return None
        with self.filesystem.open_input_stream(posixpath.join(self.path, name)) as stream:
            return stream.read().decode()

    def write_text(self, name: str, text: str) -> None:
        """Writes whole (local: through a temporary file and a rename, so a reader never sees half)."""
        target = posixpath.join(self.path, name)
        self.filesystem.create_dir(posixpath.dirname(target), recursive=True)
        temporary = posixpath.join(posixpath.dirname(target), f".{posixpath.basename(target)}.tmp")
        with self.filesystem.open_output_stream(temporary if self.is_local else target) as stream:
            stream.write(text.encode())
        if self.is_local:
            self.filesystem.move(temporary, target)

    def upload(self, folder: Path, name: str) -> Storage:
        """Copies a local folder to <this>/<name>; returns where it went."""
        import pyarrow.fs

        target = self.join(name)
        self.filesystem.create_dir(target.path, recursive=True)
        pyarrow.fs.copy_files(
            str(folder),
            target.path,
            source_filesystem=pyarrow.fs.LocalFileSystem(),
            destination_filesystem=self.filesystem,
        )
        return target


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def storage_problem(location: str, timeout_s: float | None = None) -> str | None:
    """None when one small object can be written to the storage and deleted within `timeout_s` (default
    PROBE_SECONDS); else why not. The probe runs in a thread with a deadline, because an unreachable
    endpoint or a credential lookup can otherwise retry for minutes."""
    timeout_s = PROBE_SECONDS if timeout_s is None else timeout_s
    try:
        storage = Storage.at(location)
    except StorageError as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot create the folder: {exc}"

    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            storage.write_text(".panacea-probe", "ok")
            storage.filesystem.delete_file(posixpath.join(storage.path, ".panacea-probe"))
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - any failure to write is the answer
            outcome.append(exc)

    # A daemon thread: one stuck in a retry loop must not keep the process alive at exit.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        return f"no answer within {timeout_s:g} s: check the endpoint, the network and the credentials on this node"
    if outcome[0] is not None:
        return f"cannot write there ({_first_line(outcome[0])})"
    return None


__all__ = ["Storage", "StorageError", "storage_problem", "scheme_problem", "is_uri", "BUCKET_SCHEMES"]
