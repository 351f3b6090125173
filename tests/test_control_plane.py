"""An institution plays the attacker against the coordinator's control plane, with real processes
on 127.0.0.1 started as `LocalFederation` (and docker-compose) starts them: the SuperLink with its
published Fleet listener and the operator's control listener, one registered SuperNode.

The institution holds only what it is given: the CA certificate, the published Fleet address and
its own node key. From there `flwr run` of its own app, `flwr supernode register` of another key,
a keyless SuperNode, and every Control/Runtime route (stop-run, unregister-node, list-runs, ...)
are refused, while the operator on the control listener registers institutions and lists runs and
nodes. The operator's whole `fedseek deploy run` job over these listeners is
tests/test_deployment.py. With the Control API on the published port (Flower's default, one port)
the first three tests fail: the foreign run starts and the extra key is registered.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from fedseek.platform.deploy.control_plane import REFUSAL
from fedseek.platform.deploy.local import BIN, LocalFederation, free_port
from fedseek.platform.deploy.stack import write_flwr_config

pytestmark = pytest.mark.xdist_group("federation")  # conftest.FEDERATION_GROUP: one federation at a time

FOREIGN_APP = {
    "pyproject.toml": """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "harvest"
version = "1.0.0"
description = "an institution's own app"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "intruder"

[tool.flwr.app.components]
serverapp = "harvest.apps:server"
clientapp = "harvest.apps:client"

[tool.flwr.app.config]
""",
    "harvest/__init__.py": "",
    "harvest/apps.py": '''"""Would run its ClientApp beside /data at every site."""
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid, context):
    print("foreign ServerApp ran")


@client.train()
def train(msg, context):
    print(context.node_config)  # e.g. the site's data-path, then its records
    return msg
''',
}


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    root = tmp_path_factory.mktemp("control-plane")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FEDSEEK_HOME": str(root / "home")}
    fed = LocalFederation(root, env)
    try:
        fed.start_superlink(("hospital_a", "intruder"))
        # an intruder's SuperNode without a registered key tries to register itself (checked below)
        fed.spawn("keyless", [str(BIN / "flower-supernode"), "--superlink", fed.fleet, "--root-certificates",
                              "certs/ca.crt", "--node-config", 'institution="intruder"', "--port", str(free_port()),
                              "--max-wait-time", "15"])
        # the operator admits hospital_a on the control listener (Flower's registration, as `fedseek deploy
        # register` does it; that command's platform-DB binding is exercised in test_deployment.py)
        operator_flwr(fed, "supernode", "register", "keys/hospital_a.pub")
        (root / "hospital_a.csv").write_text("text,label\nhello,greeting\n")
        fed.start_supernode("hospital_a", root / "hospital_a.csv", ray=False)
        yield fed
    finally:
        fed.stop()


def institution_flwr(fed: LocalFederation, *args: str) -> subprocess.CompletedProcess:
    """`flwr ARGS` with the institution's material only: the CA and the published Fleet address."""
    home = fed.root / "institution-flwr"
    write_flwr_config(home, "federation", fed.fleet, fed.root / "certs" / "ca.crt")
    return subprocess.run([str(BIN / "flwr"), *args], env={**fed.env, "FLWR_HOME": str(home)}, cwd=fed.root,
                          capture_output=True, text=True, timeout=180)


def operator_flwr(fed: LocalFederation, *args: str) -> dict:
    """`flwr ARGS federation --format json` on the operator's control listener; the parsed answer."""
    home = fed.root / "operator-flwr"
    write_flwr_config(home, "federation", fed.superlink, fed.root / "certs" / "ca.crt")
    proc = subprocess.run([str(BIN / "flwr"), *args, "federation", "--format", "json"],
                          env={**fed.env, "FLWR_HOME": str(home)}, cwd=fed.root, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def said(proc: subprocess.CompletedProcess) -> str:
    """What the CLI printed, without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", proc.stdout + proc.stderr).split())


def test_a_foreign_flwr_run_from_an_institution_is_refused(link):
    app = link.root / "harvest-app"
    for name, text in FOREIGN_APP.items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(text)
    proc = institution_flwr(link, "run", str(app), "federation")
    print(said(proc))
    assert proc.returncode != 0 and "Successfully started run" not in said(proc)
    assert REFUSAL in said(proc)
    runs = operator_flwr(link, "ls")["runs"]
    assert not [run for run in runs if "intruder" in json.dumps(run)], runs  # nothing was started


def test_flwr_supernode_register_from_an_institution_is_refused(link):
    proc = institution_flwr(link, "supernode", "register", "keys/intruder.pub", "federation")
    print(said(proc))
    assert proc.returncode != 0 and "registered successfully" not in said(proc)
    assert REFUSAL in said(proc)
    # the operator sees one node: hospital_a's, registered on the control listener and online via Fleet
    nodes = operator_flwr(link, "supernode", "list")["nodes"]
    assert len(nodes) == 1 and nodes[0]["status"] == "online", nodes


def test_control_and_runtime_routes_are_refused_on_the_published_port_only(link):
    from flwr.supercore.routers.runtime.router import router as runtime_router
    from flwr.superlink.routers.control.router import router as control_router

    paths = [route.path for route in (*control_router.routes, *runtime_router.routes) if hasattr(route, "path")]
    assert {"/v1/control/start-run", "/v1/control/stop-run", "/v1/control/register-node",
            "/v1/control/unregister-node", "/v1/runtime/acquire-task"} <= set(paths)
    ca = str(link.root / "certs" / "ca.crt")
    with httpx.Client(verify=ca, timeout=30) as client:
        for path in paths:
            answer = client.post(f"https://{link.fleet}{path}", content=b"",
                                 headers={"content-type": "application/protobuf"})
            assert answer.status_code == 403 and answer.json()["detail"] == REFUSAL, (path, answer.text)
        for path in ("/health", "/docs", "/openapi.json"):
            assert client.get(f"https://{link.fleet}{path}").status_code == 403, path
        inside = client.post(f"https://{link.superlink}/v1/control/stop-run", content=b"",
                             headers={"content-type": "application/protobuf"})
        assert inside.status_code != 403 or REFUSAL not in inside.text  # the control listener serves it


def test_a_supernode_without_a_registered_key_cannot_register_itself(link):
    assert link.named["keyless"][1].wait(timeout=120) != 0
    assert "SuperNode authentication is enabled. All SuperNodes must be registered via the CLI" in link.log("keyless")


def test_the_control_port_must_differ_from_the_published_port(tmp_path):
    from fedseek.platform.deploy.stack import superlink_command

    with pytest.raises(ValueError, match="must not share the published port"):
        superlink_command(tmp_path, tmp_path, "0.0.0.0", 8000, "0.0.0.0", 8000)
    command = superlink_command(tmp_path, tmp_path, "0.0.0.0", 8000, "127.0.0.1", 9093)
    assert command[command.index("--fleet-port") + 1] == "8000" and command[command.index("--port") + 1] == "9093"
    assert Path(command[0]).name.startswith("python")
