"""The CLI refuses bad input with a clear message naming the file and line, before any training."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def fedseek(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedseek", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.mark.parametrize("content, args, message", [
    ("text,label\nhello,a\n,b\n", [], "notes.csv:3: empty 'text'"),
    ("words,label\nhello,a\n", [], "column 'text' (--text-column) not found"),
    (b"text,label\nfine,a\nbad \xff byte,b\n", [], "notes.csv:3: not valid UTF-8"),
    (b"text,label\nfine,a\ncaf\xe9,b\n", ["--encoding", "ascii"], "notes.csv:3: not valid ascii"),
    ("text,label\nfine,a\n", ["--encoding", "latin-9x"], "unknown --encoding 'latin-9x'"),
    ("text,label\n" + "x,a\n" * 60, ["--lora-targets", "query_key_value"], "match no linear layer"),
])
def test_bad_input_is_refused_with_file_and_line(tmp_path, content, args, message):
    path = tmp_path / "notes.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    proc = fedseek("simulate", "--data", str(path), "--text-column", "text", "--label-column", "label",
                   "--out", str(tmp_path / "out"), *args)
    assert proc.returncode == 2, proc.stderr
    assert message in " ".join(proc.stderr.split()), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "report.json").exists()


def test_help_lists_commands():
    proc = fedseek("--help")
    assert proc.returncode == 0 and "simulate" in proc.stdout
    proc = fedseek("simulate", "--help")
    assert "--epsilon" in proc.stdout and "--no-dp" in proc.stdout and "--ffa" in proc.stdout


def test_a_bad_file_is_refused_before_torch_is_loaded(tmp_path):
    """Checking the data comes before loading torch/transformers/opacus (seconds per process), so a
    wrong column or encoding is reported at once; fails if the pre-flight imports the model first."""
    path = tmp_path / "notes.csv"
    path.write_text("words,label\nhello,a\n")
    code = ("import sys\nfrom fedseek.platform.cli.main import app\n"
            f"try:\n    app(['simulate', '--data', {str(path)!r}, '--out', {str(tmp_path / 'out')!r}])\n"
            "except SystemExit as exit_:\n"
            "    print('exit', exit_.code, [m for m in ('torch', 'transformers', 'opacus') if m in sys.modules])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert "column 'text' (--text-column) not found" in " ".join(proc.stderr.split()), proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "exit 2 []", proc.stdout + proc.stderr
