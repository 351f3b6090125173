"""The `flwr` CLI as the deployment drives it: which binary, which project directory it runs,
its streamed output and a run's final status."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def app_directory() -> Path:
    """The Flower app (directory with `[tool.flwr.app]` in pyproject.toml) this installation runs:
    the source tree of an editable install or of the deployment image, else the working directory."""
    from fedseek.resources import PACKAGE_DIR

    for candidate in (PACKAGE_DIR.parent, Path.cwd()):
        pyproject = candidate / "pyproject.toml"
        if pyproject.is_file() and "[tool.flwr.app]" in pyproject.read_text():
            return candidate
    raise FileNotFoundError("no FedSeek project directory (pyproject.toml with [tool.flwr.app]) found; "
                            "pass --app-dir")


def flwr_binary() -> str:
    """This environment's `flwr` CLI (beside the interpreter), else the one on PATH."""
    local = Path(sys.executable).parent / "flwr"
    return str(local) if local.exists() else "flwr"


def json_field(text: str, key: str):
    """`key` of the last JSON object line of a `flwr … --format json` output (None if absent)."""
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line).get(key)
        except (json.JSONDecodeError, AttributeError):
            continue
    try:
        return json.loads(text).get(key)
    except (json.JSONDecodeError, AttributeError):
        return None


def stream_output(command: list[str], env: dict) -> tuple[int, str | None]:
    """Run `flwr run --stream`, echoing its output; (exit code, Flower run id)."""
    import re

    run_id = None
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            found = re.search(r"Successfully started run (\d+)", line)
            run_id = run_id or (found.group(1) if found else None)
    return proc.returncode, run_id


def run_status(run_id: str, env: dict, federation: str) -> str | None:
    """The run's final status as the SuperLink records it, e.g. `finished:completed`."""
    proc = subprocess.run([flwr_binary(), "list", federation, "--run-id", run_id, "--format", "json"], env=env,
                          capture_output=True, text=True, timeout=120)
    try:
        runs = json.loads(proc.stdout[proc.stdout.index("{"):]).get("runs", [])
    except ValueError:
        return None
    return str(runs[0].get("status")) if runs else None
