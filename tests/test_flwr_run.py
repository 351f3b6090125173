"""The same ServerApp/ClientApp run with Flower's own `flwr run`: a real `flower-superlink`
(simulation mode, loopback only, no runtime dependency installation) and the project's FAB."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture()
def superlink(tmp_path):
    port = free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_ADDRESS": "local"}  # its own Ray instance, never a cluster advertised on this host
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    log = (tmp_path / "superlink.log").open("w")
    proc = subprocess.Popen([str(BIN / "flower-superlink"), "--insecure", "--simulation",
                             "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("flower-superlink did not start: " + (tmp_path / "superlink.log").read_text()[-2000:])
    yield env
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)
    log.close()


def test_flwr_run_executes_the_project_app(superlink, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(BIN / "flwr"), "run", str(ROOT), "test", "--stream", "--run-config",
         # the server evaluates a seeded subset of the test set (all training rows: the gain is small)
         f'federation.rounds=1 optim.local_steps=2 data.max_test_rows=500 federation.out="{out}"',
         "--federation-config", "num-supernodes=3"],
        env=superlink, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert len(report["rounds"]) == 1 and set(report["epsilon"]) == {"bank_a", "bank_b", "bank_c"}
    assert report["final_accuracy"] > report["initial_accuracy"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
