"""What every configuration file shares: the error, the strict section, reading a YAML mapping.

A leaf: config.py, each plugin's config beside its code (algorithms/*_config.py,
evaluation/suite_config.py) and the search spaces import it, and it imports nothing of the package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names field and fix."""


class Section(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


def read_yaml_mapping(path: str | Path, what: str, hint: str, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """The top-level mapping of a YAML file (empty file: {}); `what` names the file in errors, `hint` says
    where to look."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {str(path)!r} not found: pass an existing YAML file ({hint})")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise error(f"{what} {str(path)!r} is not valid YAML: {exc}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise error(f"{what} {str(path)!r}: top level must be a mapping")
    return loaded or {}
