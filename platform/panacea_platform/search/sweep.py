"""A hyper-parameter sweep: Ray Tune over a search space, one Ray Train run per trial, an MLflow tree.

Layout of a sweep named NAME (folder <output_dir>/sweeps/NAME):

- sweep.json: the state file (parent MLflow run id, fingerprint of space + base job);
- tune/: the Tune experiment (what Tuner.restore resumes);
- trials/<trial id>/: each trial's run folder (adapter, eps, history, summary, eval);
- train/: Ray Train's own records of each trial's fit.

MLflow: one parent run per sweep; each trial is a child run (tag mlflow.parentRunId,
tag tune_trial_id) that the trial function opens, or finds again by that tag
when a trial is restarted after the driver died. A driver-side Tune callback
ends each child truthfully: KILLED (tag stopped_by) when the scheduler stopped
it early, FAILED (tag error) when it raised; a finished trial ends FINISHED.

Resume: rerunning the same command finds sweep.json, checks that the space and
base job are unchanged (else SweepMismatchError) and restores the Tune
experiment: finished trials are not run again, unfinished ones restart and log
into their existing child run from the step after the last one logged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from panacea_platform import console
from panacea_platform.config import ConfigError, RunConfig, config_from_dict
from panacea_platform.config_checks import load_checked
from panacea_platform.search.plan import (
    FINAL_KEY,
    SweepPlan,
    compute_score,
    find_child_run,
    summary_line,
)
from panacea_platform.search.report import SWEEP_TAG, TRIAL_TAG
from panacea_platform.search.space import SearchSpace, check_against_job, check_trial_scaling, config_with, load_space
from panacea_platform.search.study_config import STUDY_TAG, study_tag
from panacea_platform.storage import Storage
from panacea_platform.tracking import Tracker, code_version, default_tracking_uri, package_versions, runs_page

STATE_FILE = "sweep.json"
DEFAULT_JOB = "jobs/offline_default.yaml"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SweepMismatchError(ConfigError):
    """A sweep folder that was started with another space or base job."""


class SweepError(ConfigError):
    """A sweep that cannot start or resume as asked; the message says what to do."""


def trial_config(plan: SweepPlan, params: dict[str, Any], trial_id: str) -> RunConfig:
    """The trial's RunConfig: base job + fixed and sampled values, its own run name and folder."""
    space = plan.search_space()
    changes: dict[str, Any] = {
        **space.fixed,
        **params,
        "run_name": trial_id,
        "output_dir": str(Path(plan.sweep_dir) / "trials"),
        "tracking.tracking_uri": plan.tracking_uri,
        "tracking.experiment": plan.experiment,
    }
    if space.eval_every is not None:
        changes["optim.eval_every"] = space.eval_every
    return config_with(config_from_dict(plan.base), changes)


def _open_child_run(plan: SweepPlan, config: RunConfig, trial_id: str, params: dict[str, Any]) -> tuple[Tracker, bool]:
    """Attach to the trial's existing child run (a restart) or open it; returns (tracker, already finished)."""
    tracker_probe = Tracker.attach(plan.tracking_uri, plan.parent_run_id)
    experiment_id = tracker_probe.client.get_run(plan.parent_run_id).info.experiment_id
    existing = find_child_run(tracker_probe.client, experiment_id, plan.parent_run_id, trial_id)
    if existing is not None:
        tracker = Tracker.attach(plan.tracking_uri, existing.info.run_id)
        if existing.data.tags.get(FINAL_KEY) == "true" and existing.info.status == "FINISHED":
            return tracker, True
        tracker.client.update_run(existing.info.run_id, status="RUNNING")
        tracker.set_tags({"restarted": "true"})
        return tracker, False
    tracker = Tracker(
        plan.tracking_uri,
        plan.experiment,
        f"{plan.name}-{trial_id}",
        parent_run_id=plan.parent_run_id,
        tags={
            TRIAL_TAG: trial_id,
            SWEEP_TAG: plan.name,
            "stage": "finetune",
            "defence": config.defence,
            "sweep.params": json.dumps(params, sort_keys=True),
        },
    )
    # Provenance the issue asks for on every run (execute_stage adds the resolved config,
    # data fingerprints and package versions; judge and threshold are in evaluation.*).
    tracker.log_params({f"code.{key}": value for key, value in code_version().items()})
    return tracker, False


