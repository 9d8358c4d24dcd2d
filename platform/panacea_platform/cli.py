"""`panacea`: the command line. Heavy libraries are imported inside commands so --help is instant."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from panacea_platform import console  # the standard library only: --help stays instant

DEFAULT_JOB = "jobs/offline_default.yaml"


def _add_config_args(parser: argparse.ArgumentParser, default: str | None = DEFAULT_JOB) -> None:
    parser.add_argument("--config", "-c", default=default, help=f"YAML job file (default: {default})")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. panacea.rho=0.5 optim.max_steps=10"
    )


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    """What a command that runs work prints (console.py)."""
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="one line per stage instead of progress bars (the default when output is not a terminal)",
    )
    shown.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="library warnings and Ray's own lines here too, not only in OUTPUT_DIR/logs/RUN_NAME.log",
    )


def _add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder to evaluate (default: the base model)")
    parser.add_argument(
        "--preset", default=None, help="evaluation preset YAML (e.g. evaluation/offline.yaml), applied before overrides"
    )


def _load(args: argparse.Namespace, before: list[str] | None = None):
    """The command's config: its job file, `before` (a preset's overrides), then its own overrides, checked."""
    from panacea_platform.config_checks import load_checked

    config = load_checked(args.config, (before or []) + list(args.overrides))
    if hasattr(args, "quiet"):  # a command that runs work: the libraries' output will go to the run's log
        console.plan_run_log(config.output_dir, config.run_name)
    return config


def _load_for_work(args: argparse.Namespace):
    """The config of a command that trains: its model and tracking store checked within seconds first."""
    from panacea_platform.preflight import check_before_work

    config = _load(args)
    check_before_work(config)
    console.open_run_log()
    return config


def cmd_align(args: argparse.Namespace) -> int:
    from panacea_platform.training.dispatch import train

    config = _load_for_work(args)
    result = train(config, "align")
    print(f"aligned adapter: {result.adapter_dir}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from panacea_platform.training.dispatch import train

    config = _load_for_work(args)
    result = train(config, "finetune")
    print(f"released adapter (w_T + eps_T): {result.adapter_dir}")
    if result.perturbation_path is not None:
        print(
            f"unperturbed adapter (w_T): {result.unperturbed_adapter_dir}\nperturbation eps_T: "
            f"{result.perturbation_path}"
        )
    return 0


def _demo_suffix(defences: list[str]) -> str:
    """'' for the default suite, '-paper' for the paper's comparison, '-d<hash>' for any other list of defences."""
    import hashlib

    from panacea_platform.recipes.main_job import DEMO_SUITES

    if defences == DEMO_SUITES["default"]:
        return ""
    if defences == DEMO_SUITES["paper-comparison"]:
        return "-paper"
    return "-d" + hashlib.sha256(",".join(defences).encode()).hexdigest()[:6]


def cmd_demo(args: argparse.Namespace) -> int:
    from panacea_platform.algorithms import DEFENCES
    from panacea_platform.config import ConfigError, with_changes
    from panacea_platform.recipes.main_job import DEMO_SUITES, report_demo, run_demo

    config = _load(args)
    if args.suite is not None and args.defences is not None:
        raise ConfigError("--suite and --defences both choose the defences: give one")
    unused = [
        flag
        for flag, given in (("--seeds", args.seeds), ("--no-control", args.no_control), ("--no-eval", args.no_eval))
        if given
    ]
    if args.report_only and unused:  # the saved rows decide them: a flag that changes nothing is refused
        raise ConfigError(f"--report-only trains nothing, so {unused[0]} changes nothing: leave it out")
    chosen = args.defences if args.defences is not None else ",".join(DEMO_SUITES[args.suite or "default"])
    defences = [d.strip() for d in chosen.split(",") if d.strip()]
    # Each choice of defences has its own rows, table and plots: one never overwrites another's.
    config = with_changes(config, {"run_name": config.run_name + _demo_suffix(defences)})
    if args.report_only:
        report_demo(config)
        return 0
    from panacea_platform.preflight import check_before_work

    check_before_work(config)
    unknown = [d for d in defences if d not in DEFENCES]
    if unknown or not defences:
        raise ConfigError(f"--defences {chosen!r}: expected a comma list of {', '.join(DEFENCES.names())}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: expected a comma list of integers, e.g. 0,1,2") from None
    if seeds is not None and (not seeds or min(seeds) < 0):
        raise ConfigError(f"--seeds {args.seeds!r}: expected non-negative integers")
    run_demo(
        config, defences, seeds=seeds, control=not args.no_control, evaluate=not args.no_eval, command=args.command_line
    )
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from panacea_platform.config_checks import load_checked

    if args.action == "show":
        config = load_checked(args.config, args.overrides)
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    if args.action == "fields":
        from panacea_platform.config import RunConfig

        _print_fields(RunConfig, "")
        return 0
    for path in _job_files(args.paths):
        load_checked(path)
        print(f"ok: {path}")
    return 0


