"""MLflow tracking with explicit run ids.

We use MlflowClient rather than the fluent API: the parent run id is passed in,
never read from the environment (MLFLOW_RUN_ID would override it), and each run
is ended exactly once with a status that tells the truth (FAILED on error,
KILLED on interrupt), so no run is left RUNNING.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sqlite3
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

# MLflow announces creating its SQLite tables at INFO on every new store: noise in a CLI.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)

PACKAGES = ("torch", "transformers", "peft", "ray", "deepspeed", "mlflow", "datasets")


def default_tracking_uri(output_dir: str) -> str:
    """MLFLOW_TRACKING_URI when set (a team's server, passed through by the cluster), else SQLite beside the runs."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(output_dir) / 'mlflow.db').resolve()}"


def code_version() -> dict[str, str]:
    """Git commit and dirty flag of the working tree the code runs from, when there is one."""
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return {"git_commit": commit, "git_dirty": str(bool(dirty)).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[f"version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[f"version.{name}"] = "absent"
    return versions


@contextlib.contextmanager
def sqlite_store_lock(tracking_uri: str):
    """Two commands opening the same new SQLite store at once both run its migrations and one fails
    ("table _alembic_tmp_experiments already exists"): a file lock beside the database serialises that."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    from panacea_platform.locks import exclusive_lock

    with exclusive_lock(tracking_uri[len("sqlite:///") :] + ".lock"):
        yield


def seed_new_sqlite_store(tracking_uri: str) -> None:
    """A new SQLite store starts as a copy of an empty, migrated one: MLflow migrates a new database
    through every schema version (about 1.5 s of CPU), and a sweep or a test suite makes many. The
    template is migrated once per MLflow version, in the cache; call with the store's lock held."""
    if not tracking_uri.startswith("sqlite:///") or "?" in tracking_uri:
        return
    database = Path(tracking_uri[len("sqlite:///") :])
    if database.exists():
        return
    from mlflow import __version__ as mlflow_version
    from mlflow.tracking import MlflowClient

    from panacea_platform.models import cache_dir

    template = cache_dir() / "mlflow-stores" / f"empty-{mlflow_version}.db"
    try:
        if not template.is_file():
            template.parent.mkdir(parents=True, exist_ok=True)
            fresh = template.with_suffix(f".{os.getpid()}.tmp")
            MlflowClient(tracking_uri=f"sqlite:///{fresh}").search_experiments()  # migrates it
            # Without its Default experiment, whose artifact folder is the migrating process's working
            # directory: MLflow makes it anew in each copy, as in a store it migrated itself.
            with contextlib.closing(sqlite3.connect(fresh)) as connection, connection:
                connection.execute("delete from experiments")
            fresh.replace(template)  # atomic: a concurrent reader sees no template or a whole one
        database.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, database)
    except OSError:
        database.unlink(missing_ok=True)  # no usable cache (read-only home): MLflow migrates the store itself


# MLflow's UI shows an experiment of this kind as model training (its runs), not as a GenAI app (traces).
EXPERIMENT_KIND_TAGS = {"mlflow.experimentKind": "custom_model_development"}
DESCRIPTION_TAG = "mlflow.note.content"  # the run page's Description (Markdown)


DESCRIPTION_LIMIT = 8000  # MLflow's MAX_TAG_VAL_LENGTH


def fit_description(text: str, whole_at: str | None = None) -> str:
    """`text` as a description MLflow keeps whole: unchanged when short enough, else its first lines, with
    an open code fence closed and a last line saying it was cut and where the whole text is."""
    if len(text) <= DESCRIPTION_LIMIT:
        return text
    where = f"; the whole text is this run's artifact {whole_at}" if whole_at else ""
    tail = f"\n\n(cut at MLflow's limit of {DESCRIPTION_LIMIT} characters{where})"
    kept = text[: DESCRIPTION_LIMIT - len(tail) - len("\n```")]
    kept = kept[: kept.rfind("\n")] if "\n" in kept else kept
    if kept.count("```") % 2:
        kept += "\n```"
    return kept + tail


def runs_page(tracking_uri: str, experiment_id: str) -> str:
    """Where a reader sees the experiment's runs. MLflow 3's UI opens an experiment on the GenAI overview
    in a browser that has not chosen "Model training"; this link names the runs page and the workflow."""
    page = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {tracking_uri}, then http://127.0.0.1:5000/{page}"


class TrackingUnreachableError(RuntimeError):
    """The tracking server stayed out of reach through all of MLflow's retries; the message says what to do."""


def retry_budget_s() -> float:
    """How long MLflow's client keeps retrying one request to a server that does not answer: its
    MLFLOW_HTTP_REQUEST_MAX_RETRIES retries, back-off doubling from MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR s
    (capped at 120 s, urllib3's maximum); about 4 minutes by default, so a restart within a minute is ridden out."""
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_MAX_RETRIES

    factor = MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()
    return float(sum(min(factor * 2**attempt, 120) for attempt in range(MLFLOW_HTTP_REQUEST_MAX_RETRIES.get())))


@contextlib.contextmanager
def _reaching(tracking_uri: str, what: str):
    """Turn MLflow's give-up on an unreachable server into one line (its own message is a page of urllib3)."""
    started = time.monotonic()
    try:
        yield
    except Exception as exc:
        if "Max retries exceeded" not in str(exc) and "Connection refused" not in str(exc):
            raise
        raise TrackingUnreachableError(
            f"the tracking server at {tracking_uri} did not answer for {time.monotonic() - started:.0f} s, through "
            f"MLflow's retries (about {retry_budget_s():.0f} s: MLFLOW_HTTP_REQUEST_MAX_RETRIES and "
            f"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR set it), while {what}: start the server again and rerun the command"
        ) from None


class Tracker:
    """One MLflow run. Use as a context manager; the run ends when the block does."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        artifact_root: str | Path | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        from mlflow.tracking import MlflowClient

        with sqlite_store_lock(tracking_uri):
            seed_new_sqlite_store(tracking_uri)
            self.client = MlflowClient(tracking_uri=tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
        if found is None:
            # A tracking server decides where artifacts go (proxied, --serve-artifacts): a local folder
            # named here would be one process's disk, out of the team's reach.
            local = artifact_root is not None and not tracking_uri.startswith(("http://", "https://"))
            location = Path(artifact_root).resolve().as_uri() if local and artifact_root is not None else None
            experiment_id = self.client.create_experiment(
                experiment, artifact_location=location, tags=EXPERIMENT_KIND_TAGS
            )
        else:
            experiment_id = found.experiment_id
            for key, value in EXPERIMENT_KIND_TAGS.items():  # experiments made before the tag was set
                if key not in found.tags:
                    self.client.set_experiment_tag(experiment_id, key, value)
        self.experiment_id = experiment_id
        all_tags = {**code_version(), **(tags or {})}
        if parent_run_id is not None:
            all_tags["mlflow.parentRunId"] = parent_run_id
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
        self.tracking_uri = tracking_uri
        self._ended = False

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str) -> Tracker:
        """Log to a run another process opened (the driver of a distributed run ends it)."""
        from mlflow.tracking import MlflowClient

        tracker = cls.__new__(cls)
        tracker.client = MlflowClient(tracking_uri=tracking_uri)
        tracker.tracking_uri = tracking_uri
        info = tracker.client.get_run(run_id).info
        tracker.run_id, tracker.experiment_id = info.run_id, info.experiment_id
        tracker._ended = False
        return tracker

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        if items:
            with _reaching(self.tracking_uri, f"logging step {step}'s metrics"):
                self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path or path.name)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def describe(self, text: str, whole_at: str | None = None) -> None:
        """The run's Description in the MLflow UI (Markdown). Past MLflow's limit on a tag's length it is
        cut here, at a line's end with its code block closed, and says where the whole text is
        (`whole_at`, an artifact's name); MLflow would cut it mid-line and warn on the terminal."""
        self.set_tags({DESCRIPTION_TAG: fit_description(text, whole_at)})

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        """Rows of one shape as an MLflow table (`name` ends in .json): the UI shows it as a table."""
        if rows:
            self.client.log_table(self.run_id, {key: [row.get(key) for row in rows] for key in rows[0]}, name)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self.client.log_text(self.run_id, json.dumps(data, indent=2, default=str), name)

    def end(self, status: str = "FINISHED") -> None:
        if not self._ended:
            self.client.set_terminated(self.run_id, status=status)
            self._ended = True

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:  # never swallows the exception
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED")
        elif issubclass(exc_type, TrackingUnreachableError):
            pass  # the run cannot be marked FAILED on a server that does not answer; it stays RUNNING there
        else:
            self.set_tags({"error": f"{exc_type.__name__}: {exc}"[:5000]})
            self.end("FAILED")