def _final_evaluation(
    config: RunConfig, adapter_dir: Path, run_id: str, out: Callable[[str], None]
) -> dict[str, float]:
    """evaluate_model on the released adapter (w_T + eps_T), logged into the trial's child run."""
    from panacea_platform.evaluation.evaluate import evaluate_model

    result = evaluate_model(
        config, str(adapter_dir), None, out=out, mlflow_run_id=run_id, output_dir=str(config.run_dir() / "eval")
    )
    return {key: float(value) for key, value in result.metrics().items() if isinstance(value, (int, float))}


def run_trial(tune_config: dict[str, Any], plan: SweepPlan) -> None:
    """The Tune trial function: one Ray Train fine-tune run, the final evaluation, the final report.

    `tune_config` is the sampled point of the param space: {"params": {dotted path: value}}.
    """
    from ray import tune

    from panacea_platform.algorithms.convention import with_convention
    from panacea_platform.search.callbacks import ScoredTuneReportCallback
    from panacea_platform.training.launch_ray import run_distributed

    params = dict(tune_config["params"])
    trial_id = tune.get_context().get_trial_id()
    space = plan.search_space()
    config = trial_config(plan, params, trial_id)
    tracker, finished = _open_child_run(plan, config, trial_id, params)
    if finished:
        # It finished before the driver died, but Tune's saved state did not record it yet.
        _report_final(dict(tracker.client.get_run(tracker.run_id).data.metrics))
        return
    try:
        config = with_convention(_align_trial(config, plan, trial_id, tracker.run_id))
        optim = config.optim
        result = run_distributed(
            config,
            "finetune",
            storage_path=f"{plan.storage}/train",
            report_every=optim.eval_every or optim.log_every,
            callbacks=[ScoredTuneReportCallback(space.score)],
            mlflow_run_id=tracker.run_id,
            # One Ray Train run per trial: a trial restarted after its driver died resumes from its last checkpoint.
            train_run_name=f"trial-{trial_id}",
            out=print,
        )
        final: dict[str, Any] = dict(result.summary)
        if space.evaluate:
            final.update(_final_evaluation(config, result.adapter_dir, tracker.run_id, print))
        score = compute_score(final, space.score)
        if score is not None:
            final["score"] = score
        steps = len(result.history)
        final["step"] = steps
        final[FINAL_KEY] = 1
        # The summary was logged by the stage and eval/* by evaluate_model: only the rest is new.
        tracker.log_metrics(
            {k: v for k, v in final.items() if k not in result.summary and k != "step" and not k.startswith("eval/")},
            steps,
        )
        tracker.set_tags({FINAL_KEY: "true"})
        tracker.end("FINISHED")
    except Exception as exc:
        # A scheduler's stop may have ended the run KILLED already: that status stands.
        if tracker.client.get_run(tracker.run_id).info.status == "RUNNING":
            tracker.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
            tracker.end("FAILED")
        raise
    _report_final(final)


def _align_trial(config: RunConfig, plan: SweepPlan, trial_id: str, run_id: str) -> RunConfig:
    """For an alignment-stage defence, the trial's own alignment (a child run of the trial's), then its
    adapter as the fine-tuning's starting point; other configs as they are."""
    from panacea_platform.training.alignment import aligning_defence
    from panacea_platform.training.launch_ray import run_distributed

    if config.model.adapter is not None or aligning_defence(config) is None:
        return config
    aligned = run_distributed(
        config_with(config, {"run_name": f"{trial_id}-align"}),
        "align",
        storage_path=f"{plan.storage}/train",
        parent_run_id=run_id,
        train_run_name=f"trial-{trial_id}-align",
        out=print,
    )
    return config_with(config, {"model.adapter": str(aligned.adapter_dir)})


