"""The deployment packaging: docker-compose.yml, its example env files, the Dockerfile.

There is no Docker engine here: compose is checked with Debian's `docker-compose config` (it
validates the file and renders it with the example env files), then the rendered model is
checked for what each profile must run. docker-compose 1.29 renders every service whatever
`--profile` says, so a profile's services are taken from their `profiles:` lists (which is what
`docker compose --profile P up` starts). The compose tests are skipped only when the
`docker-compose` binary is absent (scripts/setup.sh installs it as root); the checks of the env
files, Dockerfile and .dockerignore need nothing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLES = {"coordinator": ROOT / "deploy" / "coordinator.env.example",
                "institution": ROOT / "deploy" / "institution.env.example"}
DOCKER_COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None,
    reason="docker-compose binary not found (Debian package docker-compose; scripts/setup.sh installs it as root)")

SERVICES = {"coordinator": {"postgres", "db-migrate", "mlflow", "superlink", "serverapp", "scheduler", "launcher"},
            "institution": {"ray-head", "supernode", "clientapp"}}
LONG_RUNNING = {"postgres", "mlflow", "superlink", "serverapp", "scheduler", "ray-head", "supernode", "clientapp"}
ONE_OFF = {"db-migrate", "launcher"}
FEDSEEK_SERVICES = (SERVICES["coordinator"] | SERVICES["institution"]) - {"postgres"}


def env_values(profile: str) -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLES[profile].read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{ENV_EXAMPLES[profile].name}: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


# the example env file leaves POSTGRES_PASSWORD empty (the postgres service then refuses to start); the rendering
# tests fill it in as an operator would, with a value easy to find in the rendered file
TEST_PASSWORD = "3f9c2a7be41d08c5a6e2f7d913b4c08e5a71d2c6f90b3e48"


def compose(profile: str, *args: str, password: str | None = TEST_PASSWORD) -> subprocess.CompletedProcess:
    # a clean environment: the shell's variables would override the env file's
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    if password is not None:
        env["POSTGRES_PASSWORD"] = password
    return subprocess.run([DOCKER_COMPOSE, "--env-file", str(ENV_EXAMPLES[profile]), "-f", str(COMPOSE_FILE),
                           "--profile", profile, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


_RENDERED: dict[str, dict] = {}


def rendered(profile: str) -> dict:
    """`docker-compose --profile P config` with the profile's example env file (must exit 0)."""
    if profile not in _RENDERED:
        proc = compose(profile, "config")
        assert proc.returncode == 0, f"docker-compose config ({profile}) failed:\n{proc.stderr}"
        assert "WARNING" not in proc.stderr, proc.stderr  # e.g. a variable without value or default
        _RENDERED[profile] = yaml.safe_load(proc.stdout)
    return _RENDERED[profile]


def active(profile: str) -> dict[str, dict]:
    return {name: svc for name, svc in rendered(profile)["services"].items() if profile in svc.get("profiles", [])}


def raw_services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


# ───────────────────────────── rendered by docker-compose ─────────────────────────────

@needs_compose
@pytest.mark.parametrize("profile", ["coordinator", "institution"])
def test_config_renders_profile_services(profile):
    services = rendered(profile)["services"]
    assert set(active(profile)) == SERVICES[profile]
    for name, svc in services.items():  # each service belongs to exactly one profile
        assert len(svc.get("profiles", [])) == 1 and svc["profiles"][0] in SERVICES, name
    for name in SERVICES[profile] & LONG_RUNNING:
        assert services[name]["restart"] == "unless-stopped", name
    for name in SERVICES[profile] & ONE_OFF:
        assert services[name]["restart"] == "no", name
    env = env_values(profile)
    for name in SERVICES[profile] & FEDSEEK_SERVICES:  # one image, built from the Dockerfile
        svc = services[name]
        assert svc["image"] == env["FEDSEEK_IMAGE"], name
        assert Path(svc["build"]["context"]) == ROOT and svc["build"].get("dockerfile", "Dockerfile") == "Dockerfile"
        assert svc["build"]["args"]["BASE"] == env["FEDSEEK_BASE"]
        assert svc["build"]["args"]["FEDSEEK_UID"] == env["FEDSEEK_UID"]
        assert svc.get("init") is True, name


