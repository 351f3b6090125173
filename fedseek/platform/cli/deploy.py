"""`fedseek deploy …`: the commands the docker-compose services run (and the deployment tests run
as plain processes on loopback). Long-running services replace this process with the Flower
binary (signals, exit codes and logs are Flower's own)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer

from fedseek.config import DataSettings, FederationSettings, LoraSettings, OptimSettings, PrivacySettings
from fedseek.platform.cli.common import console, fail

deploy_app = typer.Typer(help="Real deployment: TLS certificates, SuperNode keys, SuperLink / SuperNode / "
                              "ServerApp / ClientApp services, registration and job launch.",
                         no_args_is_help=True)
FEDERATION = "fedseek"
CONTROL_PORT = 9093  # the SuperLink's control listener (Control + Runtime APIs), never published
CONTROL = f"superlink:{CONTROL_PORT}"


def _exec(command: list[str], extra_env: dict[str, str] | None = None) -> None:
    """Replace this process with `command` (the Flower binaries find their helpers on PATH)."""
    env = {**os.environ, **(extra_env or {})}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    console.print("exec: " + " ".join([Path(command[0]).name] + command[1:]), highlight=False)
    sys.stdout.flush()
    os.execvpe(command[0], command, env)


def _required(**values: str) -> None:
    """Compose passes unset variables as empty strings: name them instead of failing later."""
    empty = [name.replace("_", "-") for name, value in values.items() if not str(value or "").strip()]
    if empty:
        fail("empty " + ", ".join(f"--{name}" for name in empty) + " (is it set in the env file?)")


def _refuse_placeholder_password() -> None:
    """The coordinator's processes refuse a platform DB password left at an example value."""
    from fedseek.platform.deploy.stack import placeholder_password

    if placeholder_password(os.environ.get("FEDSEEK_DB_URL")):
        fail("FEDSEEK_DB_URL carries an empty or example password (POSTGRES_PASSWORD in the env file): "
              "set a random one (openssl rand -hex 24)")


def _checked(parse, value):
    """`parse(value)`, with a ValueError shown as a clear error (exit 2)."""
    try:
        return parse(value)
    except ValueError as err:
        fail(str(err))


def _existing(path: Path, what: str) -> Path:
    if not Path(path).is_file():
        fail(f"{what} {path}: no such file")
    return Path(path)


@deploy_app.command()
def certs(out: Path = typer.Option(Path("certs"), help="Directory for ca.crt, server.crt/.key, superexec.secret."),
          host: list[str] = typer.Option(..., help="Name or IP the server is reached at (repeat)."),
          organisation: str = typer.Option("FedSeek federation", help="Organisation in the CA's name.")) -> None:
    """Create a CA (kept if present) and a TLS server certificate for the given hosts."""
    from fedseek.platform.deploy.stack import write_certs

    paths = write_certs(out, host, organisation)
    console.print(f"CA {paths.ca} (give it to every institution), server certificate {paths.server} "
                  f"for {', '.join(host)}; keep {paths.ca_key} offline")


@deploy_app.command()
def keys(out: Path = typer.Option(Path("keys"), help="Directory for NAME.key and NAME.pub."),
         institution: str = typer.Option(..., help="Institution name (as it reports itself).")) -> None:
    """Create an institution's SuperNode authentication key pair (EC P-384, OpenSSH)."""
    from fedseek.platform.deploy.stack import write_node_keys

    try:
        private, public = write_node_keys(out, institution)
    except (FileExistsError, ValueError) as err:
        fail(str(err))
    console.print(f"private key {private} (stays at {institution}); send {public} to the coordinator")


