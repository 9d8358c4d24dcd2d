"""What the terminal shows: the platform's own lines and progress; the rest goes to the run's log file.

Set once per command by the CLI (`--quiet`, `--verbose`) and read by every process of the run from
the environment, which Ray's workers inherit:
- progress "bars" (on a terminal, in a job run by `ray job submit`, whose `ray job logs`
  people follow, or where PANACEA_PROGRESS=bars): a training stage shows Ray's tqdm from its rank 0
  worker, the evaluation Ray Data's bars, a sweep Tune's table.
- progress "lines" (`--quiet`, or output that is not a terminal, like `nohup` or CI): one line
  per stage when it ends.
- not verbose (the default): Python warnings, the `ray` and `transformers` loggers' records,
  every line Ray forwards from its workers that is not one of the platform's ("[stage] ..."), the
  raylet's warnings and the log lines Ray's C++ core worker writes to this process's stderr are
  appended to the run's log file, OUTPUT_DIR/logs/RUN_NAME.log, made at its first line. Errors still reach the
  terminal: Ray raises a worker's failure in this process, and the CLI prints it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PROGRESS_ENV = "PANACEA_PROGRESS"
VERBOSE_ENV = "PANACEA_VERBOSE"
# Lines the platform prints begin with a bracketed lower-case tag: "[align] ...", "[sweep s1] ...".
PLATFORM_LINE = re.compile(r"^\[[a-z][\w .:/=-]*\] ")
_LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "transformers", "py.warnings")

_log_path: Path | None = None
_handler: logging.Handler | None = None
_saved_loggers: dict[str, tuple[list[logging.Handler], bool]] = {}
_saved_dispatch: Callable[..., None] | None = None
_saved_raylet_printer: Callable[..., None] | None = None
_in_session = False
_planned: tuple[Path, str] | None = None
_started: Path | None = None  # the log that has its folder and header line


@contextlib.contextmanager
def session(quiet: bool = False, verbose: bool = False) -> Iterator[None]:
    """One command's output settings; on exit the environment, the loggers and Ray's printer are as before
    (the tests run many commands in one process)."""
    global _in_session, _planned
    saved_env = {name: os.environ.get(name) for name in (PROGRESS_ENV, VERBOSE_ENV)}
    configure(quiet, verbose)
    _in_session = True
    try:
        yield
    finally:
        _in_session, _planned = False, None
        close_run_log()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def configure(quiet: bool = False, verbose: bool = False) -> None:
    """Fix this command's progress mode and verbosity, for this process and the Ray workers it starts."""
    submitted_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    chosen = os.environ.get(PROGRESS_ENV)  # set by the user: their choice, unless --quiet
    bars = not quiet and (chosen == "bars" if chosen in ("bars", "lines") else sys.stderr.isatty() or submitted_job)
    os.environ[PROGRESS_ENV] = "bars" if bars else "lines"
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"


def bars() -> bool:
    """Progress as bars (else one line per stage); without `configure`, bars only on a terminal."""
    mode = os.environ.get(PROGRESS_ENV)
    return mode == "bars" if mode else sys.stderr.isatty()


def answers_bar(total: int) -> Any:
    """The evaluation's bar where Ray Data draws none, else None. Ray Data draws its bars only when stdout is
    a terminal; in a job run by `ray job submit` it logs a count every 10 s, with no rate and no time left
    (those records go to the run's log). There tqdm's bar counts the answers as they reach this process."""
    if not bars() or sys.stdout.isatty():
        return None
    from tqdm import tqdm

    return tqdm(desc="[eval]", total=total, unit="answer", dynamic_ncols=True)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def worker_env() -> dict[str, str]:
    """The settings a Ray worker reads, for a runtime_env: workers of a Ray this process did not start
    do not inherit its environment."""
    return {name: os.environ[name] for name in (PROGRESS_ENV, VERBOSE_ENV) if name in os.environ}


def plan_run_log(output_dir: str | Path, run_name: str) -> None:
    """Name the run's log once the command's config is loaded; it opens when the work starts (open_run_log),
    after the checks, so that bad input leaves no folder behind."""
    global _planned
    if _in_session:
        _planned = (Path(output_dir), run_name)