def _report_final(final: dict[str, Any]) -> None:
    """The trial's last report, with a small checkpoint so Tune's Result.metrics is set."""
    from ray import tune

    with tempfile.TemporaryDirectory(prefix="panacea-trial-final-") as folder:
        (Path(folder) / "final.json").write_text(json.dumps(final, default=str))
        tune.report({**final, FINAL_KEY: 1}, checkpoint=tune.Checkpoint.from_directory(folder))


# -- progress ----------------------------------------------------------------------------------------


# -- the driver ---------------------------------------------------------------------------------------


@dataclass
class SweepOutcome:
    name: str
    sweep_dir: Path
    parent_run_id: str
    tracking_uri: str
    status: str
    trials: list[Any] = field(default_factory=list)  # report.TrialRow
    front: list[bool] = field(default_factory=list)
    plot: Path | None = None
    wall_s: float = 0.0


def sweep_fingerprint(space: SearchSpace, base: RunConfig) -> str:
    """What a resumed sweep must share with the one it resumes: the space and the resolved base job."""
    payload = {"space": space.model_dump(mode="json"), "base": base.to_dict()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def sweep_folder(base: RunConfig, name: str) -> Path:
    return (Path(base.output_dir) / "sweeps" / name).resolve()


def sweep_storage(base: RunConfig, name: str) -> Storage:
    """Where the sweep's state lives: <scaling.storage>/sweeps/<name> when the job names storage (a
    cluster's shared folder or bucket), else the sweep's own folder."""
    if base.scaling.storage:
        return Storage.at(base.scaling.storage).join("sweeps", name)
    return Storage.at(sweep_folder(base, name))


def _read_state(storage: Storage) -> dict[str, Any] | None:
    text = storage.read_text(STATE_FILE)
    return json.loads(text) if text is not None else None


def _write_state(storage: Storage, state: dict[str, Any]) -> None:
    storage.write_text(STATE_FILE, json.dumps(state, indent=2))


def init_ray_for_sweep() -> None:
    """RAY_ADDRESS's cluster, else this machine's one Ray; trial output stays in Ray's logs."""
    from panacea_platform.ray_instance import connect_ray

    connect_ray(log_to_driver=False)


def _searcher(space: SearchSpace):
    if space.searcher in ("random", "grid"):
        return None  # Tune's BasicVariantGenerator: grid values in order, the rest sampled
    from ray.tune.search import create_searcher

    return create_searcher(space.searcher)


def _scheduler(space: SearchSpace, base: RunConfig):
    if space.scheduler.type == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    spec = space.scheduler
    max_t = spec.max_t or base.optim.max_steps
    if max_t is None:
        raise SweepError(
            "scheduler.max_t: the base job counts epochs, not steps; set scheduler.max_t or optim.max_steps"
        )
    # stop_last_trials=False: reaching max_t is the trial's normal end, not a stop by the scheduler.
    return ASHAScheduler(
        time_attr="step",
        max_t=max_t,
        grace_period=min(spec.grace_period, max_t),
        reduction_factor=spec.reduction_factor,
        stop_last_trials=False,
    )


def _aligned_base(base: RunConfig, space: SearchSpace, parent: Tracker, out: Callable[[str], None]) -> RunConfig:
    """The base job with an aligned adapter: the given one, the main job's cached one, or one trained now (once).
    A sweep of an alignment-stage defence gets none: each trial aligns with its own values (run_trial)."""
    from panacea_platform.config import with_changes
    from panacea_platform.training.alignment import aligning_defence, ensure_aligned

    if aligning_defence(config_with(base, dict(space.fixed))) is not None:
        out("[sweep] the defence acts at alignment: each trial aligns with its own values, then fine-tunes")
        return base
    adapter, _ = ensure_aligned(base, parent, out)
    return with_changes(base, {"model.adapter": str(Path(adapter).resolve())})


def _open_parent(
    state: dict[str, Any] | None,
    base: RunConfig,
    space: SearchSpace,
    name: str,
    tracking_uri: str,
    space_path: Path,
    fingerprint: str,
) -> Tracker:
    if state is not None:
        parent = Tracker.attach(tracking_uri, state["parent_run_id"])
        parent.client.update_run(parent.run_id, status="RUNNING")
        parent.set_tags({"resumed": "true"})
        return parent
    parent = Tracker(
        tracking_uri,
        base.tracking.experiment,
        f"sweep-{name}",
        artifact_root=Path(base.output_dir) / "mlartifacts",
        tags={
            "stage": "sweep",
            SWEEP_TAG: name,
            "sweep.fingerprint": fingerprint,
            "sweep.parameters": json.dumps(list(space.parameters)),
            "sweep.objectives": json.dumps([[o.metric, o.mode] for o in space.active_objectives()]),
            "sweep.metric": space.metric,
            "sweep.mode": space.mode,
            **({STUDY_TAG: study_tag(space)} if space.study is not None else {}),
        },
    )
    parent.log_params({f"space.{key}": value for key, value in _flat(space.model_dump(mode="json")).items()})
    parent.log_params({**{f"base.{k}": v for k, v in base.flat().items()}, **package_versions()})
    parent.log_artifact(space_path)
    return parent


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            out.update(_flat(value, dotted + "."))
        else:
            out[dotted] = json.dumps(value)
    return out


def run_sweep(
    space_path: str | Path,
    job: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    name: str | None = None,
    resume: bool = False,
    retry_errored: bool = False,
    out: Callable[[str], None] = print,
    progress_every_s: float = 15.0,
) -> SweepOutcome:
    """Run (or resume) the sweep a search space describes; returns the trials, the front and the plot.

    `job` (default: the space's base_job, else jobs/offline_default.yaml) plus `overrides` is the base
    RunConfig; `name` (default: the space file's stem) names the sweep: the same name again resumes it.
    `resume=True` insists that there is a sweep to resume; `retry_errored` runs failed trials again."""
    space_path = Path(space_path)
    space = load_space(space_path)
    job = job or space.base_job or DEFAULT_JOB
    base = _checked_base(space, job, overrides, out)
    name = name or space_path.stem
    if not _NAME.match(name):
        raise SweepError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (it names a folder)")
    sweep_dir = sweep_folder(base, name)
    console.open_run_log(base.output_dir, f"sweep-{name}", out)
    storage = sweep_storage(base, name)
    fingerprint = sweep_fingerprint(space, base)
    state = _existing_state(storage, name, fingerprint, resume)
    tracking_uri = base.tracking.tracking_uri or default_tracking_uri(base.output_dir)
    _start_ray_and_tune()
    parent = _open_parent(state, base, space, name, tracking_uri, space_path, fingerprint)
    if state is None:
        _write_state(
            storage,
            {
                "name": name,
                "parent_run_id": parent.run_id,
                "fingerprint": fingerprint,
                "tracking_uri": tracking_uri,
                "experiment": base.tracking.experiment,
                "space": str(space_path),
                "job": str(job),
                "overrides": list(overrides),
            },
        )
    out(
        f"[sweep {name}] {'started' if state is None else 'resuming'}: {storage.uri} (MLflow parent run "
        f"{parent.run_id})"
    )
    start = time.monotonic()
    try:
        aligned = _aligned_base(base, space, parent, out)
        plan = SweepPlan(
            name,
            str(sweep_dir),
            storage.uri,
            aligned.to_dict(),
            space.model_dump(mode="json"),
            tracking_uri,
            base.tracking.experiment,
            parent.run_id,
        )
        results = _tuner(plan, space, aligned, storage, retry_errored, out, progress_every_s).fit()
        errors = [r for r in results if r.error is not None]
        from panacea_platform.search.report import sweep_report

        report = sweep_report(tracking_uri, parent.run_id, out=out, output_dir=sweep_dir)
        status = "FAILED" if errors else "FINISHED"
        if errors:
            parent.set_tags({"error": f"{len(errors)} of {len(results)} trials failed (rerun with --retry-errored)"})
        parent.end(status)
    except KeyboardInterrupt:
        parent.end("KILLED")
        raise
    except BaseException as exc:
        parent.set_tags({"error": f"{type(exc).__name__}: {exc}"[:5000]})
        parent.end("FAILED")
        raise
    wall = time.monotonic() - start
    out(summary_line(name, report.trials, status, wall))
    out(f"MLflow: {runs_page(tracking_uri, parent.experiment_id)}")
    return SweepOutcome(
        name, sweep_dir, parent.run_id, tracking_uri, status, report.trials, report.front, report.plot, wall
    )


def _start_ray_and_tune() -> None:
    init_ray_for_sweep()
    # Trials report the scheduler's metric only at held-out evaluation steps, not at every step.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Tune's legacy reporter: its table in bars mode; at verbose=0 nothing, and ProgressCallback's lines.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def _checked_base(
    space: SearchSpace, job: str | Path, overrides: list[str] | tuple[str, ...], out: Callable[[str], None]
) -> RunConfig:
    """The base job with its overrides, checked with the space before Ray or the parent run starts: every
    value the space can give, the trials' scaling, the model, the tracking store, the storage, the suites."""
    from panacea_platform.preflight import check_before_work

    base = load_checked(job, overrides)
    check_against_job(space, base)
    check_trial_scaling(space, base)
    check_before_work(base)
    if space.evaluate and importlib.util.find_spec("panacea_platform.evaluation.evaluate") is None:
        raise SweepError(
            "evaluate: true needs panacea_platform.evaluation.evaluate (not installed); set evaluate: false"
        )
    if space.evaluate:
        from panacea_platform.evaluation.suites import check_suites

        base = check_suites(base, out)  # a bad or unreachable suite fails now, not after every trial trained
    return base


