"""Checks a command makes before it starts Ray, opens an MLflow run or trains: that the model can be
loaded from here, that the tracking server answers and that the storage can be written. Each failure
is one line naming the setting, within seconds (the CLI exits 2), instead of a connection error from
inside a Ray worker minutes later.
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from panacea_platform.config import ConfigError, RunConfig

PROBE_SECONDS = 3.0


def model_problem(name: str) -> str | None:
    """None when `name` is a registered offline model, a local folder, a cached hub id, or a hub id the
    hub knows; else why it cannot be loaded from this machine."""
    from panacea_platform.data.hub import HUB_PROBE_SECONDS, hub_offline, hub_reachable
    from panacea_platform.models import OFFLINE_MODELS

    if name in OFFLINE_MODELS or Path(name).expanduser().exists():
        return None  # the config's own validation has checked these (installed package, config.json)
    if _cached_on_this_machine(name):
        return None
    not_here = f"not a registered offline model ({', '.join(OFFLINE_MODELS.names())}), not a local folder"
    if hub_offline():
        return f"{not_here}, and not in the local Hugging Face cache (HF_HUB_OFFLINE is set)"
    if not hub_reachable():
        return (
            f"{not_here}, and the Hugging Face hub is unreachable from this machine (no connection within "
            f"{HUB_PROBE_SECONDS:g} s). Use an offline model or a local folder, or download it where the hub is "
            "reachable and set HF_HUB_OFFLINE=1"
        )
    return _hub_answer(name, not_here)


def _cached_on_this_machine(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - a malformed id is simply not cached
        return False


def _hub_answer(name: str, not_here: str) -> str | None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(name, timeout=PROBE_SECONDS * 2)
    except GatedRepoError:
        return "a gated model on the hub: accept its licence there and log in (`hf auth login`) on every node"
    except RepositoryNotFoundError:
        return f"{not_here}, and no such model on the Hugging Face hub"
    except Exception:  # noqa: BLE001 - anything else (rate limits, a slow answer) is for the loader to report
        return None
    return None


def tracking_problem(uri: str) -> str | None:
    """None when the tracking store can be reached (a file or SQLite store always can), and a server takes
    this machine's credentials; else why not."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        from panacea_platform.team_server.credentials import login_problem

        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_SECONDS):
                pass
        except urllib.error.HTTPError as exc:
            return f"the server at {uri} answered /health with HTTP {exc.code}: is it an MLflow server?"
        except (OSError, ValueError) as exc:
            return (
                f"no MLflow server answered at {uri} within {PROBE_SECONDS:g} s ({_reason(exc)}): start it, "
                "or point the setting at the team's server"
            )
        return login_problem(uri, PROBE_SECONDS)
    if parsed.scheme.startswith(("postgresql", "mysql")) and parsed.hostname:
        port = parsed.port or (5432 if parsed.scheme.startswith("postgresql") else 3306)
        try:
            with socket.create_connection((parsed.hostname, port), timeout=PROBE_SECONDS):
                return None
        except OSError as exc:
            return f"no database answered at {parsed.hostname}:{port} within {PROBE_SECONDS:g} s ({_reason(exc)})"
    return None


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", exc)
    return str(reason) or type(exc).__name__


def check_before_work(config: RunConfig) -> None:
    """Raise ConfigError (one line, the setting named) when what the config names does not exist, or the
    model, the tracking store or the storage is out of reach."""
    from panacea_platform.config_checks import check_config
    from panacea_platform.tracking import default_tracking_uri

    check_config(config)

    problem = model_problem(config.model.name)
    if problem:
        raise ConfigError(f"model.name = {config.model.name!r}: {problem}")
    uri = config.tracking.tracking_uri or default_tracking_uri(config.output_dir)
    problem = tracking_problem(uri)
    if problem:
        field = "tracking.tracking_uri" if config.tracking.tracking_uri else "MLFLOW_TRACKING_URI"
        raise ConfigError(f"{field} = {uri!r}: {problem}")
    if config.scaling.storage:
        from panacea_platform.storage import storage_problem

        problem = storage_problem(config.scaling.storage)
        if problem:
            raise ConfigError(f"scaling.storage = {config.scaling.storage!r}: {problem}")


__all__ = ["check_before_work", "model_problem", "tracking_problem", "PROBE_SECONDS"]
