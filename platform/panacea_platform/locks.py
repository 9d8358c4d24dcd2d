"""An exclusive lock on a file, across processes (fcntl): for what several commands may create at
once on one machine (a cache entry, a new SQLite store, the machine's Ray registry)."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def exclusive_lock(lock_file: Path | str) -> Iterator[None]:
    """Holds an exclusive lock on `lock_file` (made, with its folder, if missing) while the block runs."""
    path = Path(lock_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