@needs_compose
def test_coordinator_commands():
    svc = active("coordinator")
    env = env_values("coordinator")
    for name in ("superlink", "serverapp", "scheduler", "db-migrate"):
        assert "entrypoint" not in svc[name], f"{name} must run the image's entrypoint (fedseek)"
    assert svc["superlink"]["command"] == ["deploy", "superlink", "--certs", "/run/secrets", "--state",
                                           "/var/lib/fedseek/superlink", "--host", "0.0.0.0", "--port", "8000",
                                           "--control-host", "0.0.0.0", "--control-port", "9093"]
    # the ServerApp's Runtime API is on the control listener, not the published Fleet port
    assert svc["serverapp"]["command"] == ["deploy", "serverapp", "--superlink", "superlink:9093", "--ca",
                                           "/run/secrets/ca.crt", "--secret", "/run/secrets/superexec.secret"]
    assert svc["scheduler"]["command"] == ["scheduler", "run"]
    assert svc["db-migrate"]["command"] == ["db", "upgrade"]
    # the launcher takes whole command lines: `run --rm launcher fedseek deploy run|register ...`
    assert svc["launcher"]["entrypoint"] == ["/usr/bin/env"]
    assert svc["launcher"]["command"][:2] == ["fedseek", "deploy"]
    backend = f"postgresql+psycopg://{env['POSTGRES_USER']}:{TEST_PASSWORD}@postgres:5432/{env['MLFLOW_DB']}"
    assert svc["mlflow"]["entrypoint"] == ["mlflow"]
    assert svc["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"] == backend  # MLflow's env var for it
    assert svc["mlflow"]["command"][:7] == ["server", "--artifacts-destination", "/mlflow/artifacts", "--host",
                                           "0.0.0.0", "--port", "5000"]
    # MLflow 3 refuses API calls (403) whose Host header is not localhost/private IP unless allowed
    allowed = svc["mlflow"]["command"][svc["mlflow"]["command"].index("--allowed-hosts") + 1].split(",")
    for name in ("serverapp", "scheduler", "launcher", "db-migrate"):
        environment = svc[name]["environment"]
        assert environment["FEDSEEK_DB_URL"] == (f"postgresql+psycopg://{env['POSTGRES_USER']}:"
                                                 f"{TEST_PASSWORD}@postgres:5432/{env['POSTGRES_DB']}")
        assert environment["FEDSEEK_MLFLOW_URI"] == "http://mlflow:5000"
        assert environment["FEDSEEK_MLFLOW_URI"].removeprefix("http://") in allowed
        assert environment["FEDSEEK_DEFAULT_EPSILON_MAX"] == env["FEDSEEK_DEFAULT_EPSILON_MAX"]
    assert env["MLFLOW_DB"] != env["POSTGRES_DB"]  # both use Alembic's alembic_version table
    assert svc["postgres"]["image"].split(":")[1].split(".")[0] in ("15", "16")


@needs_compose
def test_institution_commands():
    svc = active("institution")
    env = env_values("institution")
    assert "entrypoint" not in svc["supernode"] and "entrypoint" not in svc["clientapp"]
    assert svc["supernode"]["command"] == [
        "deploy", "supernode", "--superlink", env["SUPERLINK_ADDRESS"], "--ca", "/run/secrets/ca.crt",
        "--key", "/run/secrets/node.key", "--institution", env["INSTITUTION"], "--data", f"/data/{env['DATA_FILE']}",
        "--host", "0.0.0.0", "--port", "9094", "--ray-address", "ray://ray-head:10001",
        "--num-gpus", env["WORKER_NUM_GPUS"], "--num-cpus", env["WORKER_NUM_CPUS"],
        "--local-certs", "/run/secrets/site-",  # TLS on the site link too
        "--policy", env["SITE_POLICY"], "--state-dir", "/var/lib/fedseek-site"]  # the site's own privacy policy
    from fedseek.platform.deploy.stack import site_policy_config

    assert site_policy_config(env["SITE_POLICY"])  # the example policy parses
    # its durable history is on one volume shared by the ClientApp and the Ray worker (where handlers run)
    for service in ("clientapp", "ray-head"):
        assert any(str(v).startswith("site-privacy:/var/lib/fedseek-site") or
                   (isinstance(v, dict) and v.get("source") == "site-privacy" and v.get("target") == "/var/lib/fedseek-site")
                   for v in svc[service]["volumes"]), svc[service]["volumes"]
    assert svc["clientapp"]["command"] == ["deploy", "clientapp", "--supernode", "supernode:9094",
                                           "--local-certs", "/run/secrets/site-"]
    assert svc["ray-head"]["entrypoint"] == ["ray"]
    assert svc["ray-head"]["command"][:4] == ["start", "--head", "--block", f"--num-gpus={env['NUM_GPUS']}"]
    assert "--ray-client-server-port=10001" in svc["ray-head"]["command"]  # the port of ray://ray-head:10001


