"""Data loading, validation errors (file and line named) and seeded partitions."""
from __future__ import annotations

import numpy as np
import pytest

from fedseek.data.loader import DataError, read_labelled_file
from fedseek.data.partition import partition, stratified_split
from fedseek.data.tasks import load_federated_data, public_pretraining_texts


def write(tmp_path, name, content, mode="w"):
    path = tmp_path / name
    if mode == "wb":
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_reads_csv_and_jsonl(tmp_path):
    csv_file = write(tmp_path, "a.csv", 'text,label\n"hello, world",x\nbye,y\n')
    data = read_labelled_file(csv_file, "text", "label")
    assert data.texts == ["hello, world", "bye"] and data.label_names == ["x", "y"]
    assert data.labels.tolist() == [0, 1] and data.lines == [2, 3]
    jsonl = write(tmp_path, "b.jsonl", '{"t": "one", "l": 1}\n\n{"t": "two", "l": 2}\n')
    data = read_labelled_file(jsonl, "t", "l")
    assert data.texts == ["one", "two"] and data.label_names == ["1", "2"] and data.lines == [1, 3]


@pytest.mark.parametrize("content, column, expected", [
    ("text,label\nhi,a\n", "category", "a.csv: column 'category' (--label-column) not found"),
    ("", "label", "a.csv: file is empty"),
    ("text,label\n", "label", "a.csv: file has a header but no records"),
    ("text,label\nhi,a\n,b\n", "label", "a.csv:3: empty 'text'"),
    ("text,label\nhi,a\nyo,\n", "label", "a.csv:3: empty 'label'"),
    ("text,label\nhi,a\nyo,b,extra\n", "label", "a.csv:3: more fields than the header has"),
])
def test_csv_errors_name_file_and_line(tmp_path, content, column, expected):
    path = write(tmp_path, "a.csv", content)
    with pytest.raises(DataError) as err:
        read_labelled_file(path, "text", column)
    assert expected in str(err.value)


def test_bad_encoding_names_line(tmp_path):
    path = write(tmp_path, "latin.csv", "text,label\nok,a\ncaf\xe9 bad,b\n".encode("latin-1"), "wb")
    with pytest.raises(DataError, match=r"latin.csv:3: not valid UTF-8"):
        read_labelled_file(path, "text", "label")


def test_bad_json_line(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"text": "a", "label": "x"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"a.jsonl:2: invalid JSON"):
        read_labelled_file(path, "text", "label")


def test_unknown_label_in_test_file(tmp_path):
    train = write(tmp_path, "train.csv", "text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(40)))
    test = write(tmp_path, "test.csv", "text,label\nq,a\nr,zebra\n")
    with pytest.raises(DataError, match=r"test.csv:3: label 'zebra' in 'label' is not one of the 2"):
        load_federated_data(data=str(train), test_data=str(test), institutions=2)


def test_unsupported_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_labelled_file(tmp_path / "nope.csv", "text", "label")
    with pytest.raises(DataError, match="unsupported file type"):
        read_labelled_file(write(tmp_path, "a.txt", "x"), "text", "label")


def test_iid_partition_is_seeded_disjoint_and_complete():
    labels = np.repeat(np.arange(10), 30)
    parts = partition(labels, 3, "iid", seed=1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(300))
    assert [len(p) for p in parts] == [100, 100, 100]
    assert all((a == b).all() for a, b in zip(parts, partition(labels, 3, "iid", seed=1)))
    assert not all((a == b).all() for a, b in zip(parts, partition(labels, 3, "iid", seed=2)))


def test_dirichlet_partition_skews_labels():
    labels = np.repeat(np.arange(10), 100)
    skewed = partition(labels, 3, "dirichlet", alpha=0.1, seed=0)
    even = partition(labels, 3, "dirichlet", alpha=1000.0, seed=0)
    assert sorted(np.concatenate(skewed).tolist()) == list(range(1000))

    def spread(parts):  # mean over institutions of the largest class share
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])

    assert spread(skewed) > 2 * spread(even)
    with pytest.raises(ValueError, match="unknown partition scheme"):
        partition(labels, 3, "round-robin")