@deploy_app.command()
def superlink(certs: Path = typer.Option(Path("certs"), help="Directory made by `fedseek deploy certs`."),
              state: Path = typer.Option(Path("state"), help="Directory for the SuperLink's database."),
              host: str = typer.Option("0.0.0.0", help="Interface of the published Fleet listener (SuperNodes)."),
              port: int = typer.Option(8000, help="The published HTTPS port: the Fleet API only."),
              control_host: str = typer.Option("127.0.0.1", help="Interface of the control listener (Control + "
                                               "Runtime APIs): loopback or the coordinator's internal network."),
              control_port: int = typer.Option(CONTROL_PORT, help="Port of the control listener; never publish it.")) -> None:
    """Run the SuperLink: TLS, SuperNode authentication, ServerApp in a separate process, the
    Control API on its own unpublished listener."""
    from fedseek.platform.deploy.stack import CertPaths, superlink_command

    paths = CertPaths.in_dir(certs)
    for path, what in ((paths.ca, "CA"), (paths.server, "certificate"), (paths.server_key, "key")):
        _existing(path, what)
    state.mkdir(parents=True, exist_ok=True)
    try:
        command = superlink_command(certs, state, host, port, control_host, control_port)
    except ValueError as err:
        fail(str(err))
    _exec(command)


@deploy_app.command()
def serverapp(superlink: str = typer.Option(CONTROL, help="The SuperLink's control listener host:port (Runtime API)."),
              ca: Path = typer.Option(Path("certs/ca.crt"), help="CA certificate of the SuperLink."),
              secret: Path = typer.Option(None, help="SuperExec shared secret (certs/superexec.secret).")) -> None:
    """Run the process that executes ServerApps (needs FEDSEEK_DB_URL / FEDSEEK_MLFLOW_URI)."""
    from fedseek.platform.deploy.stack import superexec_command

    _refuse_placeholder_password()
    _exec(superexec_command(superlink, _existing(ca, "CA"), secret))


@deploy_app.command()
def register(superlink: str = typer.Option(CONTROL, help="The SuperLink's control listener host:port (not the published Fleet port)."),
             ca: Path = typer.Option(Path("certs/ca.crt"), help="CA certificate of the SuperLink."),
             institution: str = typer.Option(..., help="Institution name (as its SuperNode reports it)."),
             public_key: Path = typer.Option(..., help="The institution's NAME.pub."),
             epsilon_max: float = typer.Option(None, min=0.0, help="Lifetime privacy budget (default: the platform's).")) -> None:
    """Admit an institution: register its key at the SuperLink and bind the node id to its name."""
    _required(superlink=superlink, institution=institution)
    _refuse_placeholder_password()
    from fedseek.platform.store.db import session_scope
    from fedseek.platform.deploy.stack import write_flwr_config
    from fedseek.platform.deploy.flwr_cli import flwr_binary, json_field
    from fedseek.platform.store.nodes import NodeIdentityError, bind_node, public_key_sha256
    from fedseek.platform.store.settings import load_settings

    settings = load_settings()
    try:
        digest = public_key_sha256(_existing(public_key, "public key"))
    except ValueError as err:
        fail(str(err))
    with tempfile.TemporaryDirectory() as home:
        write_flwr_config(Path(home), FEDERATION, superlink, _existing(ca, "CA"))
        proc = subprocess.run([flwr_binary(), "supernode", "register", str(public_key), FEDERATION, "--name", institution,
                               "--format", "json"], env={**os.environ, "FLWR_HOME": home},
                              capture_output=True, text=True, timeout=120)
    node_id = json_field(proc.stdout, "node-id")
    if proc.returncode or node_id is None:
        fail(f"SuperLink {superlink} refused the registration: {(proc.stdout + proc.stderr).strip()[-800:]}")
    try:
        with session_scope(settings.database_url) as session:
            row = bind_node(session, institution, int(node_id), digest, settings.default_epsilon_max)
            if epsilon_max is not None:
                row.epsilon_max = epsilon_max
    except NodeIdentityError as err:
        fail(str(err))
    console.print(f"{institution}: registered as node {node_id}")


