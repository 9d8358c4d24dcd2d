"""Reading user data files: every bad file fails with the file, the line and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from panacea_platform.data.files import DataFileError, optional_text, read_records

REQUIRED = ("prompt", "answer")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_jsonl_reads_records_and_converts_numbers(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "task.jsonl",
        [
            {"prompt": "placeholder question 1", "answer": 7, "label": 7},
            {"prompt": "placeholder question 2", "answer": "b"},
        ],
    )
    records = read_records(path, REQUIRED)
    assert [r["prompt"] for r in records] == ["placeholder question 1", "placeholder question 2"]
    assert records[0]["answer"] == "7"  # required fields come back as text
    assert optional_text(records[0], "label") == "7"
    assert optional_text(records[1], "label") is None


def test_blank_lines_are_skipped_and_line_numbers_stay_physical(tmp_path: Path) -> None:
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"prompt": "p1", "answer": "a1"}\n\n{"prompt": "p2"}\n')
    with pytest.raises(DataFileError, match=r"gaps\.jsonl, line 3: missing field 'answer'"):
        read_records(path, REQUIRED)


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "p1", "answer": "a1"}\n{"prompt": "p2", "answer": "a2"}\n{"prompt": "p3", "answer": \n')
    with pytest.raises(DataFileError) as info:
        read_records(path, REQUIRED)
    message = str(info.value)
    assert "broken.jsonl" in message and "line 3" in message and "invalid JSON" in message


def test_non_object_line(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('["p", "a"]\n')
    with pytest.raises(DataFileError, match=r"line 1: expected a JSON object"):
        read_records(path, REQUIRED)


def test_missing_and_empty_fields(tmp_path: Path) -> None:
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "p1", "answer": "a1"}, {"prompt": "p2"}])
    with pytest.raises(DataFileError, match=r"missing\.jsonl, line 2: missing field 'answer'"):
        read_records(missing, REQUIRED)
    empty = write_jsonl(tmp_path / "empty_value.jsonl", [{"prompt": "  ", "answer": "a1"}])
    with pytest.raises(DataFileError, match=r"line 1: empty value for field 'prompt'"):
        read_records(empty, REQUIRED)
    wrong_type = write_jsonl(tmp_path / "typed.jsonl", [{"prompt": ["p"], "answer": "a"}])
    with pytest.raises(DataFileError, match=r"field 'prompt' must be text"):
        read_records(wrong_type, REQUIRED)


def test_empty_file_has_no_records(tmp_path: Path) -> None:
    for name, text in (
        ("empty.jsonl", ""),
        ("blank.jsonl", "\n\n"),
        ("header_only.csv", "prompt,answer\n"),
        ("nothing.csv", ""),
    ):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(DataFileError, match=rf"{name}.* has no records"):
            read_records(path, REQUIRED)


def test_unknown_extension_lists_supported(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("prompt,answer\n")
    with pytest.raises(DataFileError) as info:
        read_records(path, REQUIRED)
    assert "data.txt" in str(info.value)
    for extension in (".jsonl", ".csv", ".parquet"):
        assert extension in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="not found"):
        read_records(tmp_path / "absent.jsonl", REQUIRED)


def test_csv_reads_multiline_fields_and_reports_physical_lines(tmp_path: Path) -> None:
    path = tmp_path / "task.csv"
    # Record 2 spans lines 3-4; record 3 starts on line 5 and lacks a value.
    path.write_text('prompt,answer,label\np1,a1,x\n"p2 first line\np2 second line",a2,\np3,,z\n')
    with pytest.raises(DataFileError, match=r"task\.csv, line 5: empty value for field 'answer'"):
        read_records(path, REQUIRED)
    path.write_text('prompt,answer,label\np1,a1,x\n"p2 first line\np2 second line",a2,\n')
    records = read_records(path, REQUIRED)
    assert records[1]["prompt"] == "p2 first line\np2 second line"
    assert optional_text(records[1], "label") is None  # an empty CSV cell is "absent", not ""


def test_csv_missing_column_and_ragged_row(tmp_path: Path) -> None:
    path = tmp_path / "columns.csv"
    path.write_text("prompt,label\np1,x\n")
    with pytest.raises(DataFileError, match=r"columns\.csv, line 1 \(header\): missing column 'answer'"):
        read_records(path, REQUIRED)
    path.write_text("prompt,answer\np1,a1\np2,a2,extra\n")
    with pytest.raises(DataFileError, match=r"line 3: 3 values but the header has 2 columns"):
        read_records(path, REQUIRED)


def test_csv_with_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("prompt,answer\np1,a1\n".encode("utf-8-sig"))
    assert read_records(path, REQUIRED) == [{"prompt": "p1", "answer": "a1"}]


def test_parquet_roundtrip_and_errors(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"prompt": "placeholder question 1", "answer": "a1", "label": "1"},
        {"prompt": "placeholder question 2", "answer": "a2", "label": None},
    ]
    path = tmp_path / "task.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    records = read_records(path, REQUIRED)
    assert records == rows
    assert optional_text(records[1], "label") is None

    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "answer": None}]), path)
    with pytest.raises(DataFileError, match=r"row 1: field 'answer' must be text"):
        read_records(path, REQUIRED)
    pq.write_table(pa.Table.from_pylist([{"prompt": "p"}]), path)
    with pytest.raises(DataFileError, match=r"missing column 'answer'"):
        read_records(path, REQUIRED)
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataFileError, match="not a readable Parquet file"):
        read_records(path, REQUIRED)
