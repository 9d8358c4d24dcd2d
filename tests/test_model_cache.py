"""The offline model's conversion cache when several commands start at once on a fresh machine."""

from __future__ import annotations

import threading
import time


def test_commands_started_at_once_convert_the_offline_model_once_and_all_get_it(tmp_path, monkeypatch):
    """Three callers at once on an empty cache: one converts while the others wait, then every caller
    gets the finished folder. Without the lock each converted and replaced the folder under the others.
    The GGUF conversion itself (tested in test_offline_model.py) is replaced by a slow stand-in that
    writes the folder as the real one does, by rename."""
    from panacea_platform import models

    monkeypatch.setenv("PANACEA_CACHE", str(tmp_path / "cache"))
    conversions = []

    def slow_conversion(spec, target):
        conversions.append(threading.get_ident())
        staging = target.parent / f".{target.name}-staging-{len(conversions)}"
        staging.mkdir(parents=True)
        time.sleep(0.3)  # long enough for the other callers to arrive while it runs
        (staging / "config.json").write_text("{}")
        staging.rename(target)

    monkeypatch.setattr(models, "_convert_gguf", slow_conversion)
    found, errors = [], []

    def resolve():
        try:
            path = models.resolve_model_path("smollm2-135m-instruct")
            found.append((path, (tmp_path / "cache" / "models" / "smollm2-135m-instruct" / "config.json").is_file()))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    callers = [threading.Thread(target=resolve) for _ in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=30)
    assert not errors, errors
    assert len(conversions) == 1, f"converted {len(conversions)} times"
    assert found == [(str(tmp_path / "cache" / "models" / "smollm2-135m-instruct"), True)] * 3