def test_stratified_split_keeps_every_class():
    labels = np.repeat(np.arange(5), [2, 10, 50, 3, 7])
    rest, held = stratified_split(labels, 0.2, seed=0)
    assert set(labels[held]) == set(range(5)) and set(labels[rest]) == set(range(5))
    assert not set(rest) & set(held)


def test_public_pretraining_slice_is_disjoint_from_institutions_and_tests(banking):
    norm = lambda t: " ".join(t.lower().split())  # noqa: E731
    public = {norm(t) for t in public_pretraining_texts()}
    assert len(public) > 3000
    for site in banking.train:
        assert not public & {norm(t) for t in site.texts}
    assert not public & {norm(t) for t in banking.test.texts}
    medical = load_federated_data("medical_abstracts")
    assert not public & {norm(t) for t in medical.test.texts}
    assert not public & {norm(t) for s in medical.train for t in s.texts}


def test_data_dir_one_file_per_institution(tmp_path):
    rows = lambda k: "text,label\n" + "".join(f"site{k} text {i},{'xyz'[i % 3]}\n" for i in range(30))  # noqa: E731
    write(tmp_path, "hospital_north.csv", rows(0))
    write(tmp_path, "hospital_south.csv", rows(1))
    data = load_federated_data(data_dir=str(tmp_path))
    assert data.institutions == ["hospital_north", "hospital_south"]
    assert data.label_names == ["x", "y", "z"]
    assert len(data.test) == 12 and [len(t) for t in data.train] == [24, 24]


def test_a_process_reads_a_jobs_data_once_and_again_when_the_file_changes(tmp_path):
    import os

    from fedseek.config import JobConfig
    from fedseek.data.plan import federated_data

    rows = "".join(f"record {i} about {'cards' if i % 2 else 'loans'},{'a' if i % 2 else 'b'}\n" for i in range(40))
    path = write(tmp_path, "notes.csv", "text,label\n" + rows)
    job = JobConfig()
    job.data.data, job.federation.institutions = str(path), 2
    first = federated_data(job)
    assert federated_data(job) is first  # the same split, not read again
    path.write_text("text,label\n" + rows.replace("record", "entry"), encoding="utf-8")
    os.utime(path, ns=(1, 1))  # a new stamp even within the filesystem's time resolution
    changed = federated_data(job)
    assert changed is not first and changed.train[0].texts[0].startswith("entry")
    job.data.data = str(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="missing.csv"):
        federated_data(job)  # the loader's own error, naming the file


def test_max_test_rows_takes_a_seeded_subset_of_the_test_set_and_leaves_training_alone(banking):
    capped = load_federated_data("banking77", institutions=3, seed=0, max_test_rows=200)
    assert len(capped.test) == 200 and len(banking.test) > 200
    full = dict(zip(banking.test.texts, banking.test.labels.tolist()))
    assert all(full[t] == label for t, label in zip(capped.test.texts, capped.test.labels.tolist()))
    assert capped.test.texts == load_federated_data("banking77", institutions=3, seed=0, max_test_rows=200).test.texts
    assert capped.test.texts != load_federated_data("banking77", institutions=3, seed=1, max_test_rows=200).test.texts
    assert [r.texts for r in capped.train] == [r.texts for r in banking.train]


def test_a_latin1_file_reads_with_its_encoding_and_names_file_and_line_without_it(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_bytes("text,label\nfine,a\ncafé au lait,b\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"notes.csv:3: not valid UTF-8 .*--encoding"):
        read_labelled_file(path, "text", "label")
    rows = read_labelled_file(path, "text", "label", encoding="latin-1")
    assert rows.texts == ["fine", "café au lait"]
    path.write_bytes(("text,label\n" + "".join(f"café {i},{'ab'[i % 2]}\n" for i in range(40))).encode("latin-1"))
    data = load_federated_data(data=str(path), institutions=1, test_data=str(path), encoding="latin-1")
    assert "café 3" in data.test.texts and "café 3" in data.train[0].texts
    utf16 = tmp_path / "wide.csv"
    utf16.write_text("text,label\nfine,a\nnaïve,b\n", encoding="utf-16")
    assert read_labelled_file(utf16, "text", "label", encoding="utf-16").texts == ["fine", "naïve"]
