"""Real Flower deployment: TLS material, SuperNode authentication keys and the exact commands the
docker-compose services (and the deployment tests) run.

- `write_certs`: a private CA and a SuperLink server certificate whose SANs are the names the
  institutions and SuperExecs dial (TLS on every link), plus the SuperExec shared secret.
- `write_node_keys`: an institution's SuperNode key pair (EC P-384, OpenSSH format, as Flower
  requires); only the public key leaves the institution, to be registered at the SuperLink.
- `*_command`: argv of the SuperLink (Flower's, with the Control API on its own unpublished
  listener: `control_plane`), `flower-supernode` and `flower-superexec` (Flower's, through
  `launch`: shorter polls while busy, task processes started ahead) with TLS, node
  authentication, process isolation and no runtime dependency installation.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_DAYS = 825  # server certificates (browsers' and many TLS stacks' maximum)
CA_DAYS = 3650


@dataclass(frozen=True)
class CertPaths:
    ca: Path
    ca_key: Path
    server: Path
    server_key: Path
    secret: Path

    @classmethod
    def in_dir(cls, directory: Path) -> "CertPaths":
        """The files `write_certs` made in `directory`; a path that is not a directory is a file-name
        prefix (e.g. `/run/secrets/site-` for `/run/secrets/site-ca.crt`, as compose secrets)."""
        d = Path(directory)
        if not d.is_dir() and str(directory).endswith(("-", "_", ".")):
            name = lambda file: d.parent / (d.name + file)  # noqa: E731
            return cls(name("ca.crt"), name("ca.key"), name("server.crt"), name("server.key"), name("superexec.secret"))
        return cls(d / "ca.crt", d / "ca.key", d / "server.crt", d / "server.key", d / "superexec.secret")


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (created 0600, never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def write_certs(directory: Path, hosts: list[str], organisation: str = "FedSeek federation") -> CertPaths:
    """A new CA (reused if `ca.crt`/`ca.key` exist, so adding a host keeps institutions' trust)
    and a server certificate for `hosts`; returns the paths."""
    if not hosts:
        raise ValueError("give at least one --host: the name(s) institutions use to reach the SuperLink")
    paths = CertPaths.in_dir(directory)
    now = dt.datetime.now(dt.timezone.utc)
    if paths.ca.exists() and paths.ca_key.exists():
        ca_cert = x509.load_pem_x509_certificate(paths.ca.read_bytes())
        ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    else:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"{organisation} CA")])
        ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=CA_DAYS))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                  critical=True)
                   .sign(ca_key, hashes.SHA384()))
        _write_private(paths.ca_key, _pem_key(ca_key))
        paths.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
                   .issuer_name(ca_cert.subject).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
                   .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA384()))
    _write_private(paths.server_key, _pem_key(server_key))
    paths.server.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    if not paths.secret.exists():
        _write_private(paths.secret, secrets.token_hex(32).encode())
    return paths


def certificate_hosts(path: Path) -> list[str]:
    """The SAN host names/addresses of a certificate (to check what a server cert covers)."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in sans.get_values_for_type(x509.DNSName)] + \
        [str(v) for v in sans.get_values_for_type(x509.IPAddress)]


def write_node_keys(directory: Path, institution: str) -> tuple[Path, Path]:
    """(private, public) SuperNode authentication keys of `institution`; refuses to overwrite an
    existing private key (its public key may already be registered)."""
    if not institution.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"institution name {institution!r}: use letters, digits, '_' and '-' only")
    private, public = Path(directory) / f"{institution}.key", Path(directory) / f"{institution}.pub"
    if private.exists():
        raise FileExistsError(f"{private} exists; remove it first to rotate the key (then re-register)")
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH)
                       + f" fedseek-{institution}\n".encode())
    return private, public


# example values of a DB password that must never run (the postgres service of docker-compose.yml
# refuses the same ones)
PLACEHOLDER_PASSWORDS = ("change-me*", "*placeholder*", "password", "postgres", "fedseek")


def placeholder_password(database_url: str | None) -> bool:
    """Whether a database URL carries an empty or example password (URLs without one: False)."""
    import fnmatch

    from sqlalchemy.engine import make_url

    if not database_url or "://" not in database_url:
        return False
    password = make_url(database_url).password
    if password is None:
        return False
    return password == "" or any(fnmatch.fnmatchcase(password.lower(), p) for p in PLACEHOLDER_PASSWORDS)