@deploy_app.command()
def supernode(superlink: str = typer.Option("superlink:8000", help="The SuperLink's published Fleet address host:port."),
              ca: Path = typer.Option(Path("certs/ca.crt"), help="CA certificate of the SuperLink."),
              key: Path = typer.Option(..., help="This institution's private key (NAME.key)."),
              institution: str = typer.Option(..., help="This institution's registered name."),
              data: Path = typer.Option(..., help="This institution's records (CSV/JSONL); never leaves the site."),
              host: str = typer.Option("127.0.0.1", help="Interface of the SuperNode's Runtime API (for its ClientApp)."),
              port: int = typer.Option(9094, help="Port of the SuperNode's Runtime API."),
              ray_address: str = typer.Option(None, help="Site Ray cluster for local training (e.g. ray://ray-head:10001 "
                                              "from a container that is not a Ray node, or 'local')."),
              num_gpus: float = typer.Option(0.0, min=0.0, help="GPUs reserved per training worker."),
              num_cpus: float = typer.Option(1.0, min=0.0, help="CPUs reserved per training worker."),
              local_certs: Path = typer.Option(None, help="The site's own certs (`fedseek deploy certs --host "
                                               "supernode`) for the SuperNode <-> ClientApp link: their directory, or a "
                                               "file-name prefix such as /run/secrets/site-; omit only on loopback."),
              max_wait_time: float = typer.Option(None, help="Give up connecting after this many seconds."),
              policy: str = typer.Option("", help="This site's privacy policy, 'key=value' pairs separated by "
                                         "spaces, e.g. 'epsilon-budget=6 max-job-epsilon=4 min-noise-multiplier=0.8' "
                                         "(keys: fedseek.clients.site_policy.SitePolicy; enforced by the ClientApp "
                                         "whatever the coordinator asks)."),
              state_dir: Path = typer.Option(None, help="Durable directory of the site's own privacy history "
                                             "(must survive restarts; shared with the Ray worker) "
                                             "[default: $FEDSEEK_HOME/site].")) -> None:
    """Run this institution's SuperNode (TLS to the SuperLink, authenticated by its key)."""
    _required(superlink=superlink, institution=institution)
    from fedseek.platform.deploy.stack import CertPaths, site_policy_config, supernode_command

    _existing(data, "data file")
    if state_dir is None:
        from fedseek.platform.store.settings import PlatformSettings

        state_dir = PlatformSettings().home_dir / "site"
    config = {"institution": institution, "data-path": str(Path(data).resolve()), "ray-address": ray_address,
              "num-gpus": num_gpus, "num-cpus": num_cpus, "state-dir": str(state_dir.expanduser()),
              **_checked(site_policy_config, policy)}
    secret = CertPaths.in_dir(local_certs).secret if local_certs else None
    _exec(supernode_command(superlink, _existing(ca, "CA"), _existing(key, "private key"), config, host, port,
                            secret=secret if secret and secret.exists() else None, local_certs=local_certs,
                            max_wait_time=max_wait_time))


@deploy_app.command()
def clientapp(supernode: str = typer.Option("supernode:9094", help="The SuperNode's Runtime API host:port."),
              local_certs: Path = typer.Option(None, help="The site's certs given to the SuperNode (directory or prefix).")) -> None:
    """Run the process that executes this institution's ClientApps."""
    from fedseek.platform.deploy.stack import CertPaths, superexec_command

    paths = CertPaths.in_dir(local_certs) if local_certs else None
    _exec(superexec_command(supernode, paths.ca if paths else None,
                            paths.secret if paths and paths.secret.exists() else None))


