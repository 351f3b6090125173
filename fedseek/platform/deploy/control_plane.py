"""Flower 1.41's SuperLink with the Control API off the published port.

`flower-superlink` 1.41 serves the Fleet API (SuperNodes), the Control API (`flwr run`, `flwr
supernode register`, `flwr stop`, ...) and the Runtime API on ONE HTTP port; the open-source
build has no Control API authentication (account auth is OIDC, a Flower Enterprise plugin:
`FLWR_OIDC_ENABLED=1` exits with "unavailable in this Flower distribution"), and its separate
`--control-api-address`/`--fleet-api-address` are deprecated and ignored for HTTP. So this runs
Flower's own SuperLink application (its argument parser, `create_app` and lifespan, unchanged) on
two listeners of one uvicorn server:

- the *control* listener (Flower's `--host/--port`): every API, for the operator's `flwr`, the
  ServerApp's SuperExec and the coordinator's containers; bound to loopback or an internal network;
- the *fleet* listener (`--fleet-host/--fleet-port`): the published port. Requests that arrive on
  it reach only `/v1/fleet/*`; anything else is answered 403 before Flower sees it.

    python -m fedseek.platform.deploy.control_plane --fleet-host 0.0.0.0 --fleet-port 8000 \
        <flower-superlink arguments, with --host/--port of the control listener>
"""
from __future__ import annotations

import argparse
import json
import socket
import sys

FLEET_PREFIX = "/v1/fleet/"
REFUSAL = ("This port serves only the Fleet API (SuperNodes). The Control and Runtime APIs are "
           "reachable from the coordinator's internal network only.")


class FleetOnlyGate:
    """ASGI wrapper: HTTP requests that arrive on one of `fleet_ports` reach only the Fleet API
    routes (`/v1/fleet/...`); others get 403. Requests on any other listener pass unchanged."""

    def __init__(self, app, fleet_ports: set[int]):
        self.app, self.fleet_ports = app, set(fleet_ports)

    def allowed(self, scope) -> bool:
        server = scope.get("server") or (None, None)
        return server[1] not in self.fleet_ports or scope.get("path", "").startswith(FLEET_PREFIX)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket" and not self.allowed(scope):
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] == "http" and not self.allowed(scope):
            body = json.dumps({"detail": REFUSAL}).encode()
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def listening_socket(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--fleet-host", required=True, help="Interface of the published Fleet-only listener.")
    parser.add_argument("--fleet-port", required=True, type=int, help="Port of the published Fleet-only listener.")
    ours, flower_args = parser.parse_known_args(argv if argv is not None else sys.argv[1:])

    import importlib

    import uvicorn
    from flwr.superlink.main import create_app

    flower = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the module, not its function

    sys.argv = ["flower-superlink", *flower_args]  # Flower's parser reads sys.argv
    config = flower._parse_superlink_lifespan_config()  # pylint: disable=protected-access
    if ours.fleet_port == config.port:
        sys.exit(f"--fleet-port {ours.fleet_port} is also the control listener's --port: give them different ports")
    if config.certificates is None:
        sys.exit("the published Fleet listener needs TLS: give --ssl-certfile/--ssl-keyfile/--ssl-ca-certfile")
    app = FleetOnlyGate(create_app(config, flower.SuperLinkLifespan), {ours.fleet_port})
    server = uvicorn.Server(uvicorn.Config(
        app, ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile, workers=1, access_log=True,
        log_config=flower.get_uvicorn_log_config(flower.console_handler.level)))
    sockets = [listening_socket(config.host, config.port), listening_socket(ours.fleet_host, ours.fleet_port)]
    flower.log(flower.INFO, "SuperLink: Control + Runtime + Fleet APIs on %s:%s; Fleet API only on %s:%s",
               config.host, config.port, ours.fleet_host, ours.fleet_port)
    server.run(sockets=sockets)


if __name__ == "__main__":
    main()
