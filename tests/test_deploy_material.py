"""TLS material, SuperNode keys and the Flower command lines `fedseek deploy` builds (pure, no
servers: the processes themselves are exercised in test_deployment.py)."""
from __future__ import annotations

import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedseek.platform.deploy.stack import (CertPaths, certificate_hosts, superlink_command, supernode_command,
                                     write_certs, write_flwr_config, write_node_keys)
from fedseek.platform.store.nodes import public_key_sha256


def test_server_certificate_is_signed_by_the_ca_for_the_given_hosts_and_keys_are_private(tmp_path):
    paths = write_certs(tmp_path, ["coordinator.example.org", "10.0.0.5"])
    assert certificate_hosts(paths.server) == ["coordinator.example.org", "10.0.0.5"]
    ca = x509.load_pem_x509_certificate(paths.ca.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server.read_bytes())
    server.verify_directly_issued_by(ca)
    for secret in (paths.ca_key, paths.server_key, paths.secret):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    again = write_certs(tmp_path, ["superlink"])  # a new host keeps the CA institutions trust
    assert again.ca.read_bytes() == paths.ca.read_bytes()
    x509.load_pem_x509_certificate(again.server.read_bytes()).verify_directly_issued_by(ca)
    with pytest.raises(ValueError, match="--host"):
        write_certs(tmp_path / "none", [])


def test_node_keys_are_p384_openssh_and_never_overwritten(tmp_path):
    private, public = write_node_keys(tmp_path, "hospital_a")
    key = load_ssh_public_key(public.read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    assert load_ssh_private_key(private.read_bytes(), None).public_key().public_numbers() == key.public_numbers()
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    digest = public_key_sha256(public)
    public.write_text(public.read_text().replace("fedseek-hospital_a", "renamed"))
    assert public_key_sha256(public) == digest  # the comment is not the key
    with pytest.raises(FileExistsError):
        write_node_keys(tmp_path, "hospital_a")
    with pytest.raises(ValueError, match="letters"):
        write_node_keys(tmp_path, "../etc")


def test_commands_enable_tls_node_auth_and_no_runtime_installs(tmp_path):
    write_certs(tmp_path / "certs", ["localhost"])
    link = superlink_command(tmp_path / "certs", tmp_path / "state", "127.0.0.1", 9000)
    for flag in ("--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation", "--superexec-auth-secret-file"):
        assert flag in link
    assert "--insecure" not in link
    node = supernode_command("link:9000", tmp_path / "certs/ca.crt", tmp_path / "k.key",
                             {"institution": 'a "b"', "data-path": "/d.csv", "ray-address": None, "num-gpus": 1.0},
                             local_certs=tmp_path / "certs")
    assert node[node.index("--node-config") + 1] == 'institution="a \\"b\\"" data-path="/d.csv" num-gpus=1.0'
    assert "--insecure" not in node and "--ssl-certfile" in node and "--auth-supernode-private-key" in node
    prefix = CertPaths.in_dir(tmp_path / "secrets" / "site-")  # compose secrets: /run/secrets/site-*
    assert prefix.ca == tmp_path / "secrets" / "site-ca.crt"


def test_flwr_config_keeps_other_federations(tmp_path):
    write_flwr_config(tmp_path, "one", "a:8000", tmp_path / "ca.crt")
    path = write_flwr_config(tmp_path, "two", "b:8000", tmp_path / "ca.crt")
    import tomllib

    config = tomllib.loads(path.read_text())
    assert config["superlink"]["default"] == "two"
    assert config["superlink"]["one"]["address"] == "a:8000" and "insecure" not in config["superlink"]["two"]


def test_a_node_may_only_report_the_institution_its_key_was_registered_as(tmp_path):
    from fedseek.platform.store.db import session_scope
    from fedseek.platform.store.nodes import NodeIdentityError, bind_node, verify_node_identities

    url = f"sqlite:///{tmp_path / 'platform.db'}"
    with session_scope(url) as session:
        bind_node(session, "hospital_a", 111, "a" * 64, 8.0)
        bind_node(session, "hospital_b", 222, "b" * 64, 8.0)
    verify_node_identities(url, {"hospital_a": 111, "hospital_b": 222})
    with pytest.raises(NodeIdentityError, match="registered as node 111"):
        verify_node_identities(url, {"hospital_a": 222})  # hospital_b's node claiming hospital_a
    with pytest.raises(NodeIdentityError, match="not registered"):
        verify_node_identities(url, {"hospital_c": 333})
    with pytest.raises(NodeIdentityError, match="already bound"), session_scope(url) as session:
        bind_node(session, "hospital_c", 111, "c" * 64, 8.0)


def test_a_census_short_of_institutions_names_the_registered_ones_not_connected(tmp_path):
    """`deploy run`'s census error tells the operator which SuperNodes to check: the registered
    institutions whose node is not online (a real SQLite platform DB). The grid is a stand-in for
    Flower's Grid that reports one of three registered nodes online: a real short census needs a
    federation with a node down and waits out the census timeout (minutes on the suite's critical
    worker); `test_client_faults.py` runs that path on real processes with `--min-institutions`."""
    from fedseek.aggregator.server_app import CensusError
    from fedseek.config import JobConfig
    from fedseek.platform.run.jobs import run_deployed
    from fedseek.platform.store.db import session_scope
    from fedseek.platform.store.nodes import bind_node
    from fedseek.platform.store.settings import PlatformSettings

    class OneNodeGrid:
        def get_node_ids(self):
            return [111]

    settings = PlatformSettings(db_url=f"sqlite:///{tmp_path / 'platform.db'}", home=tmp_path)
    with session_scope(settings.database_url) as session:
        for name, node in (("hospital_a", 111), ("hospital_b", 222), ("hospital_c", 333)):
            bind_node(session, name, node, name[-1] * 64, 8.0)
    job = JobConfig()
    job.federation.institutions = 3
    with pytest.raises(CensusError, match=r"1 of 3 institutions connected.*registered but not connected: "
                                          r"hospital_b \(node 222\), hospital_c \(node 333\)$"):
        run_deployed(OneNodeGrid(), job, census_timeout=0.1, settings=settings)


def test_coordinator_commands_refuse_an_example_db_password(tmp_path):
    from typer.testing import CliRunner

    from fedseek.platform.deploy.stack import placeholder_password
    from fedseek.platform.cli.deploy import deploy_app

    for password in ("change-me-openssl-rand-hex-24", "", "Postgres", "my-placeholder-pw"):
        assert placeholder_password(f"postgresql+psycopg://fedseek:{password}@postgres:5432/fedseek"), password
    assert not placeholder_password("postgresql+psycopg://fedseek:3f9c2a7be41d08c5a6e2f7d9@postgres:5432/fedseek")
    assert not placeholder_password(f"sqlite:///{tmp_path}/platform.db") and not placeholder_password(None)
    url = "postgresql+psycopg://fedseek:change-me-openssl-rand-hex-24@postgres:5432/fedseek"
    for argv in (["serverapp", "--ca", "none.crt"], ["run", "--ca", "none.crt"],
                 ["register", "--institution", "a", "--public-key", "none.pub"]):
        result = CliRunner().invoke(deploy_app, argv, env={"FEDSEEK_DB_URL": url})
        assert result.exit_code == 2 and "example password" in result.output, (argv, result.output)
