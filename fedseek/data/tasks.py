"""Shipped tasks (banking77, medical_abstracts, pubmedqa) and user files, split into
institutions and a global test set.

The shipped splits are fixed (seed 0, independent of `--seed`): a *public* slice of banking77's
and medical_abstracts' training text was used to pretrain the embedded base model, so it must
never reach an institution or a test set. `public_pretraining_texts()` is that slice.
"""
from __future__ import annotations

import csv
import json
import string
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from fedseek.data.loader import DataError, LabelledTexts, find_data_files, read_labelled_file
from fedseek.data.partition import partition, stratified_split
from fedseek.resources import resource_path

SHIPPED = resource_path("data/shipped", "banking77/train.csv")
SHIPPED_TASKS = ("banking77", "medical_abstracts", "pubmedqa", "banking77-gen", "pubmedqa-gen")
PUBLIC_FRACTION = 0.30  # of banking77 train and medical_abstracts, reserved for pretraining
SPLIT_SEED = 0


@dataclass
class FederatedData:
    task: str
    label_names: list[str]
    institutions: list[str]
    train: list[LabelledTexts]  # one per institution; never leaves that institution
    test: LabelledTexts  # global test set, held by the coordinator for evaluation
    active_labels: list[int] | None = None  # a task-incremental period's labels (None = all)
    validation: list[LabelledTexts] | None = None  # per institution, held out of `train`


def _csv_rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _disjoint(public: list[str], *private: LabelledTexts) -> list[str]:
    """Drop public texts that also occur (case/space-normalised) in a private split: the shipped
    files hold a few near-duplicate queries."""
    norm = lambda t: " ".join(t.lower().split())  # noqa: E731
    seen = {norm(t) for part in private for t in part.texts}
    return [t for t in public if norm(t) not in seen]


def _banking77() -> tuple[LabelledTexts, LabelledTexts, list[str]]:
    root = SHIPPED / "banking77"
    names = json.loads((root / "categories.json").read_text())
    train = read_labelled_file(root / "train.csv", "text", "category", label_names=names)
    test = read_labelled_file(root / "test.csv", "text", "category", label_names=names)
    private, public = stratified_split(train.labels, PUBLIC_FRACTION, SPLIT_SEED)
    public_texts = [train.texts[i] for i in public]
    train = train.subset(private)
    return train, test, _disjoint(public_texts, train, test)


def _medical_abstracts() -> tuple[LabelledTexts, LabelledTexts, list[str]]:
    root = SHIPPED / "medical_abstracts"
    names = [r["condition_name"] for r in _csv_rows(root / "medical_tc_labels.csv")]
    codes = [str(i + 1) for i in range(len(names))]
    data = read_labelled_file(root / "medical_tc_test.csv", "medical_abstract", "condition_label",
                              label_names=codes)
    data.label_names = names
    rest, public = stratified_split(data.labels, PUBLIC_FRACTION, SPLIT_SEED)
    train, test = stratified_split(data.labels[rest], 0.25, SPLIT_SEED + 1)
    train, test = data.subset(rest[train]), data.subset(rest[test])
    return train, test, _disjoint([data.texts[i] for i in public], train, test)


def _pubmedqa() -> tuple[LabelledTexts, LabelledTexts, list[str]]:
    records = json.loads((SHIPPED / "pubmedqa" / "ori_pqal.json").read_text())
    names = ["yes", "no", "maybe"]
    texts, labels, years = [], [], []
    for record in records.values():
        texts.append(record["QUESTION"] + " " + " ".join(record["CONTEXTS"]))
        labels.append(names.index(record["final_decision"]))
        years.append(record["YEAR"] or "")
    data = LabelledTexts(texts, np.array(labels), names, years, "pubmedqa/ori_pqal.json")
    train, test = stratified_split(data.labels, 0.2, SPLIT_SEED)
    return data.subset(train), data.subset(test), []


def _banking77_gen() -> tuple[LabelledTexts, LabelledTexts, list[str]]:
    """Generative banking77: customer message -> intent name (scored by exact match)."""
    train, test, public = _banking77()

    def pairs(rows: LabelledTexts) -> LabelledTexts:
        prompts = [f"Name the banking intent of this customer message: {t}" for t in rows.texts]
        answers = [rows.label_names[label].replace("_", " ") for label in rows.labels]
        return replace(rows, texts=prompts, responses=answers)

    return pairs(train), pairs(test), public


def _pubmedqa_gen() -> tuple[LabelledTexts, LabelledTexts, list[str]]:
    """Generative PubMedQA: question + abstract -> the expert's long answer (scored by ROUGE-L);
    the same split, labels (yes/no/maybe) and years as `pubmedqa`."""
    records = list(json.loads((SHIPPED / "pubmedqa" / "ori_pqal.json").read_text()).values())
    train, test, _ = _pubmedqa()
    prompts = [f"Question: {r['QUESTION']}\nAbstract: {' '.join(r['CONTEXTS'])}" for r in records]
    answers = [r["LONG_ANSWER"] for r in records]
    split = {t: i for i, t in enumerate(r["QUESTION"] + " " + " ".join(r["CONTEXTS"]) for r in records)}

    def pairs(rows: LabelledTexts) -> LabelledTexts:
        index = [split[t] for t in rows.texts]
        return replace(rows, texts=[prompts[i] for i in index], responses=[answers[i] for i in index])

    return pairs(train), pairs(test), []


