"""Reading and validating labelled text files (CSV or JSONL) supplied by an institution.

Every problem is raised as `DataError` naming the file and, where it applies, the line, so a
hospital's ML engineer can fix the record without reading a stack trace.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SUPPORTED_SUFFIXES = (".csv", ".jsonl", ".json")


class DataError(ValueError):
    """A data file cannot be used; the message names the file (and line) at fault."""


@dataclass
class LabelledTexts:
    """Texts with integer labels into `label_names`; `periods` is optional per-row metadata."""

    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    periods: list[str] | None = None
    source: str = ""
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index) -> "LabelledTexts":
        index = np.asarray(index, dtype=int)
        return LabelledTexts(
            [self.texts[i] for i in index], self.labels[index], self.label_names,
            None if self.periods is None else [self.periods[i] for i in index], self.source,
            [self.lines[i] for i in index] if self.lines else [],
        )


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {raw[err.start]:#04x} at offset "
                        f"{err.start}); re-save the file as UTF-8") from None


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs; line numbers are 1-based physical lines of the file."""
    text = _decode(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    rows: list[tuple[int, dict]] = []
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames:
            raise DataError(f"{path}:1: missing header row")
        try:
            for record in reader:
                if None in record:
                    raise DataError(f"{path}:{reader.line_num}: more fields than the header has")
                rows.append((reader.line_num, record))
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    elif suffix in (".jsonl", ".json"):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: each line must be a JSON object")
            rows.append((number, record))
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {SUPPORTED_SUFFIXES}")
    if not rows:
        raise DataError(f"{path}: file has a header but no records")
    return rows


def read_labelled_file(path: str | Path, text_column: str, label_column: str,
                       period_column: str | None = None,
                       label_names: list[str] | None = None) -> LabelledTexts:
    """Read one CSV/JSONL file. With `label_names` given, a label outside it is an error
    (e.g., a test file naming a class no institution trains on)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = _read_rows(path)
    columns = set(rows[0][1])
    for role, column in (("--text-column", text_column), ("--label-column", label_column),
                         ("--period-column", period_column)):
        if column is not None and column not in columns:
            raise DataError(f"{path}: column {column!r} ({role}) not found; "
                            f"columns are {sorted(columns)}")
    texts, raw_labels, periods, lines = [], [], [], []
    for line, record in rows:
        text, label = record.get(text_column), record.get(label_column)
        if text is None or not str(text).strip():
            raise DataError(f"{path}:{line}: empty {text_column!r}")
        if label is None or str(label).strip() == "":
            raise DataError(f"{path}:{line}: empty {label_column!r}")
        texts.append(str(text).strip())
        raw_labels.append(str(label).strip())
        lines.append(line)
        if period_column is not None:
            periods.append(str(record.get(period_column, "")).strip())
    if label_names is None:
        label_names = sorted(set(raw_labels))
    index = {name: i for i, name in enumerate(label_names)}
    for line, label in zip(lines, raw_labels):
        if label not in index:
            raise DataError(f"{path}:{line}: label {label!r} in {label_column!r} is not one of "
                            f"the {len(label_names)} training labels")
    labels = np.array([index[label] for label in raw_labels], dtype=np.int64)
    return LabelledTexts(texts, labels, list(label_names), periods or None, str(path), lines)


def find_data_files(directory: str | Path) -> list[Path]:
    """The institution files of a `--data-dir`, sorted by name; `test.*` is the global test set."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in SUPPORTED_SUFFIXES)
    if not [p for p in files if p.stem != "test"]:
        raise DataError(f"{directory}: no .csv/.jsonl institution files found")
    return files
