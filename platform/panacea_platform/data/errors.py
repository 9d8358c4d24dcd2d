"""Errors raised by the data layer.

Each one is a subclass of a built-in error so callers that only know
ValueError / RuntimeError still catch it, while the CLI can tell a bad file
(the user's to fix) from an unreachable hub (the environment's) apart.
"""

from __future__ import annotations


class DataFileError(ValueError):
    """A local data file that cannot be used; the message names the file, the line and the fix."""


class DataUnavailableError(RuntimeError):
    """A data source that this machine cannot reach (hub offline, package not installed)."""


class NotEnoughDataError(ValueError):
    """A request for more examples than a source holds; the message names both sizes."""


class PoolOverlapError(ValueError):
    """Two harmful pools that should be disjoint share prompts (the defence would see test data)."""