@needs_compose
def test_healthchecks_and_start_order():
    coord, inst = active("coordinator"), active("institution")
    tests = {name: " ".join(svc["healthcheck"]["test"]) for name, svc in {**coord, **inst}.items()
             if "healthcheck" in svc}
    assert "pg_isready" in tests["postgres"]
    assert "http://127.0.0.1:5000/health" in tests["mlflow"]
    assert "socket.create_connection(('127.0.0.1', p), 5).close() for p in (8000, 9093)" in tests["superlink"]
    assert "socket.create_connection(('127.0.0.1', 9094)" in tests["supernode"]
    assert "ray health-check --address 127.0.0.1:6379" in tests["ray-head"]
    for name in tests:
        assert tests[name].startswith(("CMD ", "CMD-SHELL ")), name

    def needs(svc, name, condition="service_healthy"):
        assert svc["depends_on"][name]["condition"] == condition, (svc.get("command"), name)

    needs(coord["mlflow"], "postgres")
    needs(coord["db-migrate"], "postgres")
    for name in ("serverapp", "launcher"):
        needs(coord[name], "superlink")
    for name in ("serverapp", "scheduler", "launcher"):
        needs(coord[name], "mlflow")
        needs(coord[name], "db-migrate", "service_completed_successfully")
    needs(inst["supernode"], "ray-head")
    needs(inst["clientapp"], "supernode")
    needs(inst["clientapp"], "ray-head")
    for services in (coord, inst):  # every dependency has the healthcheck its condition waits for
        for svc in services.values():
            for dep, spec in svc.get("depends_on", {}).items():
                assert dep in services and (spec["condition"] != "service_healthy" or dep in tests), dep


