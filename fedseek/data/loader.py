"""Reading and validating labelled text files (CSV or JSONL) supplied by an institution.

Every problem is raised as `DataError` naming the file and, where it applies, the line, so a
hospital's ML engineer can fix the record without reading a stack trace. Nothing is ever written
back: a refused file is left exactly as it was. Errors: not UTF-8, empty, header only, malformed
CSV/JSON, a line with more or fewer fields than the header, a missing column, an empty or
non-text value, a text over `MAX_TEXT_CHARS`, a label outside the training labels, a repeated
value in an `id` column. Logged policies (the data is used as is, a warning says what was found):
records whose text repeats an earlier record's (the lines are named; record-level DP counts each
row as one record), and label drift between data periods (`label_drift`).
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SUPPORTED_SUFFIXES = (".csv", ".jsonl", ".json")
MAX_TEXT_CHARS = 100_000  # per record; far beyond any model's context, catches runaway quotes
ID_COLUMN = "id"  # when a file has this column, its values must be unique
logger = logging.getLogger("fedseek")
_warned: set[tuple[str, str]] = set()


class DataError(ValueError):
    """A data file cannot be used; the message names the file (and line) at fault. `field`: the
    job setting (e.g. `data.label_column`) whose value led here, the only part a site sends back."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass
class LabelledTexts:
    """Texts with integer labels into `label_names`; `periods` is optional per-row metadata. The
    causal-lm objective: `texts` are the prompts and `responses` the answers to generate (labels
    then only steer partitioning and stratification)."""

    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    periods: list[str] | None = None
    source: str = ""
    lines: list[int] = field(default_factory=list)
    responses: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index) -> "LabelledTexts":
        index = np.asarray(index, dtype=int)
        return LabelledTexts(
            [self.texts[i] for i in index], self.labels[index], self.label_names,
            None if self.periods is None else [self.periods[i] for i in index], self.source,
            [self.lines[i] for i in index] if self.lines else [],
            None if self.responses is None else [self.responses[i] for i in index],
        )


def _decode(path: Path, encoding: str = "utf-8") -> str:
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise DataError(f"unknown --encoding {encoding!r} (a Python codec name such as utf-8, latin-1, cp1252)",
                        "data.encoding") from None
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig" if codec == "utf-8" else codec)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid {'UTF-8' if codec == 'utf-8' else codec} (byte {raw[err.start]:#04x} at offset {err.start}); "
                        "re-save the file as UTF-8 or give its encoding (--encoding, e.g. latin-1)") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise DataError(f"{path}:{line}: contains a NUL byte (a binary or UTF-16 file?); "
                        "re-save it as UTF-8 text or give its encoding (--encoding utf-16)")
    return text


def _read_rows(path: Path, encoding: str = "utf-8") -> list[tuple[int, dict]]:
    """(line number, record) pairs; line numbers are 1-based physical lines of the file."""
    text = _decode(path, encoding)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    rows: list[tuple[int, dict]] = []
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames:
            raise DataError(f"{path}:1: missing header row")
        width, last = len(reader.fieldnames), 1
        try:
            for record in reader:
                if None in record:
                    raise DataError(f"{path}:{reader.line_num}: more fields than the header has "
                                    f"({width + len(record[None])} > {width}; an unquoted comma?)")
                if None in record.values():
                    raise DataError(f"{path}:{reader.line_num}: fewer fields than the header has "
                                    f"({sum(v is not None for v in record.values())} < {width})")
                rows.append((reader.line_num, record))
                last = reader.line_num
        except csv.Error as err:
            if "field larger than field limit" in str(err):
                raise DataError(f"{path}:{last + 1}: a field runs past {csv.field_size_limit()} "
                                "characters (an unclosed quote, or a huge line)") from None
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    elif suffix in (".jsonl", ".json"):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            if len(line) > 4 * MAX_TEXT_CHARS:
                raise DataError(f"{path}:{number}: line is {len(line)} characters; records are "
                                f"limited to {MAX_TEXT_CHARS} characters of text")
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
                       label_names: list[str] | None = None, encoding: str = "utf-8",
                       response_column: str | None = None) -> LabelledTexts:
    """Read one CSV/JSONL file (text in `encoding`). With `label_names` given, a label outside it is
    an error (e.g., a test file naming a class no institution trains on). With `response_column`
    (causal-lm) `text_column` is the prompt column, and a file without `label_column` has one class."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = _read_rows(path, encoding)
    in_file = sorted(rows[0][1])
    if response_column is not None and label_column not in rows[0][1]:
        rows = [(line, {**record, label_column: "all"}) for line, record in rows]
        label_names = label_names if label_names is not None else ["all"]
    columns = set(rows[0][1])
    text_role = "--prompt-column" if response_column is not None else "--text-column"
    for role, column in ((text_role, text_column), ("--label-column", label_column),
                         ("--period-column", period_column), ("--response-column", response_column)):
        if column is not None and column not in columns:
            raise DataError(f"{path}: column {column!r} ({role}) not found; "
                            f"columns are {in_file}", "data." + role[2:].replace("-", "_"))
    texts, raw_labels, periods, lines, responses = [], [], [], [], []
    ids: dict[str, int] = {}
    text_field = "data.prompt_column" if response_column is not None else "data.text_column"
    for line, record in rows:
        text, label = record.get(text_column), record.get(label_column)
        _check_text(path, line, text_column, text, text_field)
        if response_column is not None:
            _check_text(path, line, response_column, record.get(response_column), "data.response_column")
            responses.append(str(record[response_column]).strip())
        if label is None or str(label).strip() == "":
            raise DataError(f"{path}:{line}: empty {label_column!r}", "data.label_column")
        if isinstance(label, (dict, list, bool)):
            raise DataError(f"{path}:{line}: {label_column!r} must be a class name or number, got {label!r}",
                            "data.label_column")
        if ID_COLUMN in record and ID_COLUMN not in (text_column, label_column):
            key = str(record[ID_COLUMN]).strip()
            if key in ids:
                raise DataError(f"{path}:{line}: {ID_COLUMN!r} {key!r} repeats line {ids[key]}")
            ids[key] = line
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
                            f"the {len(label_names)} training labels", "data.label_column")
    labels = np.array([index[label] for label in raw_labels], dtype=np.int64)
    _warn_duplicates(path, texts, lines)
    return LabelledTexts(texts, labels, list(label_names), periods or None, str(path), lines,
                         responses if response_column is not None else None)


def _check_text(path: Path, line: int, column: str, text, setting: str) -> None:
    """A record's text field: present, non-empty, text, at most MAX_TEXT_CHARS."""
    if text is None or not str(text).strip():
        raise DataError(f"{path}:{line}: empty {column!r}", setting)
    if not isinstance(text, (str, int, float)) or isinstance(text, bool):
        raise DataError(f"{path}:{line}: {column!r} must be text, got {type(text).__name__}", setting)
    if len(str(text)) > MAX_TEXT_CHARS:
        raise DataError(f"{path}:{line}: {column!r} is {len(str(text))} characters, more than "
                        f"the {MAX_TEXT_CHARS} allowed", setting)