def _job_files(paths: list[str]) -> list[str]:
    """The given files, and every *.yaml under the given folders, in order."""
    from panacea_platform.config import ConfigError

    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(str(p) for p in path.rglob("*.yaml"))
        elif path.is_file():
            files.append(str(path))
        else:
            raise ConfigError(f"config validate {str(path)!r}: no such file or folder; give job files or folders")
    return files


def _print_fields(model, prefix: str) -> None:
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _print_fields(annotation, key + ".")
        else:
            print(f"{key:<36} {field.description or ''}")


def cmd_list(args: argparse.Namespace) -> int:
    from panacea_platform.algorithms import DEFENCES
    from panacea_platform.data import HARMFUL_SOURCES, TASKS
    from panacea_platform.evaluation.judges import JUDGES
    from panacea_platform.evaluation.metrics import ACCURACY_RULES
    from panacea_platform.evaluation.suites import METRICS, SUITE_SOURCES, preset_dirs
    from panacea_platform.models import OFFLINE_MODELS

    print("defences (the stages each acts at):")
    for name in DEFENCES.names():
        print(f"  {name:<20} {', '.join(DEFENCES.get(name).stages) or '- (plain SFT)'}")
    for title, registry in (
        ("tasks", TASKS),
        ("harmful sources", HARMFUL_SOURCES),
        ("offline models", OFFLINE_MODELS),
        ("judges", JUDGES),
        ("accuracy rules", ACCURACY_RULES),
    ):
        print(f"{title}: {', '.join(registry.names())}")
    print(f"suite metrics: {', '.join(METRICS)}")
    print("suite sources:")
    for name in SUITE_SOURCES.names():
        source = SUITE_SOURCES.get(name)
        print(f"  {name:<18} {source.description}{' (hub)' if source.needs_hub else ''}")
    presets = sorted({p.stem for folder in preset_dirs() if folder.is_dir() for p in folder.glob("*.yaml")})
    print(f"suite presets (evaluation/suites/): {', '.join(presets)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from panacea_platform.config import ConfigError
    from panacea_platform.diagnostics.bench_step import bench_step

    config = _load(args)
    console.open_run_log()
    try:
        intervals = tuple(int(k) for k in args.refresh_every.split(",") if k.strip())
    except ValueError:
        raise ConfigError(
            f"--refresh-every {args.refresh_every!r}: expected a comma list of integers, e.g. 2,4"
        ) from None
    if any(k < 1 for k in intervals):
        raise ConfigError(f"--refresh-every {args.refresh_every!r}: each interval must be >= 1")
    result = bench_step(
        config,
        warmup=args.warmup,
        repeats=args.repeats,
        baselines=args.baselines,
        zero_stage=args.zero_stage,
        refresh_every=intervals,
    )
    return 0 if result["panacea_state_within_bound"] else 1  # a memory regression fails the command


def cmd_evaluate(args: argparse.Namespace) -> int:
    from panacea_platform.evaluation.evaluate import evaluate_model, format_result, preset_overrides

    config = _load(args, preset_overrides(args.preset))
    adapter = args.adapter
    if args.run_id is not None and adapter is None:
        config, adapter = _released_model(config, args.run_id, args.output_dir)
    result = evaluate_model(config, adapter, args.perturbation, mlflow_run_id=args.run_id, output_dir=args.output_dir)
    print(format_result(result))
    return 0


def _released_model(config, run_id: str, output_dir: str | None):
    """The run's released adapter, downloaded through the tracking store, on the run's base model."""
    from panacea_platform.config import with_changes
    from panacea_platform.evaluation.evaluate import released_model_of_run
    from panacea_platform.preflight import check_before_work
    from panacea_platform.tracking import default_tracking_uri

    uri = config.tracking.tracking_uri or default_tracking_uri(config.output_dir)
    into = Path(output_dir or Path(config.output_dir) / "evaluated" / run_id) / "downloaded"
    adapter, model = released_model_of_run(uri, run_id, into)
    config = with_changes(config, {f"model.{key}": value for key, value in model.items()})
    check_before_work(config)
    print(f"[evaluate] run {run_id}: its released adapter, downloaded to {adapter}, on {config.model.name}")
    return config, str(adapter)


def cmd_bench_eval(args: argparse.Namespace) -> int:
    from panacea_platform.diagnostics.bench_eval import bench_eval
    from panacea_platform.evaluation.evaluate import preset_overrides

    config = _load(args, preset_overrides(args.preset))
    if args.decoder_dtypes:
        from panacea_platform.diagnostics.bench_decoder import bench_decoder_dtypes, parse_dtypes

        bench_decoder_dtypes(config, parse_dtypes(args.decoder_dtypes), args.prompts, args.adapter)
        return 0
    result = bench_eval(config, args.prompts, args.adapter, loop_threads=args.loop_threads)
    # Different greedy answers mean the pipeline is wrong, however fast it is.
    return 1 if result.mismatches else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from panacea_platform.search.sweep import run_sweep

    outcome = run_sweep(
        args.space, args.config, args.overrides, name=args.name, resume=args.resume, retry_errored=args.retry_errored
    )
    return 0 if outcome.status == "FINISHED" else 1


def _tracking_uri(args: argparse.Namespace) -> tuple[str, str]:
    from panacea_platform.tracking import default_tracking_uri

    config = _load(args)
    return args.tracking_uri or config.tracking.tracking_uri or default_tracking_uri(
        config.output_dir
    ), config.tracking.experiment


def cmd_compare(args: argparse.Namespace) -> int:
    from panacea_platform.recipes.comparison import compare_files

    print(compare_files(args.reference, args.others))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from panacea_platform.search.report import sweep_report

    uri, experiment = _tracking_uri(args)
    sweep_report(uri, args.sweep, experiment=experiment, output_dir=args.output_dir)
    return 0


def cmd_bench_sweep(args: argparse.Namespace) -> int:
    from panacea_platform.diagnostics.bench_sweep import bench_sweep

    uri, experiment = _tracking_uri(args)
    bench_sweep(uri, args.sweep, experiment=experiment)
    return 0


def _add_sweep_lookup_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sweep", required=True, help="sweep name (panacea sweep --name) or its MLflow parent run id")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the -c job's)")
    _add_config_args(parser)