@needs_compose
def test_institution_data_read_only_and_gpu_reservation():
    svc = active("institution")
    env = env_values("institution")
    for name in ("ray-head", "supernode", "clientapp"):
        assert f"{env['DATA_DIR']}:/data:ro" in svc[name]["volumes"], name
    for name, service in {**svc, **active("coordinator")}.items():  # nothing else may write /data
        for volume in service.get("volumes", []):
            if volume.split(":")[1] in ("/data", "/models"):
                assert volume.endswith(":ro"), (name, volume)
    devices = svc["ray-head"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": env["NUM_GPUS"], "capabilities": ["gpu"]}] or \
        devices == [{"driver": "nvidia", "count": int(env["NUM_GPUS"]), "capabilities": ["gpu"]}]
    assert f"--num-gpus={env['NUM_GPUS']}" in svc["ray-head"]["command"]
    for name in ("supernode", "clientapp"):  # training happens on the Ray cluster
        assert "deploy" not in svc[name], name
    assert svc["ray-head"]["shm_size"] == env["RAY_SHM_SIZE"]


@needs_compose
def test_secrets_ports_and_networks():
    coord_config, inst_config = rendered("coordinator"), rendered("institution")
    coord, inst = active("coordinator"), active("institution")
    secret_names = lambda svc: sorted(s["source"] if isinstance(s, dict) else s for s in svc.get("secrets", []))
    assert secret_names(coord["superlink"]) == ["ca.crt", "server.crt", "server.key", "superexec.secret"]
    assert secret_names(coord["serverapp"]) == ["ca.crt", "superexec.secret"]
    assert secret_names(inst["supernode"]) == ["ca.crt", "node.key", "site-ca.crt", "site-server.crt",
                                               "site-server.key", "site-superexec.secret"]
    assert secret_names(inst["clientapp"]) == ["site-ca.crt", "site-superexec.secret"]
    assert secret_names(inst["ray-head"]) == []
    for name in ("postgres", "mlflow", "db-migrate"):
        assert secret_names(coord[name]) == [], name
    certs = Path(env_values("coordinator")["CERTS_DIR"])
    files = {name: Path(spec["file"]) for name, spec in coord_config["secrets"].items()}
    for name in ("ca.crt", "server.crt", "server.key", "superexec.secret"):
        assert files[name] == (ROOT / certs / name).resolve(), name
    assert all(path.name != "ca.key" for path in files.values())  # the CA key never enters a container
    node_key = Path(inst_config["secrets"]["node.key"]["file"])
    assert node_key == (ROOT / env_values("institution")["NODE_KEY"]).resolve()
    for name, svc in {**coord, **inst}.items():  # no key material through a plain volume
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            assert not re.search(r"(^|/)(certs|site-certs)$|\.key$", source), (name, volume)

    def published(svc):
        out = []
        for port in svc.get("ports", []):
            if isinstance(port, dict):
                out.append((port.get("host_ip", "0.0.0.0"), str(port["published"]), str(port["target"])))
            else:
                parts = str(port).removesuffix("/tcp").split(":")
                out.append(tuple(parts) if len(parts) == 3 else ("0.0.0.0", *parts))
        return out

    assert published(coord["superlink"]) == [("0.0.0.0", env_values("coordinator")["SUPERLINK_PORT"], "8000")]
    assert published(coord["mlflow"]) == [("127.0.0.1", env_values("coordinator")["MLFLOW_PORT"], "5000")]
    for name in coord.keys() - {"superlink", "mlflow"}:
        assert published(coord[name]) == [], name
    for name, svc in inst.items():  # institutions open nothing inbound
        assert published(svc) == [], name
    # only the SuperNode reaches outside; the data-reading Ray head and ClientApp sit on an
    # internal network
    assert inst_config["networks"]["site"]["internal"] is True
    assert set(inst["supernode"]["networks"]) == {"default", "site"}
    assert set(inst["ray-head"]["networks"]) == {"site"} and set(inst["clientapp"]["networks"]) == {"site"}


def published_targets(svc: dict) -> set[str]:
    """The container ports a rendered service publishes on the host (any interface)."""
    return {str(p["target"]) if isinstance(p, dict) else str(p).removesuffix("/tcp").split(":")[-1]
            for p in svc.get("ports", [])}


@needs_compose
def test_only_the_fleet_api_is_published():
    """The SuperLink's published port is its Fleet-only listener; the control listener (Control
    API: `flwr run`, node registration, stop; Runtime API) is published by no service, and the
    coordinator's own containers reach it on the compose network (tests/test_control_plane.py
    plays an institution against these listeners)."""
    from fedseek.platform.cli.deploy import CONTROL

    coord = active("coordinator")
    command = coord["superlink"]["command"]
    fleet, control = command[command.index("--port") + 1], command[command.index("--control-port") + 1]
    assert fleet != control
    assert published_targets(coord["superlink"]) == {fleet}
    for name, svc in {**coord, **active("institution")}.items():
        assert control not in published_targets(svc), name
    assert coord["serverapp"]["command"][coord["serverapp"]["command"].index("--superlink") + 1] == f"superlink:{control}"
    assert CONTROL == f"superlink:{control}"  # the default of `fedseek deploy run|register` in the launcher


@needs_compose
def test_no_password_on_any_command_line():
    """The DB password reaches processes through their environment only: `ps` shows every
    process's command line to every account on the host."""
    for profile in ("coordinator", "institution"):
        for name, svc in active(profile).items():
            for key in ("command", "entrypoint", "healthcheck"):
                assert TEST_PASSWORD not in json.dumps(svc.get(key)), (profile, name, key)
    coord = active("coordinator")
    assert TEST_PASSWORD in coord["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert coord["postgres"]["environment"]["POSTGRES_PASSWORD"] == TEST_PASSWORD


@needs_compose
def test_the_example_password_is_refused(tmp_path):
    """The example env file has no working password: compose refuses to start with it, and the
    postgres service refuses an example value (so nothing that needs the databases starts)."""
    assert env_values("coordinator")["POSTGRES_PASSWORD"] == ""
    # an institution's env file has no database password: its profile must still render and start
    assert "POSTGRES_PASSWORD" not in env_values("institution")
    institution = compose("institution", "config", password=None)
    assert institution.returncode == 0, institution.stderr
    script = active("coordinator")["postgres"]["entrypoint"][2].replace("$$", "$")
    script = script.replace("/docker-entrypoint-initdb.d/", f"{tmp_path}/")  # not the real path here
    stub = tmp_path / "docker-entrypoint.sh"
    stub.write_text("#!/bin/sh\necho postgres started\n")
    stub.chmod(0o755)

    def start(password: str) -> subprocess.CompletedProcess:
        env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "POSTGRES_PASSWORD": password, "MLFLOW_DB": "mlflow"}
        return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)

    empty = start("")  # the example file as it is
    assert empty.returncode == 78 and "POSTGRES_PASSWORD is empty" in empty.stderr and "started" not in empty.stdout
    for example in ("change-me-openssl-rand-hex-24", "postgres", "my-placeholder"):
        refused = start(example)
        assert refused.returncode == 78 and "POSTGRES_PASSWORD is the example placeholder" in refused.stderr
        assert "started" not in refused.stdout
    started = start(TEST_PASSWORD)
    assert started.returncode == 0 and started.stdout.strip() == "postgres started", started.stderr
    assert (tmp_path / "10-mlflow-db.sql").read_text() == 'CREATE DATABASE "mlflow";\n'