def open_run_log(
    output_dir: str | Path | None = None, run_name: str | None = None, out: Callable[[str], None] = print
) -> Path | None:
    """Send library warnings, loggers and workers' other lines to OUTPUT_DIR/logs/RUN_NAME.log (the planned
    one when none is given; not when verbose; once per command); its path."""
    global _log_path, _handler
    if not _in_session or verbose() or _handler is not None:  # a library call leaves logging as it is
        return _log_path
    if output_dir is None or run_name is None:
        if _planned is None:
            return None
        output_dir, run_name = _planned
    path = Path(output_dir) / "logs" / f"{run_name}.log"
    _handler = _RunLogHandler(path)
    _handler.setLevel(logging.INFO)
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _log_path = path
    logging.captureWarnings(True)
    route_library_loggers()
    filter_worker_lines()
    _filter_native_stderr(path)
    _hide_loading_bars()
    out(f"[log] library warnings and Ray's own lines: {path} (--verbose shows them here)")
    return path


_saved_bars: tuple[bool, bool] | None = None  # whether transformers and the hub drew bars before


def _hide_loading_bars() -> None:
    """No "Loading weights: 100%|..." bar from transformers: it is not the run's progress. The hub's download
    bars stay: fetching a 7B model is long work a person wants to watch."""
    global _saved_bars
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    _saved_bars = (transformers_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled())
    transformers_logging.disable_progress_bar()  # the hub's too, so:
    if _saved_bars[1]:
        hub_utils.enable_progress_bars()


def _show_loading_bars_as_before() -> None:
    global _saved_bars
    if _saved_bars is None:
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    transformers_drew, hub_drew = _saved_bars
    if transformers_drew:
        transformers_logging.enable_progress_bar()  # the hub's too, so:
    if not hub_drew:
        hub_utils.disable_progress_bars()
    _saved_bars = None


class _RunLogHandler(logging.FileHandler):
    """The run's log, made (its folder, then a line naming the command) at its first record: a command that
    bad input stops writes nothing, so it leaves no folder behind."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, delay=True)

    def _open(self):
        _start_log(Path(self.baseFilename))
        return super()._open()


def _start_log(path: Path) -> None:
    """The folder and, once per command, the line that says which command the records below come from."""
    global _started
    if _started == path:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as log:
        log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {' '.join(sys.argv)}\n")
    _started = path


def close_run_log() -> None:
    """Undo open_run_log: loggers, warnings and Ray's printer as they were."""
    global _log_path, _handler, _saved_dispatch, _saved_raylet_printer, _started
    if _handler is None:
        return
    for name, (handlers, propagate) in _saved_loggers.items():
        logger = logging.getLogger(name)
        logger.removeHandler(_handler)
        for handler in handlers:
            logger.addHandler(handler)
        logger.propagate = propagate
    _saved_loggers.clear()
    logging.captureWarnings(False)
    _restore_native_stderr()
    _show_loading_bars_as_before()
    if _saved_raylet_printer is not None:
        from ray._private import worker as ray_worker

        ray_worker.print_to_stdstream = _saved_raylet_printer
        _saved_raylet_printer = None
    if _saved_dispatch is not None:
        from ray._private import worker as ray_worker

        ray_worker.global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
        ray_worker.global_worker_stdstream_dispatcher.add_handler("ray_print_logs", _saved_dispatch)
        _saved_dispatch = None
    _handler.close()
    _handler, _log_path, _started = None, None, None


def route_library_loggers() -> None:
    """Point the libraries' loggers at the run's log; called again after a library configures its own
    (`import ray`, Ray Data's first use), which would print to the terminal once more."""
    if _handler is None:
        return
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        others = [h for h in logger.handlers if h is not _handler]
        saved = _saved_loggers.setdefault(name, ([], logger.propagate))
        saved[0].extend(h for h in others if h not in saved[0])
        for handler in others:
            logger.removeHandler(handler)
        if _handler not in logger.handlers:
            logger.addHandler(_handler)
        logger.propagate = False


def filter_worker_lines() -> None:
    """Keep the platform's lines and Ray's tqdm on the terminal and send the rest of the workers' lines
    to the run's log, once Ray runs in this process (connect_ray calls it again after ray.init)."""
    global _saved_dispatch
    if _log_path is None or _saved_dispatch is not None or "ray" not in sys.modules:
        return
    import ray
    from ray._private import worker as ray_worker

    _route_raylet_warnings(_log_path)
    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    printer = dict(dispatcher.handlers).get("ray_print_logs")  # absent: Ray started with log_to_driver off
    if not ray.is_initialized() or printer is None:
        return
    _saved_dispatch = printer
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler(
        "ray_print_logs", functools.partial(_split_lines, print_lines=_saved_dispatch, log=_log_path)
    )