def _warn_once(source: str, kind: str, message: str, *args) -> None:
    if (source, kind) not in _warned:
        _warned.add((source, kind))
        logger.warning(message, *args)


def _warn_duplicates(path: Path, texts: list[str], lines: list[int]) -> None:
    """Policy: repeated texts are kept (they may be genuine) and logged once per file."""
    first: dict[str, int] = {}
    repeats = []
    for text, line in zip(texts, lines):
        key = " ".join(text.lower().split())
        if key in first:
            repeats.append((line, first[key]))
        else:
            first[key] = line
    if repeats and "/fedseek/data/shipped/" not in Path(path).resolve().as_posix():  # shipped: known, documented
        shown = ", ".join(f"line {a} repeats line {b}" for a, b in repeats[:5])
        _warn_once(str(path), "duplicates", "%s: %d records repeat an earlier record's text (%s%s); "
                   "they are kept", path, len(repeats), shown, ", ..." if len(repeats) > 5 else "")


def label_drift(labels: np.ndarray, period_keys: list[str], label_names: list[str],
                source: str = "", threshold: float = 0.3, order: list[str] | None = None) -> list[str]:
    """Policy for label drift between data periods in time order (`order`; default: sorted keys):
    the data is used as is, and a warning is logged for each period that has labels no earlier
    period had, lacks labels that the first period had, or whose label distribution is more than
    `threshold` (total variation) from the previous period's. Returns the warnings."""
    order = list(order) if order is not None else sorted({k for k in period_keys if k})
    keys = np.asarray(period_keys, dtype=object)
    counts = [Counter(np.asarray(labels)[keys == k].tolist()) for k in order]
    warnings, seen = [], set(counts[0]) if counts else set()
    for i in range(1, len(order)):
        new, lost = sorted(set(counts[i]) - seen), sorted(set(counts[0]) - set(counts[i]))
        a, b = counts[i - 1], counts[i]
        tv = 0.5 * sum(abs(a[x] / max(sum(a.values()), 1) - b[x] / max(sum(b.values()), 1)) for x in set(a) | set(b))
        parts = ([f"new labels {[label_names[x] for x in new][:5]}"] if new else []) + \
                ([f"no records of {[label_names[x] for x in lost][:5]}"] if lost else []) + \
                ([f"label distribution moved {tv:.2f} (total variation) from {order[i - 1]}"] if tv > threshold else [])
        if parts:
            warnings.append(f"{source}: period {order[i]}: " + "; ".join(parts))
            _warn_once(source, f"drift {order[i]}", "%s (label drift: the data is used as is)", warnings[-1])
        seen |= set(counts[i])
    return warnings


def find_data_files(directory: str | Path) -> list[Path]:
    """The institution files of a `--data-dir`, sorted by name; `test.*` is the global test set."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in SUPPORTED_SUFFIXES)
    if not [p for p in files if p.stem != "test"]:
        raise DataError(f"{directory}: no .csv/.jsonl institution files found")
    return files
