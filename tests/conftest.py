"""Shared fixtures: tiny random checkpoints of every supported architecture, saved to disk."""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# platform state of every job the tests run (and of their subprocesses) goes to a throw-away home,
# never ~/.fedseek; tests that check budgets set their own
os.environ.setdefault("FEDSEEK_HOME", tempfile.mkdtemp(prefix="fedseek-test-home-"))
if os.environ.get("PYTEST_XDIST_WORKER"):  # parallel workers inherit the controller's home: one each
    os.environ["FEDSEEK_HOME"] = os.path.join(os.environ["FEDSEEK_HOME"], os.environ["PYTEST_XDIST_WORKER"])
os.environ.setdefault("FEDSEEK_DEFAULT_EPSILON_MAX", "1000000")

ARCHITECTURES = ("deepseek_v2", "deepseek_v3", "qwen2", "llama")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    from fedseek.models.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: str(save_tiny_checkpoint(arch, root / arch)) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def banking():
    from fedseek.data.tasks import load_federated_data

    return load_federated_data("banking77", institutions=3, seed=0)


# --- real servers for the platform tests (MLflow, PostgreSQL), started on free loopback ports ---


from fedseek.platform.deploy.local import free_port  # noqa: E402,F401  (one free-port helper)


@contextlib.contextmanager
def sqlite_federation(root, sites=("bank_a", "bank_b", "bank_c"), rows: int = 160, mlflow_server: bool = False,
                      extra_keys: tuple[str, ...] = ()):
    """A started `LocalFederation` of `sites` with a SQLite platform DB and MLflow's SQLite store
    under `root` (`mlflow_server`: behind a real `mlflow server`); stopped (every process) when
    the block ends."""
    from fedseek.platform.deploy.local import LocalFederation, write_demo_sites

    mlflow_port = free_port()
    tracking = f"http://127.0.0.1:{mlflow_port}" if mlflow_server else f"sqlite:///{root / 'mlflow.db'}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FEDSEEK_HOME": str(root / "home"),
           "FEDSEEK_DB_URL": f"sqlite:///{root / 'platform.db'}", "FEDSEEK_DEFAULT_EPSILON_MAX": "20",
           "FEDSEEK_MLFLOW_URI": tracking, "FEDSEEK_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    federation, mlflow = LocalFederation(root, env), None
    try:
        if mlflow_server:
            mlflow = start_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", str(root / "mlartifacts"), mlflow_port)
        federation.start(write_demo_sites(root, tuple(sites), rows), extra_keys=extra_keys)
        yield federation
    finally:
        federation.stop()
        if mlflow is not None:
            stop(mlflow)


_SHARED: dict[str, object] = {}


@pytest.fixture(scope="module")
def deployment(request, tmp_path_factory):
    """One federation (bank_a/b/c, 160 records each, a key `rogue` never registered, a real MLflow
    server) for every module that uses this fixture: started by the first, stopped after the last
    one in this session's order (an idle federation would advertise its Ray head to other tests).
    Its platform DB and site privacy histories accumulate across those modules' jobs: query by job
    id; each site's lifetime budget (10) covers their jobs (ε ≤ 4 each, two jobs)."""
    def close() -> None:
        if "stack" in _SHARED:
            _SHARED.pop("federation", None)
            _SHARED.pop("stack").close()

    if "federation" not in _SHARED:
        _SHARED["stack"] = contextlib.ExitStack()
        request.config.add_cleanup(close)  # a safety net: pytest's end
        _SHARED["federation"] = _SHARED["stack"].enter_context(sqlite_federation(
            tmp_path_factory.mktemp("deployment"), mlflow_server=True, extra_keys=("rogue",)))
    federation = _SHARED["federation"]
    for name in [name for name in federation.named if name.startswith("supernode-")]:
        federation.wait_connected(name)  # one that died since an earlier module is started again
    try:
        yield federation
    finally:
        items = request.session.items
        last = max(i for i, item in enumerate(items) if item.module is request.module)
        if not any("deployment" in item.fixturenames for item in items[last + 1:]):
            close()


def wait_for_http(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:4]} exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def start_mlflow_server(backend: str, artifacts: str, port: int) -> subprocess.Popen:
    """A real `mlflow server` (tracking + registry + UI) on 127.0.0.1:port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination",
         artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    wait_for_http(f"http://127.0.0.1:{port}/health", process)
    return process


def stop(process: subprocess.Popen) -> None:
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def postgres_url():
    """A throw-away PostgreSQL cluster (Debian `postgresql` package) on a free loopback port.
    It refuses to run as root, so as root it runs as the `postgres` user."""
    import pwd

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        pytest.skip("PostgreSQL server binaries not installed (Debian package `postgresql`; "
                    "scripts/setup.sh installs it where apt-get is available)")
    bindir = os.path.dirname(bins[-1])
    as_user: list[str] = []
    data = tempfile.mkdtemp(prefix="fedseek-pg-")
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(data, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    run(f"{bindir}/initdb", "-D", f"{data}/db", "-A", "trust", "-U", "fedseek", "--no-sync")
    run(f"{bindir}/pg_ctl", "-D", f"{data}/db", "-w", "-l", f"{data}/log", "-o",
        f"-p {port} -h 127.0.0.1 -k {data} -F", "start")
    try:
        run(f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "fedseek", "fedseek")
        yield f"postgresql+psycopg://fedseek@127.0.0.1:{port}/fedseek"
    finally:
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", f"{data}/db", "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """Every platform-DB test runs on SQLite and on a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fedseek.db'}"
    url = request.getfixturevalue("postgres_url")
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as connection:  # a clean schema for every test
        connection.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    return url


# --- parallel runs (pytest-xdist, `scripts/test.sh` runs `-n 3 --dist loadgroup`) ---

FEDERATION_GROUP = "federation"  # modules that start a LocalFederation: one at a time, on one worker


@pytest.hookimpl(wrapper=True)  # the marks are set before any other plugin's hook (xdist's reads them)
def pytest_collection_modifyitems(config, items):
    """Each module's tests run on one worker (they share module-scoped real servers and jobs); the
    modules marked `xdist_group("federation")` share one worker and run one after another: each
    `LocalFederation` starts a Ray head on Ray's default side ports, and `deployment` is one
    federation shared by several modules."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    return (yield)
