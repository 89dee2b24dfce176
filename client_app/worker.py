"""A warm worker for one SuperNode's ClientApp: a long-lived process that keeps torch, the data and
the models loaded between messages.

In a deployment, Flower starts a fresh ClientApp process for every message. Without a worker,
each such process imports torch and transformers and loads its data and model again before it
can answer. With ``worker-socket = "<path>"`` in the SuperNode's ``--node-config``, the ClientApp
(``client_app.app``) hands the message to the worker listening on that Unix socket and returns
the worker's answer; its own process then imports only Flower. Start the worker next to the
SuperNode with ``fedmosaic client-worker --socket <path>`` (``fedmosaic local-deployment`` does).

The worker runs the same handlers (``client_app.handlers``) on the same state directory, so a
reply is what the ClientApp would have answered itself. When no worker answers on the socket, or
it runs other code than the ClientApp (a different app digest), the ClientApp logs why and
answers in its own process. A failure inside the worker is the message's failure, as it would
be in the ClientApp.

Wire format, one request per connection, each frame an 8-byte big-endian length then its bytes:

- request: a JSON header ``{"handler": "query" | "train", "code": <app digest>}``, then the
  Message and the Context in Flower's own protobuf serialisation;
- reply: a JSON header ``{"status": "ok"}`` then the reply's RecordDict (Flower's protobuf), or
  ``{"status": "error" | "code-mismatch", "error": <text>}``.

Nothing is unpickled. The socket is created with mode 0600 in a folder of mode 0700.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import struct
import time
import traceback
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

log = logging.getLogger("fedmosaic.client")

#: the node-config key that names the worker's socket
SOCKET_KEY = "worker-socket"
#: the packages a worker runs; their sources make the app digest
APP_PACKAGES = ("client_app", "drake_data", "fedmosaic_core", "fedmosaic_flower")
#: handlers a request may name (``client_app.handlers``)
HANDLERS = ("query", "train")
#: the largest frame either side accepts (a 1-3B model's same-architecture LoRA is tens of MB)
MAX_FRAME_BYTES = 4 << 30
#: how long a connected peer may take to send its request
REQUEST_TIMEOUT_S = 60.0
_LENGTH = struct.Struct(">Q")


class WorkerError(RuntimeError):
    """The worker took the message and failed (or the connection broke after the request)."""


@cache
def app_digest(root: Path) -> str:
    """SHA-256 over the relative paths and bytes of every ``.py`` file of :data:`APP_PACKAGES`
    under ``root``: the ClientApp's code from its FAB and the worker's must be the same."""
    digest = hashlib.sha256()
    for package in APP_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def own_app_root() -> Path:
    """The folder this process imports the app packages from (a FAB's copy in a ClientApp)."""
    return Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- frames
def _send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(data)))
    sock.sendall(data)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise ConnectionError(f"connection closed after {got} of {size} bytes")
        got += n
    return bytes(buffer)


