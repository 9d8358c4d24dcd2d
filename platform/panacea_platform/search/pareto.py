"""The Pareto front of finished trials over objectives with directions (min or max)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def _oriented(row: Mapping[str, Any], objectives: Sequence[tuple[str, str]]) -> tuple[float, ...] | None:
    """The row's values turned so that lower is better on every objective; None if one is missing."""
    values = []
    for metric, mode in objectives:
        value = row.get(metric)
        if value is None or isinstance(value, bool):
            return None
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
        if math.isnan(value):
            return None
        values.append(value if mode == "min" else -value)
    return tuple(values)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a is no worse than b everywhere and better somewhere (both oriented: lower is better)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(rows: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]]) -> list[bool]:
    """For each row, whether no other row dominates it.

    `objectives` are (metric, mode) pairs, mode 'min' or 'max'. Equal rows do not
    dominate each other, so duplicates on the front are all on it. A row missing
    an objective (absent, None, NaN) is not on the front and dominates nothing.
    """
    for metric, mode in objectives:
        if mode not in ("min", "max"):
            raise ValueError(f"objective {metric!r}: mode must be 'min' or 'max', got {mode!r}")
    if not objectives:
        raise ValueError("pareto_front needs at least one objective")
    points = [_oriented(row, objectives) for row in rows]
    flags = []
    for point in points:
        if point is None:
            flags.append(False)
            continue
        flags.append(not any(other is not None and dominates(other, point) for other in points))
    return flags
