"""Failure injection for tests: a `step_hook` (launch_ray.run_distributed) that kills one worker's
process once, as a crashed node would. Importable by Ray workers: conftest puts tests/ on the
PYTHONPATH that the session's Ray processes inherit."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KillOnce:
    """Rank `rank` SIGKILLs its own process after step `after_step`, while `marker` does not exist."""

    rank: int
    after_step: int
    marker: str

    def __call__(self, rank: int, step: int) -> None:
        if rank != self.rank or step != self.after_step or os.path.exists(self.marker):
            return
        wait_for_reports_collected()
        Path(self.marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)


def wait_for_reports_collected(settle_s: float = 1.0) -> None:
    """Return once Ray's controller has collected this worker's reports.

    `ray.train.report` returns once its result is queued, before the controller polls it; a worker
    that dies before the poll after a checkpoint's report loses that checkpoint (the restart then
    resumes from the one before: still correct, but not what a test of resuming from a given step
    wants). Waits on Ray Train V2's internal result queue, then `settle_s` more for the other ranks'
    reports of the same round; falls back to a sleep if those internals move.
    """
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        get_train_context().execution_context.result_queue.join()
    except Exception:  # noqa: BLE001 - internals of another package; the sleep below still helps
        time.sleep(3 * settle_s)
    time.sleep(settle_s)


class InjectedCrash(RuntimeError):
    """The failure a test injected."""


def crashing_panacea(after_step: int, marker: Path):
    """A Panacea defence whose run fails after its `after_step`-th step, once (while `marker` is
    absent): a process interrupted mid-run, in one process. It raises when asked for the next step,
    so everything after step `after_step` (its checkpoint included) has happened."""
    from panacea_platform.algorithms.defences import Panacea

    return crashing(Panacea, after_step, marker)


def crashing(defence: type, after_step: int, marker: Path) -> type:
    """`defence` failing once after its `after_step`-th step (fine-tuning or alignment), as above."""

    class Crashing(defence):
        name = f"crashing_{defence.name}"

        def _count(self) -> None:
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == after_step + 1 and not marker.exists():
                marker.touch()
                raise InjectedCrash(f"injected after step {after_step}")

        def step(self, weights, batch, extra):
            self._count()
            return super().step(weights, batch, extra)

        def align_step(self, weights, batch, extra):
            self._count()
            return super().align_step(weights, batch, extra)

    return Crashing


@dataclass(frozen=True)
class SlowSteps:
    """Every rank sleeps `seconds` after each step: a fit long enough for something to happen during it."""

    seconds: float

    def __call__(self, rank: int, step: int) -> None:
        time.sleep(self.seconds)