def _recv_frame(sock: socket.socket) -> bytes:
    (size,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {size} bytes announced; the limit is {MAX_FRAME_BYTES}")
    return _recv_exact(sock, size)


def _recv_header(sock: socket.socket) -> dict[str, Any]:
    header = json.loads(_recv_frame(sock))
    if not isinstance(header, dict):
        raise ValueError(f"frame header is {type(header).__name__}, not a JSON object")
    return header


# ---------------------------------------------------------------------------- the ClientApp's side
def answer_with_worker(socket_path: Path, handler: str, msg: Message, context: Context) -> RecordDict | None:
    """The reply content the worker at ``socket_path`` computed for ``msg``, or None when no
    worker answers there or it runs other code (the reason is logged; answer in this process)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(str(socket_path))
        except OSError as err:
            log.warning("no ClientApp worker at %s (%s): answering %s in this process", socket_path, err, handler)
            return None
        try:
            _send_frame(sock, json.dumps({"handler": handler, "code": app_digest(own_app_root())}).encode())
            _send_frame(sock, message_to_proto(msg).SerializeToString())
            _send_frame(sock, context_to_proto(context).SerializeToString())
            header = _recv_header(sock)
            if header.get("status") == "ok":
                return recorddict_from_proto(ProtoRecordDict.FromString(_recv_frame(sock)))
        except (OSError, ValueError) as err:
            raise WorkerError(f"ClientApp worker at {socket_path} broke off {handler}: {err}") from err
    finally:
        sock.close()
    if header.get("status") == "code-mismatch":
        log.warning("ClientApp worker at %s runs other code (%s): answering %s in this process",
                    socket_path, header.get("error"), handler)
        return None
    raise WorkerError(f"ClientApp worker at {socket_path} failed on {handler}: {header.get('error', header)}")


# ---------------------------------------------------------------------------- the worker's side
def _error(status: str, text: str) -> list[bytes]:
    return [json.dumps({"status": status, "error": text}).encode()]


def _handle(conn: socket.socket, code: str, handlers: dict[str, Callable[[Message, Context], Message]],
            on_run: Callable[[int], None]) -> tuple[str, list[bytes]]:
    """Read one request and compute its answer: (what to log, the reply's frames)."""
    header = _recv_header(conn)
    message_bytes = _recv_frame(conn)
    context_bytes = _recv_frame(conn)
    conn.settimeout(None)
    handler, theirs = header.get("handler"), str(header.get("code"))
    if theirs != code:
        return (f"refused {handler}: code {theirs[:12]} is not this worker's {code[:12]}",
                _error("code-mismatch", f"worker code {code[:12]}, ClientApp code {theirs[:12]}"))
    if handler not in handlers:
        return f"refused unknown handler {handler!r}", _error("error", f"unknown handler {handler!r}; known: {HANDLERS}")
    try:
        msg = message_from_proto(ProtoMessage.FromString(message_bytes))
        context = context_from_proto(ProtoContext.FromString(context_bytes))
        on_run(context.run_id)
        content = recorddict_to_proto(handlers[handler](msg, context).content).SerializeToString()
    except Exception as err:  # the message's failure, reported to the ClientApp, not the worker's
        log.exception("%s failed", handler)
        text = "".join(traceback.format_exception_only(err)).strip()
        return f"{handler} failed: {text}", _error("error", text)
    return f"answered {handler} ({len(content)} bytes)", [json.dumps({"status": "ok"}).encode(), content]


def listens(socket_path: Path) -> bool:
    """Whether a worker accepts connections on ``socket_path`` (a connection without a request
    is a probe, which the worker does not count as one)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(socket_path))
        except OSError:
            return False
    return True


def _claim_socket(socket_path: Path) -> socket.socket:
    """Bind ``socket_path`` (mode 0600, folder 0700); a stale file is replaced, a live worker is not."""
    socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if socket_path.exists() or socket_path.is_symlink():
        if listens(socket_path):
            raise RuntimeError(f"a ClientApp worker already listens on {socket_path}")
        socket_path.unlink()  # nobody listens: a worker that died
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        server.bind(str(socket_path))
    finally:
        os.umask(old_umask)
    server.listen(64)  # a worker shared by many SuperNodes may have many ClientApps waiting
    return server


def serve(socket_path: Path, idle_timeout: float = 0.0) -> None:
    """Answer requests on ``socket_path`` one at a time until SIGTERM/SIGINT, or until
    ``idle_timeout`` seconds pass without one (0: never). Loads the app before it listens, so a
    ClientApp that connects finds it ready. A new Flower run drops the cached data and models
    (its data root may have been rebuilt since)."""
    from client_app import handlers, resources  # the heavy imports: torch, transformers

    code = app_digest(own_app_root())
    table: dict[str, Callable[[Message, Context], Message]] = {name: getattr(handlers, name) for name in HANDLERS}
    runs: list[int] = []

    def on_run(run_id: int) -> None:
        if runs and runs[-1] != run_id:
            resources.clear_resources()
            log.info("new run %s: cached data and models dropped", run_id)
        runs[:] = [run_id]

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    server = _claim_socket(socket_path)
    inode = socket_path.stat().st_ino
    log.info("ClientApp worker ready on %s (app code %s, pid %d)", socket_path, code[:12], os.getpid())
    try:
        server.settimeout(idle_timeout or None)
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                log.info("no request for %.0f s: stopping", idle_timeout)
                return
            started = time.perf_counter()
            with conn:
                try:
                    conn.settimeout(REQUEST_TIMEOUT_S)
                    if not conn.recv(1, socket.MSG_PEEK):
                        continue  # connected and closed without a request: a readiness probe
                    outcome, frames = _handle(conn, code, table, on_run)
                except (OSError, ValueError) as err:  # a peer that vanished or sent garbage
                    log.info("dropped a request: %s in %.2f s", err, time.perf_counter() - started)
                    continue
                # logged before the answer leaves: whoever got the answer finds it in the log
                log.info("%s in %.2f s", outcome, time.perf_counter() - started)
                try:
                    for frame in frames:
                        _send_frame(conn, frame)
                except OSError as err:  # the ClientApp is gone (its SuperNode was stopped, say)
                    log.info("could not deliver that answer: %s", err)
    finally:
        server.close()
        try:
            if socket_path.stat().st_ino == inode:
                socket_path.unlink()
        except FileNotFoundError:
            pass