def _existing_state(storage: Storage, name: str, fingerprint: str, resume: bool) -> dict[str, Any] | None:
    """The saved state of the sweep of this name, if any: it must be this space's on this job."""
    state = _read_state(storage)
    if state is not None and state["fingerprint"] != fingerprint:
        raise SweepMismatchError(
            f"sweep {name!r} in {storage.uri} was started with another search space or base job "
            f"(fingerprint {state['fingerprint']} != {fingerprint}): pass another --name, or delete that folder to "
            "start over"
        )
    if resume and state is None:
        raise SweepError(
            f"--resume: there is no sweep {name!r} in {storage.uri} to resume (run without --resume to start it)"
        )
    return state


def _tuner(
    plan: SweepPlan,
    space: SearchSpace,
    base: RunConfig,
    storage: Storage,
    retry_errored: bool,
    out: Callable[[str], None],
    progress_every_s: float,
):
    from ray import tune

    from panacea_platform.search.callbacks import ProgressCallback, TrialStatusCallback, TrialTable

    resources = space.resources
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plan=plan),
        # The trial function only waits on its Ray Train workers, which reserve their own CPUs.
        {"CPU": resources.trial_cpus},
    )
    experiment = storage.join("tune").uri
    if tune.Tuner.can_restore(experiment):
        out(f"[sweep {plan.name}] restoring the Tune experiment (finished trials are kept)")
        return tune.Tuner.restore(
            experiment, trainable=trainable, resume_unfinished=True, resume_errored=False, restart_errored=retry_errored
        )
    scheduler_name = space.scheduler.type
    return tune.Tuner(
        trainable,
        param_space={"params": {path: dist.tune_domain() for path, dist in space.parameters.items()}},
        tune_config=tune.TuneConfig(
            metric=space.metric,
            mode=space.mode,
            num_samples=space.num_samples,
            search_alg=_searcher(space),
            scheduler=_scheduler(space, base),
            max_concurrent_trials=space.max_concurrent_trials,
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=storage.uri,
            callbacks=[TrialStatusCallback(plan, scheduler_name), ProgressCallback(plan, scheduler_name, out)],
            failure_config=tune.FailureConfig(max_failures=0),
            # Tune's own table shows the trials as they run (console.py); in lines mode, one line per trial.
            verbose=1 if console.bars() else 0,
            progress_reporter=TrialTable(space, progress_every_s) if console.bars() else None,
        ),
    )