def cmd_tracking_server(args: argparse.Namespace) -> int:
    from panacea_platform.team_server.serve import serve

    return serve(
        Path(args.data),
        args.port,
        args.db_port,
        Path(args.artifacts) if args.artifacts else None,
        args.host,
        auth=not args.no_auth,
        db_host=args.db_host,
        admin_password_file=Path(args.admin_password_file) if args.admin_password_file else None,
    )


def cmd_team(args: argparse.Namespace) -> int:
    import os

    from panacea_platform.config import ConfigError
    from panacea_platform.preflight import tracking_problem
    from panacea_platform.team_server.members import add_member, grant

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri or not uri.startswith(("http://", "https://")):
        raise ConfigError("--tracking-uri: give the team server's URL (http://HOST:PORT), or set MLFLOW_TRACKING_URI")
    problem = tracking_problem(uri)
    if problem:
        raise ConfigError(problem)
    if args.action == "grant":
        grant(uri, args.username, args.experiment, args.permission)
        print(f"{args.username}: {args.permission} on experiment {args.experiment!r}")
        return 0
    if (args.experiment is None) != (args.permission is None):
        raise ConfigError("--experiment and --permission go together: give both, or neither")
    written = add_member(
        uri,
        args.username,
        Path(args.credentials_out or f"{args.username}.mlflow-credentials"),
        args.experiment,
        args.permission or "READ",
    )
    granted = f", {args.permission} on experiment {args.experiment!r}" if args.experiment else ""
    print(
        f"added {args.username}{granted}; their credentials are in {written} (mode 0600): hand it over privately, "
        "to be saved as ~/.mlflow/credentials on their machines"
    )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from panacea_platform.config import ConfigError
    from panacea_platform.diagnostics.memory_plan import count_model, format_plan, plan

    config = _load(args)
    console.open_run_log()
    try:
        gpus = [int(g) for g in args.gpus.split(",")]
        stages = [int(s) for s in args.stages.split(",")]
    except ValueError:
        raise ConfigError(
            f"--gpus {args.gpus!r} / --stages {args.stages!r}: expected comma lists of integers"
        ) from None
    if any(g < 1 for g in gpus) or any(s not in (2, 3) for s in stages):
        raise ConfigError("--gpus must be >= 1 and --stages each 2 or 3")
    counts = count_model(config.model.name, config.lora.target_modules, config.lora.rank)
    optim, seq, model = config.optim, config.data.max_length, config.model
    rows = [
        plan(
            counts,
            g,
            s,
            optim.batch_size,
            seq,
            weight_dtype=model.dtype,
            compute_dtype=model.compute_dtype,
            accumulation=optim.grad_accum_steps,
        )
        for s in stages
        for g in gpus
    ]
    print(format_plan(counts, rows, optim.batch_size, seq, args.gpu_memory, model.dtype))
    if not args.measure:
        return 0
    from panacea_platform.diagnostics.memory_check import check_memory, format_check

    check = check_memory(config)
    print(format_check(check))
    return 0 if check.agrees else 1


