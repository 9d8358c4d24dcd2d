"""One Ray per machine.

A panacea command connects to RAY_ADDRESS when it is set (a cluster). Otherwise it joins the Ray that
another panacea command on this machine started, as recorded in a registry file, or a standing Ray from
`ray start`, which Ray's own bootstrap file names. Only when neither runs does it start Ray in its own
process and record it. Two commands on one machine therefore share one Ray: the second one's trials
wait for CPUs instead of a second Ray starting beside the first. The owner waits at exit, before its
Ray stops, for the other commands still using it.

A lock around the lookup and start keeps two commands that start at the same moment from both
starting one. PANACEA_RAY_REGISTRY names the registry file; `none` turns joining off, so each command
starts its own Ray, as before.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from panacea_platform.locks import exclusive_lock

REGISTRY_ENV = "PANACEA_RAY_REGISTRY"


def registry_path() -> Path | None:
    configured = os.environ.get(REGISTRY_ENV)
    if configured == "none":
        return None
    return Path(configured) if configured else Path(tempfile.gettempdir()) / f"panacea-ray-{os.getuid()}.json"


def connect_ray(*, log_to_driver: bool = True, out: Callable[[str], None] = print) -> None:
    """Connect this process to the machine's one Ray (see the module's docstring)."""
    import ray

    from panacea_platform import console

    console.open_run_log()  # the command's work starts here, after its checks
    console.route_library_loggers()  # `import ray` set up Ray's own logger to print
    if ray.is_initialized():
        console.filter_worker_lines()
        return
    try:
        _connect(ray, log_to_driver, out)
    finally:
        console.filter_worker_lines()


def _connect(ray, log_to_driver: bool, out: Callable[[str], None]) -> None:
    # Ray Train's controller polls every 2 s by default and each report waits for it.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    # Ray Train V2 routes workers' print() through a logger that also reaches the driver, so every
    # progress line showed twice; plain stdout shows it once.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    registry = registry_path()
    if os.environ.get("RAY_ADDRESS") or registry is None:
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=log_to_driver)
        return
    with _locked(registry):
        owner = running_owner(registry)
        if owner is not None:
            out(f"[ray] joining the Ray that another panacea command (pid {owner['pid']}) runs on this machine")
            # Ray turns token authentication on for a Ray it starts, but not for a driver given an address.
            if owner.get("auth_mode") == "token" and "RAY_AUTH_MODE" not in os.environ:
                from ray._private.authentication.authentication_token_setup import _enable_token_auth

                _enable_token_auth()  # the environment variable, and Ray's cached config that reads it
            ray.init(address=owner["address"], log_to_driver=log_to_driver)
            return
        # Ray's default: a standing `ray start` Ray if one runs, else a new one in this process.
        ray.init(log_to_driver=log_to_driver)
        node = ray._private.worker._global_node
        if node is not None and node.is_head():
            registry.write_text(
                json.dumps(
                    {"pid": os.getpid(), "address": node.gcs_address, "auth_mode": os.environ.get("RAY_AUTH_MODE")}
                )
            )
            atexit.register(_release, registry, out)


def running_owner(registry: Path) -> dict | None:
    """The registered owner of this machine's Ray, when its process still runs and its GCS answers
    (a registry left by a killed owner, its pid since reused, names no Ray)."""
    try:
        owner = json.loads(registry.read_text())
        os.kill(int(owner["pid"]), 0)
        host, port = owner["address"].rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=2).close()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return owner


def _locked(registry: Path):
    """The registry's lock, in the file beside it."""
    return exclusive_lock(f"{registry}.lock")


def other_drivers() -> list[int]:
    """Pids of the other live drivers connected to this process's Ray."""
    import ray

    mine = ray.get_runtime_context().get_job_id()
    return [
        int(job.get("DriverPid") or 0)
        for job in ray._private.state.jobs()
        if not job.get("IsDead") and job.get("JobID") != mine and job.get("DriverPid")
    ]


def _release(registry: Path, out: Callable[[str], None], poll_s: float = 2.0) -> None:
    """At the owner's exit, before Ray stops: wait for the commands that joined it, then unregister."""
    import ray

    if not ray.is_initialized():
        return
    announced = False
    while True:
        # Under the lock: a command joins while holding it, so none can join between this look and the unlink.
        with _locked(registry):
            others = [pid for pid in other_drivers() if _alive(pid)]
            if not others:
                owner = running_owner(registry)
                if owner is not None and owner["pid"] == os.getpid():
                    registry.unlink(missing_ok=True)
                return
        if not announced:
            out(
                f"[ray] other panacea commands use this machine's Ray (pids {', '.join(map(str, others))}): "
                "it stops when they end"
            )
            announced = True
        time.sleep(poll_s)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def machines_problem(nodes: list[dict], tracking_uri: str) -> str | None:
    """Why a run cannot track from a cluster spanning several machines, judged from Ray's node list
    (ray.nodes()): a SQLite or file store lives on one machine's disk, and rank 0, which logs the
    step metrics, may run on another."""
    machines = {node.get("NodeManagerAddress") for node in nodes if node.get("Alive")}
    if len(machines) > 1 and urlparse(tracking_uri).scheme in ("", "file", "sqlite"):
        return (
            f"the Ray cluster spans {len(machines)} machines, and this store is on one machine's disk: set "
            "MLFLOW_TRACKING_URI (or tracking.tracking_uri) to the team's server on every node "
            "(panacea tracking-server)"
        )
    return None


__all__ = ["connect_ray", "machines_problem", "registry_path", "running_owner", "other_drivers", "REGISTRY_ENV"]