@deploy_app.command()
def run(superlink: str = typer.Option(CONTROL, help="The SuperLink's control listener host:port (not the published Fleet port)."),
        ca: Path = typer.Option(Path("certs/ca.crt"), help="CA certificate of the SuperLink."),
        institutions: int = typer.Option(FederationSettings.institutions, min=1, help="Institutions that must take part."),
        task: str = typer.Option(DataSettings.task, help="Task: its label set and the coordinator's test set."),
        test_data: Path = typer.Option(None, help="Coordinator-side test file (labels define the label set)."),
        rounds: int = typer.Option(FederationSettings.rounds, min=1, help="Federated rounds."),
        local_steps: int = typer.Option(OptimSettings.local_steps, min=1, help="DP-SGD steps per institution per round."),
        epsilon: float = typer.Option(PrivacySettings.target_epsilon, min=0.01, help="Privacy budget per institution for this job."),
        no_dp: bool = typer.Option(False, "--no-dp", help="Train without differential privacy."),
        lora_rank: int = typer.Option(LoraSettings.rank, min=1, help="LoRA rank r."),
        out: str = typer.Option(None, help="Output directory on the ServerApp host (default runs/deploy/<UTC time>)."),
        set_: list[str] = typer.Option([], "--set", help="Any other job setting, section.field=value (repeat)."),
        app_dir: Path = typer.Option(None, help="The FedSeek project directory to run (default: this installation's)."),
        census_timeout: float = typer.Option(300.0, help="Seconds to wait for the institutions to connect."),
        min_institutions: int = typer.Option(FederationSettings.min_institutions, min=0, help="The job starts with at least this many institutions "
                                             "if the others do not answer the census in time, and rounds go on "
                                             "with at least this many updates when others drop out (0 = all)."),
        round_timeout: float = typer.Option(FederationSettings.round_timeout, min=1.0, help="Seconds a round waits for replies."),
        rejoin_wait: float = typer.Option(FederationSettings.rejoin_wait, min=0.0, help="With --min-institutions: seconds a round's start "
                                          "waits for offline institutions to reconnect."),
        resume: int = typer.Option(0, min=0, help="Resume this interrupted platform job from its last committed "
                                   "round (its settings come from the platform DB; job options here are ignored)."),
        track: bool = typer.Option(True, "--track/--no-track", help="Record in the platform DB, ledger and MLflow.")) -> None:
    """Launch a federated DP-LoRA job on the deployed federation (`flwr run` of this project)."""
    from fedseek.clients.recipe import apply_generative_rule
    from fedseek.config import JobConfig
    from fedseek.platform.deploy.stack import write_flwr_config
    from fedseek.platform.deploy.flwr_cli import app_directory, flwr_binary, run_status, stream_output

    _refuse_placeholder_password()
    job = JobConfig()
    job.data.task, job.data.test_data = task, str(test_data) if test_data else None
    job.federation.institutions, job.federation.rounds = institutions, rounds
    job.federation.out = out or time.strftime("runs/deploy/%Y%m%dT%H%M%SZ", time.gmtime())
    job.optim.local_steps, job.lora.rank, job.lora.alpha = local_steps, lora_rank, 2.0 * lora_rank
    job.privacy.enabled, job.privacy.target_epsilon = not no_dp, epsilon
    job.federation.min_institutions, job.federation.round_timeout = min_institutions, round_timeout
    job.federation.rejoin_wait = rejoin_wait
    apply_generative_rule(job)  # a generative task's lengths (before --set, which wins)
    flat = _checked(job.with_overrides, set_).to_flat()
    if resume and not track:
        fail("--resume continues a platform job: it cannot be combined with --no-track")
    directory = app_dir or app_directory()
    with tempfile.TemporaryDirectory() as home:
        write_flwr_config(Path(home), FEDERATION, superlink, _existing(ca, "CA"))
        run_config = Path(home) / "run.toml"
        run_config.write_text(f"job = {json.dumps(json.dumps(flat))}\nplatform-track = {str(track).lower()}\n"
                              f"census-timeout = {census_timeout}\nresume-job = {resume}\n")
        env = {**os.environ, "FLWR_HOME": home}
        returncode, run_id = stream_output([flwr_binary(), "run", str(directory), FEDERATION, "--run-config",
                                            str(run_config), "--stream"], env)
        status = run_status(run_id, env, FEDERATION) if run_id else None
    if returncode or status != "finished:completed":  # `flwr run` exits 0 even when the ServerApp failed
        fail(f"the federated job failed (flwr run exit {returncode}, run {run_id} status {status}); "
              "see the ServerApp log above", returncode or 1)
    console.print(f"job finished; report and adapter in {job.federation.out} on the ServerApp host")


def register_commands(app: typer.Typer) -> None:
    app.add_typer(deploy_app, name="deploy")
