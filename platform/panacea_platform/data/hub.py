"""Loading from the Hugging Face hub without hanging: probe first, fail in seconds.

`datasets.load_dataset` on a machine without the hub retries for about 25 s before
it gives up. Every hub loader of the platform calls `load_hub_dataset`, which first
opens one TCP connection to the hub's host (3 s at most) and raises a clear
DataUnavailableError when that fails. With HF_HUB_OFFLINE=1 the probe is skipped and
the dataset is read from the local cache only (how a cluster without internet uses a
pre-downloaded copy).
"""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlparse

from panacea_platform.data.errors import DataUnavailableError

__all__ = ["HUB_PROBE_SECONDS", "hub_offline", "hub_reachable", "load_hub_dataset"]

HUB_PROBE_SECONDS = 3.0


def hub_offline() -> bool:
    """Whether the user asked for cache-only hub access (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)."""
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """One TCP connection to the hub's host (HF_ENDPOINT, default huggingface.co:443) within `timeout` seconds."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def load_hub_dataset(repo: str, split: str, config: str | None = None, *, what: str, instead: str) -> Any:
    """`datasets.load_dataset(repo, config, split=split)`, or DataUnavailableError within seconds.

    `what` names the thing that needed it (e.g. "suite 'xstest' (source xstest)"), `instead` says what
    to use offline; both go into the error.
    """
    if not hub_offline() and not hub_reachable():
        raise DataUnavailableError(
            f"{what} needs {repo!r} (split {split!r}) from the Hugging Face hub, which is unreachable from this "
            f"machine (no connection within {HUB_PROBE_SECONDS:g} s; with a local copy in the cache, set "
            f"HF_HUB_OFFLINE=1). {instead}"
        )
    try:
        import datasets

        return datasets.load_dataset(repo, config, split=split)
    except Exception as exc:  # the hub client raises many types (OSError, HTTP, not found); all mean "not here"
        raise DataUnavailableError(
            f"{what} could not load {repo!r} (split {split!r}) from the Hugging Face hub or its cache "
            f"({type(exc).__name__}: {str(exc)[:200]}). {instead}"
        ) from None
