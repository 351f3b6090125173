"""One job path (issue 17): the plain job and every continual period run through
`aggregator/period.run_period`; report.json has one writer; no module imports another's private name."""
from __future__ import annotations

import ast
from pathlib import Path

import fedseek

PACKAGE = Path(fedseek.__file__).parent


def trees():
    for path in sorted(PACKAGE.rglob("*.py")):
        if "migrations" not in path.parts:
            yield path.relative_to(PACKAGE.parent).as_posix(), ast.parse(path.read_text())


def test_report_json_is_written_by_one_function():
    writers = []
    for name, tree in trees():
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for call in (n for n in ast.walk(function) if isinstance(n, ast.Call)):
                if isinstance(call.func, ast.Attribute) and call.func.attr in ("write_text", "write_bytes", "open") \
                        and "report.json" in ast.unparse(call.func.value):
                    writers.append(f"{name}:{function.name}")
    assert sorted(set(writers)) == ["fedseek/aggregator/period.py:write_report"], writers


def test_no_private_name_is_imported_across_modules():
    private = [f"{name}:{node.lineno} {node.module}.{alias.name}"
               for name, tree in trees() for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedseek")
               for alias in node.names if alias.name.startswith("_")]
    assert not private, private


def test_plain_job_and_continual_periods_share_the_period_loop():
    calls = {name: {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
             for name, tree in trees() if name.startswith("fedseek/aggregator/")}
    users = sorted(name for name, called in calls.items() if "run_period" in called)
    assert users == ["fedseek/aggregator/continual_app.py", "fedseek/aggregator/server_app.py"], users
    loops = sorted(name for name, called in calls.items() if "run_rounds" in called)
    assert loops == ["fedseek/aggregator/period.py"], loops  # one caller of the round loop
