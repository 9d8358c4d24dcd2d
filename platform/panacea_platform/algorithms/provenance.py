"""Which defence made an aligned adapter: the alignment stage writes alignment.json beside it, and a
run that fine-tunes under an alignment-stage defence checks that its adapter is that defence's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROVENANCE_FILE = "alignment.json"


def write_alignment_provenance(run_dir: Path, defence: str, settings: dict[str, Any]) -> None:
    (Path(run_dir) / PROVENANCE_FILE).write_text(json.dumps({"defence": defence, "settings": settings}, indent=2))


def read_alignment_provenance(adapter: str | Path) -> dict[str, Any] | None:
    path = Path(adapter).parent / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def alignment_problem(adapter: str | Path, defence: str, settings: dict[str, Any]) -> str | None:
    """None if `adapter` was aligned by `defence` with `settings`, else what is expected instead."""
    made = read_alignment_provenance(adapter)
    fix = (
        f"an adapter aligned by {defence!r} (panacea align with defence={defence}), or no model.adapter so the "
        f"job aligns with {defence!r} itself"
    )
    if made is None:
        return f"{fix}: this adapter has no {PROVENANCE_FILE} beside it, so which alignment made it is unknown"
    if made.get("defence") != defence:
        return f"{fix}: this adapter was aligned by {made.get('defence')!r}"
    if made.get("settings") != json.loads(json.dumps(settings)):
        return f"{fix} with these settings {settings}: this adapter was aligned with {made.get('settings')}"
    return None
