"""CurveZMQ keys for a daemon reachable beyond this host (opt-in; loopback needs none).

A keys directory holds `server.key` / `server.key_secret` and, under `authorized_clients/`,
the public keys of the clients allowed in. `make_keys` creates a server and one client pair.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

AUTHORIZED = "authorized_clients"


def make_keys(directory: Path, client_name: str = "client") -> dict[str, Path]:
    """Create a server key pair and one client key pair, and authorise that client."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / AUTHORIZED).mkdir(exist_ok=True)
    server_public, server_secret = zmq.auth.create_certificates(directory, "server")
    client_public, client_secret = zmq.auth.create_certificates(directory, client_name)
    shutil.copy(client_public, directory / AUTHORIZED)
    return {
        "server_public": Path(server_public),
        "server_secret": Path(server_secret),
        "client_public": Path(client_public),
        "client_secret": Path(client_secret),
    }


def server_security(
    context: zmq.Context[zmq.Socket[bytes]], keys_dir: Path
) -> tuple[Callable[[zmq.Socket[bytes]], None], ThreadAuthenticator]:
    """A function that makes a socket a CURVE server, and the running authenticator that
    admits only the clients whose public keys are in `authorized_clients/`."""
    secret_file = keys_dir / "server.key_secret"
    if not secret_file.is_file():
        raise FileNotFoundError(
            f"{secret_file}: no server secret key; create keys with `livedecon keys {keys_dir}`"
        )
    public, secret = zmq.auth.load_certificate(secret_file)
    authorized = keys_dir / AUTHORIZED
    if not authorized.is_dir() or not any(authorized.glob("*.key")):
        raise FileNotFoundError(f"{authorized}: no authorised client keys (*.key)")
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=str(authorized))

    def secure(socket: zmq.Socket[bytes]) -> None:
        socket.curve_secretkey = secret
        socket.curve_publickey = public
        socket.curve_server = True

    return secure, authenticator


def client_security(
    server_public: Path, client_secret: Path
) -> Callable[[zmq.Socket[bytes]], None]:
    """A function that makes a socket a CURVE client of the server with that public key."""
    server_key, _ = zmq.auth.load_certificate(server_public)
    public, secret = zmq.auth.load_certificate(client_secret)
    if secret is None:
        raise ValueError(f"{client_secret}: not a secret key file")

    def secure(socket: zmq.Socket[bytes]) -> None:
        socket.curve_secretkey = secret
        socket.curve_publickey = public
        socket.curve_serverkey = server_key

    return secure