# ───────────────────────────── static: env files, Dockerfile ─────────────────────────────

def _variables(node) -> set[str]:
    if isinstance(node, dict):
        return set().union(*(_variables(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_variables(v) for v in node)) if node else set()
    if isinstance(node, str):
        return set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", node))
    return set()


@pytest.mark.parametrize("profile", ["coordinator", "institution"])
def test_env_example_sets_exactly_the_profile_variables(profile):
    """Every ${VAR} a profile's services (and their secrets) use is set in its example env file,
    and the file sets nothing else (a typo there would silently fall back to a default)."""
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    services = {n: s for n, s in document["services"].items() if profile in s.get("profiles", [])}
    used = _variables(services)
    for svc in services.values():
        for secret in svc.get("secrets", []):
            used |= _variables(document["secrets"][secret if isinstance(secret, str) else secret["source"]])
    defined = set(env_values(profile)) - {"COMPOSE_PROJECT_NAME"}
    assert used - defined == set(), f"{ENV_EXAMPLES[profile].name} lacks {sorted(used - defined)}"
    assert defined - used == set(), f"{ENV_EXAMPLES[profile].name} sets unused {sorted(defined - used)}"


def test_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, re.M) and re.search(r"^FROM \$\{BASE\}$", text, re.M)
    torch_pin = re.search(r'"torch==([0-9.]+)"', pyproject).group(1)
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(torch_pin)}$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert '"torch==${TORCH_VERSION}"' in text and "pip install ." in text
    assert "flwr[simulation]>=1.41,<1.42" in pyproject and "ray==2.55.1" in pyproject
    assert re.search(r'"mlflow>=[0-9.]+,<3\.18"', pyproject)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["fedseek"\]$', text, re.M)
    assert re.search(r"^WORKDIR /app$", text, re.M)  # `fedseek deploy run` finds the Flower app in its cwd
    assert "FLWR_TELEMETRY_ENABLED=0" in text and "RAY_worker_niceness=0" in text  # no events out; training not demoted
    # named volumes start with the owner of the image directory they are mounted on: every mount
    # point of a named volume of the fedseek image must be created and chowned for the service user
    chowned = set(re.search(r"chown fedseek:fedseek ([^\n;]+)", text).group(1).split())
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    for name, svc in document["services"].items():
        if name == "postgres":
            continue
        for volume in svc.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source in document["volumes"]:
                assert target in chowned, f"{name}: volume {source} on {target}, not owned by the service user"


def test_dockerignore_keeps_secrets_and_state_out_of_the_image():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    for pattern in (".git", ".venv", "runs", "certs", "keys", "deploy", "data", "**/*.key", "**/*.secret", "**/*.env"):
        assert pattern in patterns, pattern
    for needed in ("pyproject.toml", "README.md", "fedseek"):  # pip install . and the Flower app
        assert needed not in patterns


@needs_compose
def test_commands_parse_with_the_fedseek_cli():
    """Each `fedseek ...` command line of the compose file is accepted by the CLI's parser."""
    deploy_cli = pytest.importorskip("fedseek.platform.cli.deploy",
                                     reason="fedseek.platform.cli.deploy not in this checkout yet")
    import click
    import typer

    from fedseek.platform.cli.main import app

    del deploy_cli
    root = typer.main.get_command(app)
    services = {**active("coordinator"), **active("institution")}
    lines = {name: svc["command"] for name, svc in services.items() if "entrypoint" not in svc and "command" in svc}
    lines["launcher"] = services["launcher"]["command"][1:]
    for name, argv in lines.items():
        command, args, ctx = root, list(argv), None
        while isinstance(command, click.Group) and args and not args[0].startswith("-"):
            ctx = click.Context(command, info_name=command.name, parent=ctx)
            sub = command.get_command(ctx, args[0])
            assert sub is not None, f"{name}: unknown command {args[0]!r} in {argv}"
            command, args = sub, args[1:]
        try:
            command.make_context(command.name, args, parent=ctx)
        except click.exceptions.Exit:  # --help
            pass
        except click.UsageError as err:
            pytest.fail(f"{name}: fedseek {' '.join(argv)}: {err.format_message()}")