def _add_align(sub: Any) -> None:
    align = sub.add_parser("align", help="safety-align the base model on refusals; writes the aligned adapter")
    _add_config_args(align)
    _add_output_args(align)
    align.set_defaults(func=cmd_align)


def _add_finetune(sub: Any) -> None:
    finetune = sub.add_parser(
        "finetune", help="fine-tune on a poisoned task set with a defence (sft, random_perturbation, panacea)"
    )
    _add_config_args(finetune)
    _add_output_args(finetune)
    finetune.set_defaults(func=cmd_finetune)


def _add_demo(sub: Any) -> None:
    demo = sub.add_parser("demo", help="the main job: align, then attack and defend the aligned model, and compare")
    _add_config_args(demo)
    demo.add_argument(
        "--defences",
        default=None,
        help="comma list of defences to compare at the job's harmful ratio (default: the --suite's)",
    )
    demo.add_argument(
        "--suite",
        default=None,
        choices=["default", "paper-comparison"],
        help="default: sft,random_perturbation,panacea; paper-comparison: also vaccine, repnoise, booster (their "
        "own alignment), lisa and antidote, as the Panacea paper compares them",
    )
    demo.add_argument("--seeds", default=None, help="comma list of seeds, e.g. 0,1,2 (default: the job's seed)")
    demo.add_argument("--no-control", action="store_true", help="skip the SFT run at p = 0 (the control row)")
    demo.add_argument("--no-eval", action="store_true", help="skip generation and judging (held-out losses only)")
    demo.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: rebuild the table and plots from the last run's saved rows (e.g. after a sweep)",
    )
    _add_output_args(demo)
    demo.set_defaults(func=cmd_demo)


def _add_config(sub: Any) -> None:
    # One parser per action, each with only its own arguments: an argument an action does not use is an error.
    config = sub.add_parser("config", help="show the resolved configuration, list its fields, or validate job files")
    actions = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="the resolved configuration of a job file and overrides, as YAML")
    _add_config_args(show)
    actions.add_parser("fields", help="every configuration key, its type, default and description")
    validate = actions.add_parser("validate", help="check job files, and every job file under folders")
    validate.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        default=["jobs"],
        help="job files or folders (every *.yaml under them); default: jobs/",
    )
    config.set_defaults(func=cmd_config)


def _add_list(sub: Any) -> None:
    listing = sub.add_parser("list", help="registered defences, tasks, harmful sources and offline models")
    listing.set_defaults(func=cmd_list)