_LOADERS = {"banking77": _banking77, "medical_abstracts": _medical_abstracts, "pubmedqa": _pubmedqa,
            "banking77-gen": _banking77_gen, "pubmedqa-gen": _pubmedqa_gen}
_SITE_KIND = {"banking77": "bank", "medical_abstracts": "hospital", "pubmedqa": "hospital",
              "banking77-gen": "bank", "pubmedqa-gen": "hospital"}


def public_pretraining_texts() -> list[str]:
    """Text reserved for pretraining the embedded base: disjoint from every institution and test."""
    return _banking77()[2] + _medical_abstracts()[2]


def _site_names(kind: str, count: int) -> list[str]:
    return [f"{kind}_{string.ascii_lowercase[i]}" if count <= 26 else f"{kind}_{i}" for i in range(count)]


def load_federated_data(task: str = "banking77", institutions: int = 3, partition_scheme: str = "iid",
                        alpha: float = 0.5, seed: int = 0, data: str | None = None,
                        data_dir: str | None = None, test_data: str | None = None,
                        text_column: str = "text", label_column: str = "label",
                        test_fraction: float = 0.2, max_train_rows: int | None = None,
                        period_column: str | None = None, max_test_rows: int | None = None,
                        encoding: str = "utf-8", response_column: str | None = None) -> FederatedData:
    """Build the federation's data. Shipped `task`, or a user `data` file partitioned across
    `institutions`, or a `data_dir` holding one file per institution (+ optional `test.*`).
    `max_train_rows` / `max_test_rows`: a seeded random subset of that many rows (quick runs);
    `encoding`: of the user's files (shipped tasks are UTF-8); `response_column`: causal-lm
    (prompt, response) files, `text_column` then names the prompt column."""
    read = partial(read_labelled_file, encoding=encoding, response_column=response_column)
    federation = _federated_data(read, task, institutions, partition_scheme, alpha, seed, data, data_dir, test_data,
                                 text_column, label_column, test_fraction, max_train_rows, period_column)
    return replace(federation, test=_at_most(federation.test, max_test_rows, seed))


def _at_most(rows: LabelledTexts, limit: int | None, seed: int) -> LabelledTexts:
    if not limit or len(rows) <= limit:
        return rows
    return rows.subset(np.sort(np.random.default_rng(seed).permutation(len(rows))[:limit]))


def _federated_data(read, task, institutions, partition_scheme, alpha, seed, data, data_dir, test_data, text_column,
                    label_column, test_fraction, max_train_rows, period_column) -> FederatedData:
    if data and data_dir:
        raise DataError("give either --data or --data-dir, not both")
    if data_dir:
        return _from_directory(read, Path(data_dir), text_column, label_column, test_fraction, seed, period_column)
    if data:
        pool = read(data, text_column, label_column, period_column)
        if test_data:
            test = read(test_data, text_column, label_column, period_column,
                                      label_names=pool.label_names)
        else:
            keep, held = stratified_split(pool.labels, test_fraction, seed)
            pool, test = pool.subset(keep), pool.subset(held)
        task_name, kind = Path(data).stem, "site"
    else:
        if task not in _LOADERS:
            raise DataError(f"unknown task {task!r}; shipped tasks are {list(SHIPPED_TASKS)} "
                            "(or pass --data FILE)")
        pool, test, _ = _LOADERS[task]()
        task_name, kind = task, _SITE_KIND[task]
    pool = _at_most(pool, max_train_rows, seed)
    parts = partition(pool.labels, institutions, partition_scheme, alpha, seed)
    return FederatedData(task_name, pool.label_names, _site_names(kind, institutions),
                         [pool.subset(p) for p in parts], test)


def _from_directory(read, directory: Path, text_column: str, label_column: str, test_fraction: float,
                    seed: int, period_column: str | None = None) -> FederatedData:
    files = find_data_files(directory)
    site_files = [p for p in files if p.stem != "test"]
    test_files = [p for p in files if p.stem == "test"]
    sites = [read(p, text_column, label_column, period_column) for p in site_files]
    names = sorted(set().union(*(s.label_names for s in sites)))
    sites = [read(p, text_column, label_column, period_column, label_names=names)
             for p in site_files]
    if test_files:
        test = read(test_files[0], text_column, label_column, period_column, label_names=names)
    else:  # each institution holds out part of its rows; their union is the global test set
        held_parts, kept = [], []
        for site in sites:
            keep, held = stratified_split(site.labels, test_fraction, seed)
            kept.append(site.subset(keep))
            held_parts.append(site.subset(held))
        sites = kept
        periods = sum((h.periods or [] for h in held_parts), []) if period_column else None
        responses = sum((h.responses for h in held_parts), []) if held_parts[0].responses is not None else None
        test = LabelledTexts(sum((h.texts for h in held_parts), []), np.concatenate([h.labels for h in held_parts]),
                             names, periods, str(directory), responses=responses)
    return FederatedData(directory.name, names, [p.stem for p in site_files], sites, test)
