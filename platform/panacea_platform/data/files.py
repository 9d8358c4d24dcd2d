"""Reading user-supplied data files (task 'local', harmful source 'file').

Schema, one record per example:

- ``prompt`` (required, non-empty text): the instruction given to the model.
- ``answer`` (required, non-empty text): the answer the model is trained on.
- ``label`` (optional text): exact-match target for accuracy, e.g. "42" for a
  worked maths answer; when absent the task has no accuracy metric.
- ``category`` (optional text): free-form grouping kept for analysis.

Formats, chosen by extension:

- ``.jsonl`` / ``.jsonlines``: one JSON object per line; blank lines are skipped.
- ``.csv``: a header row naming the columns, then one row per record (UTF-8,
  quoted fields may span lines).
- ``.parquet``: one row per record, columns named as above.

Every problem raises DataFileError naming the file, the line (1-based; for CSV
the physical line in the file, the header being line 1; for Parquet the row)
and what is wrong, because a bad row found after an hour of training is far
more expensive than one reported before the first step.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from panacea_platform.data.errors import DataFileError

__all__ = ["DataFileError", "SUPPORTED_EXTENSIONS", "read_records"]

SUPPORTED_EXTENSIONS = (".jsonl", ".jsonlines", ".csv", ".parquet")


def read_records(path: str | Path, required_fields: Sequence[str]) -> list[dict[str, Any]]:
    """All records of `path`, each checked to have every required field non-empty.

    Required fields come back as `str` (numbers are converted, so a CSV or JSON
    label 42 and "42" are the same); other fields are returned as read.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".jsonlines"):
        records = _read_jsonl(path, required_fields)
    elif suffix == ".csv":
        records = _read_csv(path, required_fields)
    elif suffix == ".parquet":
        records = _read_parquet(path, required_fields)
    else:
        raise DataFileError(
            f"{path}: unknown extension {path.suffix or '(none)'!r}; supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if not records:
        raise DataFileError(f"{path} has no records (expected fields: {', '.join(required_fields)})")
    return records


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig: spreadsheets often save CSV with a byte-order mark that
        # would otherwise become part of the first column's name.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataFileError(f"{path}: not valid UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _read_jsonl(path: Path, required_fields: Sequence[str]) -> list[dict[str, Any]]:
    records = []
    # split("\n"), not splitlines(): JSON strings may legally hold U+2028 and
    # other characters that splitlines() would treat as line ends.
    for line_number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataFileError(
                f"{where}: expected a JSON object with fields {', '.join(required_fields)}, got {type(record).__name__}"
            )
        records.append(_check_record(record, required_fields, where))
    return records


def _read_csv(path: Path, required_fields: Sequence[str]) -> list[dict[str, Any]]:
    # csv.reader rather than DictReader: DictReader silently pads short rows and
    # files long ones under a None key, and hides which line a record began on.
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as exc:
        raise DataFileError(f"{path}, line 1 (header): malformed CSV ({exc})") from None
    columns = [name.strip() for name in header]
    missing = [field for field in required_fields if field not in columns]
    if missing:
        raise DataFileError(
            f"{path}, line 1 (header): missing column {', '.join(repr(m) for m in missing)}; "
            f"columns found: {', '.join(repr(c) for c in columns)}"
        )
    records = []
    end_of_previous = reader.line_num
    while True:
        start = end_of_previous + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataFileError(f"{path}, line {start}: malformed CSV ({exc})") from None
        end_of_previous = reader.line_num
        if not row or all(not value.strip() for value in row):
            continue
        where = f"{path}, line {start}"
        if len(row) != len(columns):
            raise DataFileError(f"{where}: {len(row)} values but the header has {len(columns)} columns")
        records.append(_check_record(dict(zip(columns, row)), required_fields, where))
    return records


def _read_parquet(path: Path, required_fields: Sequence[str]) -> list[dict[str, Any]]:
    # pyarrow directly (not pandas): nulls stay None instead of becoming NaN,
    # which would pass as a non-empty value.
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file; all mean "cannot read"
        raise DataFileError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    missing = [field for field in required_fields if field not in table.column_names]
    if missing:
        raise DataFileError(
            f"{path}: missing column {', '.join(repr(m) for m in missing)}; "
            f"columns found: {', '.join(repr(c) for c in table.column_names)}"
        )
    return [
        _check_record(record, required_fields, f"{path}, row {row_number}")
        for row_number, record in enumerate(table.to_pylist(), start=1)
    ]


def _check_record(record: dict[str, Any], required_fields: Sequence[str], where: str) -> dict[str, Any]:
    checked = dict(record)
    for field in required_fields:
        if field not in record:
            raise DataFileError(f"{where}: missing field {field!r}")
        value = record[field]
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise DataFileError(f"{where}: field {field!r} must be text, got {type(value).__name__}")
        text = str(value)
        if not text.strip():
            raise DataFileError(f"{where}: empty value for field {field!r}")
        checked[field] = text
    return checked


def optional_text(record: dict[str, Any], field: str) -> str | None:
    """An optional field as stripped text, or None when absent, null or blank.

    CSV has no null, so an empty cell must mean "absent" rather than the label "".
    """
    value = record.get(field)
    if value is None or (isinstance(value, float) and value != value):  # NaN from other writers
        return None
    text = str(value).strip()
    return text or None