def _add_tracking_server(sub: Any) -> None:
    server = sub.add_parser(
        "tracking-server", help="a team's MLflow server: PostgreSQL backend store, artifacts proxied to shared storage"
    )
    server.add_argument(
        "--data",
        required=True,
        help="folder for PostgreSQL's data, the server's log and (by "
        "default) the artifacts; on a cluster, on the head node or shared storage",
    )
    server.add_argument(
        "--artifacts", default=None, help="artifact destination (default DATA/artifacts): shared storage"
    )
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for a cluster's nodes)")
    server.add_argument("--port", type=int, default=5000, help="the MLflow server's port (default 5000)")
    server.add_argument("--db-port", type=int, default=5432, help="PostgreSQL's port (default 5432)")
    server.add_argument(
        "--db-host",
        default="127.0.0.1",
        help="address PostgreSQL listens on (default 127.0.0.1: "
        "only this machine; any other needs its password, in DATA/postgres.pgpass)",
    )
    server.add_argument(
        "--admin-password-file",
        default=None,
        help="file (mode 0600) holding the MLflow admin's "
        "password for the first start; default $MLFLOW_AUTH_ADMIN_PASSWORD, else one generated into "
        "DATA/admin-password",
    )
    server.add_argument("--no-auth", action="store_true", help="no authentication (refused unless --host is loopback)")
    server.set_defaults(func=cmd_tracking_server)


def _add_team(sub: Any) -> None:
    from panacea_platform.team_server.auth import GRANTABLE  # a light module: --help stays instant

    team = sub.add_parser("team", help="team members on the tracking server: add one, grant READ/EDIT/MANAGE")
    actions = team.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser(
        "add-member",
        help="create a user with a generated password, written to a credentials "
        "file for them; optionally grant a permission on an experiment",
    )
    add.add_argument(
        "--credentials-out",
        default=None,
        help="where to write their credentials (mode 0600; default ./USERNAME.mlflow-credentials)",
    )
    change = actions.add_parser("grant", help="grant a member READ, EDIT, MANAGE or NO_PERMISSIONS on an experiment")
    for parser, required in ((add, False), (change, True)):
        parser.add_argument("username")
        parser.add_argument("--experiment", required=required, default=None, help="the experiment's name")
        parser.add_argument(
            "--permission", required=required, default=None, choices=GRANTABLE, help="what they may do there"
        )
        parser.add_argument("--tracking-uri", default=None, help="the team server (default $MLFLOW_TRACKING_URI)")
    team.set_defaults(func=cmd_team)


def _add_plan(sub: Any) -> None:
    plan_parser = sub.add_parser("plan", help="plans: per-GPU memory of a job under ZeRO-2/3")
    plan_sub = plan_parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    memory = plan_sub.add_parser(
        "memory", help="weights, gradients, optimizer states, activations per GPU (DeepSpeed's estimators)"
    )
    _add_config_args(memory)
    memory.add_argument("--gpus", default="1,4,8", help="comma list of GPU counts (default 1,4,8)")
    memory.add_argument("--stages", default="2,3", help="comma list of ZeRO stages (default 2,3)")
    memory.add_argument("--gpu-memory", type=float, default=80.0, help="GPU memory in GB (default 80)")
    memory.add_argument(
        "--measure",
        action="store_true",
        help="also measure one Panacea step of the job's model here (ZeRO-2, one rank) and compare "
        "it with the plan; exit 1 if they differ by more than 25%%",
    )
    _add_output_args(memory)
    memory.set_defaults(func=cmd_plan)


def _add_bench(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="what", required=True, metavar="WHAT")
    step = bench_sub.add_parser("step", help="time and memory of the SFT step against the Panacea step")
    _add_config_args(step)
    step.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    step.add_argument("--repeats", type=int, default=5, help="timed steps; the median is reported (default 5)")
    step.add_argument(
        "--baselines",
        action="store_true",
        help="also time a step of Vaccine, RepNoise, Booster and Lisa, as ratios to SFT's",
    )
    step.add_argument(
        "--refresh-every",
        default="",
        metavar="K,K",
        help="also time the amortised Panacea step at these panacea.refresh_every values, e.g. 2,4",
    )
    step.add_argument(
        "--zero-stage",
        type=int,
        choices=(0, 1, 2, 3),
        default=None,
        help="run every step on a one-rank DeepSpeed engine at this ZeRO stage (default: in this process)",
    )
    _add_output_args(step)
    step.set_defaults(func=cmd_bench)
    bench_eval = bench_sub.add_parser(
        "eval", help="evaluation throughput: the Ray Data pipeline against one prompt at a time (same answers)"
    )
    _add_config_args(bench_eval)
    _add_eval_args(bench_eval)
    bench_eval.add_argument("--prompts", type=int, default=None, help="evaluate the first N prompts (default: all)")
    bench_eval.add_argument(
        "--loop-threads", type=int, default=None, help="torch threads of the one-at-a-time loop (default: torch's)"
    )
    bench_eval.add_argument(
        "--decoder-dtypes",
        default="",
        metavar="A,B",
        help="instead of the loop: the pipeline once per decoder dtype (float32, bfloat16), the first the reference: "
        "speed ratios, identical answers, every suite's headline and its paired difference",
    )
    _add_output_args(bench_eval)
    bench_eval.set_defaults(func=cmd_bench_eval)
    bench_sweep_parser = bench_sub.add_parser(
        "sweep", help="a sweep's overhead: its wall time against the sum of its trials' training time"
    )
    _add_sweep_lookup_args(bench_sweep_parser)
    bench_sweep_parser.set_defaults(func=cmd_bench_sweep)


