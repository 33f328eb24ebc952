"""The local channel between a site's ClientApp and its worker: a Unix socket and a key.

A worker directory holds what both ends need:
    worker.key   32 random bytes (mode 0600), the `multiprocessing.connection` authkey: a
                 connection is accepted only after an HMAC challenge with it, in both
                 directions, so no other process (and no other user) can talk to the worker
    worker.sock  the socket (in the 0700 directory; when its path is longer than a Unix
                 socket address allows, a Linux abstract-namespace name derived from the
                 directory instead, still guarded by the key)
One request per connection: the ClientApp sends a dict, the worker answers a dict. This
module imports only the standard library: the adapter must not pay for JAX (under a plain
SuperNode, Flower starts a new ClientApp process for every message).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sys
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

KEY_FILE = "worker.key"
SOCKET_FILE = "worker.sock"
# sun_path is 108 bytes on Linux (104 on macOS), the terminating NUL included.
_MAX_SOCKET_PATH = 100


class WorkerUnavailable(RuntimeError):
    """Nothing answers at the worker directory (not started, or gone)."""


class WorkerDied(RuntimeError):
    """The worker closed the connection before answering (it crashed or was killed)."""


def address(directory: str | os.PathLike) -> str:
    """The socket address of the worker of `directory` (the same on both ends)."""
    directory = Path(directory).resolve()
    path = str(directory / SOCKET_FILE)
    if len(path.encode()) <= _MAX_SOCKET_PATH or not sys.platform.startswith("linux"):
        return path
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:32]
    return f"\0fedfms-worker-{digest}"


def create_key(directory: str | os.PathLike) -> bytes:
    """A fresh key in DIRECTORY/worker.key (the directory made private to this user)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    key = secrets.token_bytes(32)
    path = directory / KEY_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    os.replace(tmp, path)
    return key


def read_key(directory: str | os.PathLike) -> bytes:
    path = Path(directory) / KEY_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise WorkerUnavailable(f"no site worker at {directory} ({path} does not exist): "
                                "start the site with `python -m fedfms_jax.flower.node`") \
            from None


def listen(directory: str | os.PathLike) -> Listener:
    """The worker's end: a fresh key and a listening socket (a stale socket file of a
    previous worker is replaced)."""
    key = create_key(directory)
    where = address(directory)
    if not where.startswith("\0"):
        Path(where).unlink(missing_ok=True)
    return Listener(where, family="AF_UNIX", authkey=key)


def call(directory: str | os.PathLike, request: dict[str, Any],
         timeout: float | None = None) -> dict[str, Any]:
    """The ClientApp's end: sends `request` to the worker of `directory`, returns its reply.
    WorkerUnavailable when no worker listens there, WorkerDied when it closes the
    connection without an answer, TimeoutError after `timeout` seconds without one."""
    key = read_key(directory)
    try:
        connection = Client(address(directory), family="AF_UNIX", authkey=key)
    except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, EOFError,
            BrokenPipeError) as error:
        # Nothing sent yet: nobody listens, or the worker went away during the handshake.
        raise WorkerUnavailable(f"no site worker listens at {directory} "
                                f"({type(error).__name__}: {error})") from None
    except AuthenticationError:
        # A worker (re)starting in between writes a new key: the caller reads it again.
        raise WorkerUnavailable(f"the site worker at {directory} refused the key of "
                                f"{directory / KEY_FILE}") from None
    with connection:
        try:
            connection.send(request)
            if timeout is not None and not connection.poll(timeout):
                raise TimeoutError(f"the site worker at {directory} did not answer within "
                                   f"{timeout:.0f} s")
            return connection.recv()
        except (EOFError, ConnectionResetError, BrokenPipeError) as error:
            raise WorkerDied(f"the site worker at {directory} closed the connection before "
                             f"answering ({type(error).__name__}): it crashed or was "
                             "killed") from None


def answer(connection: Connection, handle) -> None:
    """The worker's side of one connection: reply `handle(request)`."""
    with connection:
        try:
            request = connection.recv()
        except EOFError:
            return
        connection.send(handle(request))
