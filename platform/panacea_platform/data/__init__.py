"""The data layer: fine-tuning tasks, harmful sources, pools and batching.

Tasks and harmful sources are registered by name with lazy "module:function"
entries, so validating a config that names them imports nothing heavy, and
`import panacea_platform.data` stays fast (no torch, datasets or pandas).

Task: ``(data_config, split, size, seed) -> list[Example]``, split "train"/"test".
Harmful source: ``(data_config) -> list[Example]`` of harmful prompt/answer pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from panacea_platform.data.errors import DataFileError, DataUnavailableError, NotEnoughDataError, PoolOverlapError
from panacea_platform.data.examples import Example, normalise_prompt
from panacea_platform.registry import Registry

__all__ = [
    "HARMFUL_SOURCES",
    "TASKS",
    "DataFileError",
    "DataUnavailableError",
    "Example",
    "NotEnoughDataError",
    "PoolOverlapError",
    "normalise_prompt",
]

TaskFn = Callable[[Any, str, int, int], list[Example]]
HarmfulSourceFn = Callable[[Any], list[Example]]

TASKS: Registry[TaskFn] = Registry("task")
for _name in (
    "offline_arithmetic",
    "offline_sentiment",
    "offline_sentiment_explained",
    "offline_topic",
    "gsm8k",
    "sst2",
    "ag_news",
    "alpaca",
    "local",
):
    TASKS.register(_name, f"panacea_platform.data.tasks:{_name}")

HARMFUL_SOURCES: Registry[HarmfulSourceFn] = Registry("harmful source")
HARMFUL_SOURCES.register("offline_pyrit", "panacea_platform.data.harmful:offline_pyrit")
HARMFUL_SOURCES.register("beavertails", "panacea_platform.data.harmful:beavertails")
HARMFUL_SOURCES.register("file", "panacea_platform.data.harmful:from_file")
del _name