def flower_command(name: str) -> list[str]:
    """Flower's `flower-supernode` / `flower-superexec` through `fedseek.platform.deploy.launch`
    (same entry point and arguments; shorter polls while busy, task processes started ahead)."""
    return [sys.executable, "-m", "fedseek.platform.deploy.launch", name]


def superlink_command(certs: Path, state: Path, host: str = "0.0.0.0", port: int = 8000,
                      control_host: str = "127.0.0.1", control_port: int = 9093,
                      isolation: str = "process") -> list[str]:
    """Flower's SuperLink (fedseek.platform.deploy.control_plane): `host:port` is the published listener
    and serves the Fleet API only; `control_host:control_port` serves every API (Control for
    `flwr run`/`flwr supernode register`, Runtime for the ServerApp) and must not be published."""
    if int(port) == int(control_port):
        raise ValueError(f"the Fleet port and the control port are both {port}: the Control API must not "
                         "share the published port")
    paths = CertPaths.in_dir(certs)
    command = [sys.executable, "-m", "fedseek.platform.deploy.control_plane", "--fleet-host", host, "--fleet-port", str(port),
               "--ssl-ca-certfile", str(paths.ca), "--ssl-certfile", str(paths.server),
               "--ssl-keyfile", str(paths.server_key), "--enable-supernode-auth",
               "--database", str(Path(state) / "superlink.db"), "--isolation", isolation,
               "--disable-runtime-dependency-installation", "--host", control_host, "--port", str(control_port)]
    if paths.secret.exists():
        command += ["--superexec-auth-secret-file", str(paths.secret)]
    return command


def supernode_command(superlink: str, ca: Path, key: Path, node_config: dict[str, object],
                      host: str = "127.0.0.1", port: int = 9094, isolation: str = "process",
                      secret: Path | None = None, local_certs: Path | None = None,
                      max_wait_time: float | None = None) -> list[str]:
    """`local_certs`: the institution's own CA/server certificate (`write_certs`) for the link
    between its SuperNode and its ClientApp process (the SuperNode's Runtime API)."""
    config = " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items() if v is not None)
    command = [*flower_command("flower-supernode"), "--superlink", superlink, "--root-certificates", str(ca),
               "--auth-supernode-private-key", str(key), "--node-config", config,
               "--isolation", isolation, "--host", host, "--port", str(port)]
    if secret:
        command += ["--superexec-auth-secret-file", str(secret)]
    if local_certs:
        paths = CertPaths.in_dir(local_certs)
        command += ["--ssl-ca-certfile", str(paths.ca), "--ssl-certfile", str(paths.server),
                    "--ssl-keyfile", str(paths.server_key)]
    if max_wait_time:
        command += ["--max-wait-time", str(max_wait_time)]
    return command


def site_policy_config(text: str) -> dict[str, str]:
    """'key=value key=value' of a site's privacy policy -> node-config entries, checked now (a typo
    in a policy must stop the SuperNode, not silently leave a default in force)."""
    from fedseek.clients.site_policy import SitePolicy

    known = {f.replace("_", "-") for f in SitePolicy.__dataclass_fields__}
    config = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"--policy {item!r}: expected key=value with key one of {sorted(known)}")
        config[key] = value
    SitePolicy.from_node_config({"data-path": "-", **config})  # values parse
    return config


def superexec_command(runtime_api: str, ca: Path | None = None, secret: Path | None = None) -> list[str]:
    """The process that runs the ServerApp (against the SuperLink) or the ClientApps (against a
    SuperNode). Without `ca` the link is plaintext: only for a SuperNode's loopback/private link."""
    command = [*flower_command("flower-superexec"), "--runtime-api-address", runtime_api]
    command += ["--root-certificates", str(ca)] if ca else ["--insecure"]
    if secret:
        command += ["--superexec-auth-secret-file", str(secret)]
    return command


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_flwr_config(flwr_home: Path, name: str, address: str, ca: Path) -> Path:
    """`$FLWR_HOME/config.toml` naming the federation `name` (TLS with `ca`), for `flwr run` and
    `flwr supernode register`; other federations in the file are kept."""
    import tomllib

    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = tomllib.loads(path.read_text()) if path.exists() else {}
    links = {k: v for k, v in existing.get("superlink", {}).items() if isinstance(v, dict) and k != name}
    links[name] = {"address": address, "root-certificates": str(Path(ca).resolve())}
    lines = ["[superlink]", f'default = "{name}"', ""]
    for link, values in links.items():
        lines.append(f"[superlink.{link}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path
