"""`panacea`: the command line. Heavy libraries are imported inside commands so --help is instant."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

DEFAULT_JOB = "jobs/offline_default.yaml"


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can fix from the message alone: printed in one line, exit 2."""
    from panacea_platform.config import ConfigError
    from panacea_platform.data.errors import DataFileError, DataUnavailableError, NotEnoughDataError, PoolOverlapError

    # ConfigError covers DeepSpeedConfigError too.
    return (ConfigError, DataFileError, DataUnavailableError, NotEnoughDataError, PoolOverlapError, FileNotFoundError)


def _add_config_args(parser: argparse.ArgumentParser, default: str | None = DEFAULT_JOB) -> None:
    parser.add_argument(
        "--config", "-c", default=default, help=f"YAML job file (default: {default})"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. panacea.rho=0.5 optim.max_steps=10"
    )


def _load(args: argparse.Namespace):
    from panacea_platform.config import load_config

    return load_config(args.config, args.overrides)


def cmd_align(args: argparse.Namespace) -> int:
    from panacea_platform.training.dispatch import train

    config = _load(args)
    result = train(config, "align")
    print(f"aligned adapter: {result.adapter_dir}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from panacea_platform.training.dispatch import train

    config = _load(args)
    result = train(config, "finetune")
    print(f"released adapter (w_T + eps_T): {result.adapter_dir}")
    if result.perturbation_path is not None:
        print(f"unperturbed adapter (w_T): {result.unperturbed_adapter_dir}\nperturbation eps_T: {result.perturbation_path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from panacea_platform.pipeline import run_demo
    from panacea_platform.algorithms import DEFENCES
    from panacea_platform.config import ConfigError

    config = _load(args)
    defences = [d.strip() for d in args.defences.split(",") if d.strip()]
    unknown = [d for d in defences if d not in DEFENCES]
    if unknown or not defences:
        raise ConfigError(f"--defences {args.defences!r}: expected a comma list of {', '.join(DEFENCES.names())}")
    run_demo(config, defences)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from panacea_platform.config import load_config

    if args.action == "show":
        config = load_config(args.config, args.overrides)
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    if args.action == "fields":
        from panacea_platform.config import RunConfig

        _print_fields(RunConfig, "")
        return 0
    files = args.files or sorted(str(p) for p in Path("jobs").glob("*.yaml"))
    for path in files:
        load_config(path)
        print(f"ok: {path}")
    return 0


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
    from panacea_platform.models import OFFLINE_MODELS

    for title, registry in (
        ("defences", DEFENCES),
        ("tasks", TASKS),
        ("harmful sources", HARMFUL_SOURCES),
        ("offline models", OFFLINE_MODELS),
    ):
        print(f"{title}: {', '.join(registry.names())}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from panacea_platform.bench import bench_step

    config = _load(args)
    bench_step(config, warmup=args.warmup, repeats=args.repeats)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from panacea_platform.config import ConfigError
    from panacea_platform.memory_plan import count_model, format_plan, plan

    config = _load(args)
    try:
        gpus = [int(g) for g in args.gpus.split(",")]
        stages = [int(s) for s in args.stages.split(",")]
    except ValueError:
        raise ConfigError(f"--gpus {args.gpus!r} / --stages {args.stages!r}: expected comma lists of integers") from None
    if any(g < 1 for g in gpus) or any(s not in (2, 3) for s in stages):
        raise ConfigError("--gpus must be >= 1 and --stages each 2 or 3")
    counts = count_model(config.model.name, config.lora.target_modules, config.lora.rank)
    batch, seq = config.optim.batch_size, config.data.max_length
    rows = [plan(counts, g, s, batch, seq) for s in stages for g in gpus]
    print(format_plan(counts, rows, batch, seq, args.gpu_memory))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="panacea", description="Harmful fine-tuning defences (Panacea and baselines): train, compare, track."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    align = sub.add_parser("align", help="safety-align the base model on refusals; writes the aligned adapter")
    _add_config_args(align)
    align.set_defaults(func=cmd_align)

    finetune = sub.add_parser(
        "finetune", help="fine-tune on a poisoned task set with a defence (sft, random_perturbation, panacea)"
    )
    _add_config_args(finetune)
    finetune.set_defaults(func=cmd_finetune)

    demo = sub.add_parser("demo", help="the main job: align, then attack and defend the aligned model, and compare")
    _add_config_args(demo)
    demo.add_argument("--defences", default="sft,panacea", help="comma list of defences to compare (default: sft,panacea)")
    demo.set_defaults(func=cmd_demo)

    config = sub.add_parser("config", help="show the resolved configuration, list its fields, or validate job files")
    config.add_argument("action", choices=["show", "validate", "fields"])
    config.add_argument("--config", "-c", default=DEFAULT_JOB, help="YAML job file for 'show'")
    config.add_argument("--files", nargs="*", help="job files for 'validate' (default: jobs/*.yaml)")
    config.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides for 'show'")
    config.set_defaults(func=cmd_config)

    listing = sub.add_parser("list", help="registered defences, tasks, harmful sources and offline models")
    listing.set_defaults(func=cmd_list)

    plan_parser = sub.add_parser("plan", help="plans: per-GPU memory of a job under ZeRO-2/3")
    plan_sub = plan_parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    memory = plan_sub.add_parser(
        "memory", help="weights, gradients, optimizer states, activations per GPU (DeepSpeed's estimators)"
    )
    _add_config_args(memory)
    memory.add_argument("--gpus", default="1,4,8", help="comma list of GPU counts (default 1,4,8)")
    memory.add_argument("--stages", default="2,3", help="comma list of ZeRO stages (default 2,3)")
    memory.add_argument("--gpu-memory", type=float, default=80.0, help="GPU memory in GB (default 80)")
    memory.set_defaults(func=cmd_plan)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="what", required=True, metavar="WHAT")
    step = bench_sub.add_parser("step", help="time and memory of the SFT step against the Panacea step")
    _add_config_args(step)
    step.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    step.add_argument("--repeats", type=int, default=5, help="timed steps; the median is reported (default 5)")
    step.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    # peft calls a transformers method deprecated in v5 on every model it wraps.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