def _route_raylet_warnings(log: Path) -> None:
    """The raylet's warnings (e.g. "WARNING: 8 PYTHON worker processes have been started ...", which
    fractional CPU requests bring) go to the run's log; its errors still print. Ray's driver thread that
    prints them looks `print_to_stdstream` up in its module at each message, so replacing it there is
    enough; close_run_log puts it back."""
    global _saved_raylet_printer
    from ray._private import worker as ray_worker

    if _saved_raylet_printer is None:
        _saved_raylet_printer = ray_worker.print_to_stdstream
        ray_worker.print_to_stdstream = functools.partial(_split_raylet, print_to=_saved_raylet_printer, log=log)


def _split_raylet(data: dict[str, Any], ignore_prefix: bool, print_to: Callable[..., None], log: Path) -> None:
    if data.get("pid") != "raylet":
        print_to(data, ignore_prefix)
        return
    lines = data.get("lines", [])
    warnings_ = [line for line in lines if line.lstrip().startswith("WARNING")]
    if warnings_:
        _append_lines(log, "raylet", warnings_)
    shown = [line for line in lines if line not in warnings_]
    if shown:
        print_to({**data, "lines": shown}, ignore_prefix)


def _append_lines(log: Path, source: str, lines: list[str]) -> None:
    """Lines another process printed, each after the name of its source, e.g. "(raylet) WARNING: ..."."""
    _start_log(log)
    with log.open("a") as out:
        out.writelines(f"({source}) {line}\n" for line in lines)


def _split_lines(data: dict[str, Any], print_lines: Callable[[dict[str, Any]], None], log: Path) -> None:
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    lines = data.get("lines", [])
    kept = [RAY_TQDM_MAGIC in line or bool(PLATFORM_LINE.match(line)) for line in lines]
    hidden = [line for line, keep in zip(lines, kept) if not keep]
    if hidden:
        where = f"{data.get('actor_name') or data.get('task_name') or ''} pid={data.get('pid')}".strip()
        _append_lines(log, where, hidden)
    if any(kept):
        print_lines({**data, "lines": [line for line, keep in zip(lines, kept) if keep]})


# Ray's C++ core worker in this process logs to file descriptor 2 directly, past Python's logging (e.g. an
# "E ... core_worker.cc" line when Ray Data starts its actors): lines of that shape go to the run's log.
NATIVE_LOG_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] ")
_native: tuple[int, threading.Thread] | None = None  # the saved stderr descriptor and the pump reading the pipe


def _filter_native_stderr(log: Path) -> None:
    """Put a pipe in front of descriptor 2: a thread passes every write on to the real stderr at once, except
    the native log lines, which it appends to the run's log."""
    global _native
    if _native is not None:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    pump = threading.Thread(target=_pump, args=(read_end, saved, log), name="panacea-stderr", daemon=True)
    pump.start()
    _native = (saved, pump)


def _pump(read_end: int, terminal: int, log: Path) -> None:
    pending = b""
    while chunk := os.read(read_end, 65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if NATIVE_LOG_LINE.match(line):
                _start_log(log)
                with log.open("ab") as out:
                    out.write(line + b"\n")
            else:
                os.write(terminal, line + b"\n")
        if pending and not pending.startswith(b"["):  # "[" may begin a native line still being written
            os.write(terminal, pending)  # a progress bar's "\r..." is shown at once, not held for a newline
            pending = b""
    if pending:
        os.write(terminal, pending)
    os.close(read_end)


def _restore_native_stderr() -> None:
    global _native
    if _native is None:
        return
    saved, pump = _native
    sys.stderr.flush()
    os.dup2(saved, 2)  # our write end closes: the pump passes on what is left, then stops
    pump.join(timeout=1)
    # A process started meanwhile (a local Ray's raylet) may hold the pipe's write end: then the pump runs
    # on, passing its lines to the terminal, and keeps the descriptor it writes to.
    if not pump.is_alive():
        os.close(saved)
    _native = None


def clock(seconds: float) -> str:
    """e.g. 4m25s, or 1h02m."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
