"""Bad institution data: each case is refused with an error naming the file and line, or the
documented policy (duplicate texts kept, label drift used as is) is applied and logged. A refused
file is never modified. (Basic column/empty/encoding cases are in test_data.py.)"""
from __future__ import annotations

import csv
import logging

import numpy as np
import pytest

from fedseek.data import loader
from fedseek.data.loader import MAX_TEXT_CHARS, DataError, label_drift, read_labelled_file
from fedseek.data.tasks import load_federated_data


def write(tmp_path, name, content) -> str:
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else lambda c: path.write_text(c, encoding="utf-8"))(content)
    return path


HUGE = "x" * (MAX_TEXT_CHARS + 1)


@pytest.mark.parametrize("name, content, expected", [
    ("a.csv", "text,label\nhi,a\nyo\n", "a.csv:3: fewer fields than the header has (1 < 2)"),
    ("a.csv", 'text,label\nhi,a\n"never closed,b\n' + "more text\n" * 20000,
     "a.csv:3: a field runs past 131072 characters (an unclosed quote, or a huge line)"),
    ("a.csv", f"text,label\nhi,a\n{HUGE},b\n", f"a.csv:3: 'text' is {MAX_TEXT_CHARS + 1} characters"),
    ("a.csv", "text,label\nhi,a\nnul\x00here,b\n", "a.csv:3: contains a NUL byte"),
    ("a.jsonl", '{"text": "a", "label": "x"}\n{"text": "' + "y" * (4 * MAX_TEXT_CHARS) + '", "label": "x"}\n',
     "a.jsonl:2: line is 400026 characters; records are limited"),
    ("a.jsonl", '{"text": "a", "label": "x"}\n["b", "x"]\n', "a.jsonl:2: each line must be a JSON object"),
    ("a.jsonl", '{"text": "a", "label": "x"}\n{"text": {"nested": 1}, "label": "x"}\n',
     "a.jsonl:2: 'text' must be text, got dict"),
    ("a.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": ["x"]}\n', "a.jsonl:2: 'label' must be a class"),
    ("a.jsonl", '{"text": "a", "label": "x"}\n{"body": "b", "label": "x"}\n', "a.jsonl:2: empty 'text'"),
    ("a.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"\n', "a.jsonl:2: invalid JSON"),
    ("a.jsonl", b'{"text": "a", "label": "x"}\n{"text": "\xff\xfe", "label": "x"}\n', "a.jsonl:2: not valid UTF-8"),
    ("a.csv", "id,text,label\n1,hi,a\n2,yo,b\n1,again,a\n", "a.csv:4: 'id' '1' repeats line 2"),
    ("a.jsonl", '{"id": 7, "text": "a", "label": "x"}\n{"id": 7, "text": "b", "label": "x"}\n',
     "a.jsonl:2: 'id' '7' repeats line 1"),
    ("a.tsv", "text\tlabel\nhi\ta\n", "a.tsv: unsupported file type '.tsv'"),
    ("a.csv", "\n\n   \n", "a.csv: file is empty"),
])
def test_bad_files_are_refused_naming_file_and_line(tmp_path, name, content, expected):
    path = write(tmp_path, name, content)
    before = path.read_bytes()
    with pytest.raises(DataError) as err:
        read_labelled_file(path, "text", "label")
    assert expected in str(err.value), str(err.value)[:300]
    assert str(path) in str(err.value)
    assert path.read_bytes() == before  # nothing stored is touched


def test_csv_field_limit_is_the_module_default():
    assert csv.field_size_limit() == 131072  # the unclosed-quote case above relies on it


def test_unseen_label_in_a_directorys_test_file_names_file_and_line(tmp_path):
    (tmp_path / "sites").mkdir()
    rows = "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(20))
    write(tmp_path / "sites", "bank_a.csv", "text,label\n" + rows)
    write(tmp_path / "sites", "bank_b.csv", "text,label\n" + rows)
    write(tmp_path / "sites", "test.csv", "text,label\nq,a\nr,zebra\n")
    with pytest.raises(DataError, match=r"test.csv:3: label 'zebra' in 'label' is not one of the 2"):
        load_federated_data(data_dir=str(tmp_path / "sites"))


def test_one_bad_site_file_in_a_directory_is_named(tmp_path):
    write(tmp_path, "bank_a.csv", "text,label\n" + "".join(f"t{i},a\n" for i in range(10)))
    write(tmp_path, "bank_b.csv", "text,label\nfine,a\nbroken,a,extra\n")
    with pytest.raises(DataError, match=r"bank_b.csv:3: more fields than the header has"):
        load_federated_data(data_dir=str(tmp_path))


def test_duplicate_texts_are_kept_and_logged_once(tmp_path, caplog):
    path = write(tmp_path, "dup.csv", "text,label\nhello there,a\nother,b\nHello  there,a\nhello there,b\n")
    with caplog.at_level(logging.WARNING, logger="fedseek"):
        data = read_labelled_file(path, "text", "label")
        read_labelled_file(path, "text", "label")
    assert len(data) == 4  # policy: kept
    messages = [r.getMessage() for r in caplog.records if "repeat" in r.getMessage()]
    assert messages == [f"{path}: 2 records repeat an earlier record's text "
                        "(line 4 repeats line 2, line 5 repeats line 2); they are kept"]


def test_label_drift_between_periods_is_logged(caplog):
    names = ["card", "loan", "fraud"]
    labels = np.array([0, 1] * 10 + [0] * 18 + [2] * 2)
    periods = ["2024Q1"] * 20 + ["2024Q2"] * 20
    loader._warned.clear()
    with caplog.at_level(logging.WARNING, logger="fedseek"):
        warnings = label_drift(labels, periods, names, source="bank_a.csv")
    assert warnings == ["bank_a.csv: period 2024Q2: new labels ['fraud']; no records of ['loan']; "
                        "label distribution moved 0.50 (total variation) from 2024Q1"]
    assert "label drift: the data is used as is" in caplog.text
    steady = np.array([0, 1, 2, 0] * 10)
    assert label_drift(steady, periods, names) == []


def test_period_planning_logs_label_drift_in_time_order_not_file_order(caplog):
    from fedseek.data.loader import LabelledTexts
    from fedseek.data.periods import plan_periods

    # the file lists 2024Q2 (card, fraud) before 2024Q1 (card only): fraud is new in Q2
    pool = LabelledTexts([f"t{i}" for i in range(40)], np.array([0, 2] * 10 + [0] * 20), ["card", "loan", "fraud"],
                         periods=["2024Q2"] * 20 + ["2024Q1"] * 20, source="bank_b.csv")
    loader._warned.clear()
    with caplog.at_level(logging.WARNING, logger="fedseek"):
        periods = plan_periods("column", pool)
    assert [p.name for p in periods] == ["2024Q1", "2024Q2"]
    assert "bank_b.csv: period 2024Q2: new labels ['fraud']; label distribution moved 0.50" in caplog.text
    assert "no records of" not in caplog.text