def _add_sweep(sub: Any) -> None:
    sweep = sub.add_parser(
        "sweep", help="Ray Tune search over rho, lambda or any field; one MLflow parent run, a child per trial"
    )
    sweep.add_argument("--space", "-s", required=True, help="search-space YAML (see search_spaces/)")
    _add_config_args(sweep, default=None)
    sweep.add_argument("--name", default=None, help="sweep name (default: the space file's name); rerun to resume")
    sweep.add_argument("--resume", action="store_true", help="insist on resuming an existing sweep of this name")
    sweep.add_argument(
        "--retry-errored",
        action="store_true",
        help="on resume, run failed trials again (from their last checkpoint, if they wrote one)",
    )
    _add_output_args(sweep)
    sweep.set_defaults(func=cmd_sweep)


def _add_report(sub: Any) -> None:
    report = sub.add_parser("report", help="a sweep's trials table and Pareto plot (PNG + MLflow artifact)")
    _add_sweep_lookup_args(report)
    report.add_argument(
        "--output-dir", default=None, help="where pareto.png and trials.txt go (default: a temp folder)"
    )
    report.set_defaults(func=cmd_report)


def _add_compare(sub: Any) -> None:
    compare = sub.add_parser(
        "compare",
        help="evaluated models against a reference on the same prompts: rates with 95%% intervals, paired differences",
    )
    compare.add_argument(
        "reference",
        help="the reference's samples.jsonl or its folder (e.g. RUN/eval-adapter); a comma list: one per seed",
    )
    compare.add_argument(
        "others", nargs="+", help="the models compared with it (samples.jsonl or folders; comma lists of seeds)"
    )
    compare.set_defaults(func=cmd_compare)


def _add_evaluate(sub: Any) -> None:
    evaluate = sub.add_parser(
        "evaluate", help="harmful score (HS, HS+), refusal rate and task accuracy of a model, on Ray Data"
    )
    _add_config_args(evaluate)
    _add_eval_args(evaluate)
    evaluate.add_argument(
        "--perturbation", default=None, help="perturbation.safetensors to add to the adapter (w + eps)"
    )
    evaluate.add_argument(
        "--run-id",
        default=None,
        help="MLflow run evaluated: metrics, tags and files are logged "
        "there; without --adapter its released adapter and base model are downloaded from it",
    )
    evaluate.add_argument("--output-dir", default=None, help="where samples.jsonl and eval_summary.json go")
    _add_output_args(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="panacea", description="Harmful fine-tuning defences (Panacea and baselines): train, compare, track."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # One function per subcommand, in the order `panacea --help` lists them.
    for add in (
        _add_align,
        _add_finetune,
        _add_demo,
        _add_config,
        _add_list,
        _add_tracking_server,
        _add_team,
        _add_plan,
        _add_bench,
        _add_sweep,
        _add_report,
        _add_compare,
        _add_evaluate,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from panacea_platform.models import silence_peft_deprecation

    silence_peft_deprecation()
    # Progress must show as it happens in `panacea demo | tee log` and nohup logs too; Ray forwards
    # the workers' lines with plain print(), which a redirected stdout would hold back in 8 KiB blocks.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["panacea", *(sys.argv[1:] if argv is None else argv)])  # quoted as typed
    try:
        with console.session(getattr(args, "quiet", False), getattr(args, "verbose", False)):
            return args.func(args)
    except Exception as exc:
        from panacea_platform.user_errors import user_error_in

        found = user_error_in(exc)
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
