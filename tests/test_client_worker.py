"""The warm ClientApp worker (``fedmosaic client-worker``): a real worker process on a Unix
socket answers what the ClientApp would have answered itself, and the ClientApp answers in its
own process when no worker, or a worker with other code, is there."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flower_fakes import InProcessGrid, run_federation
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client_app import worker as worker_module
from client_app.app import app as client_app
from client_app.worker import SOCKET_KEY, WorkerError
from drake_data.mini.builder import build_drake_mini
from fedmosaic_cli.launch import start_client_worker, wait_for_workers
from fedmosaic_flower import records as proto
from fedmosaic_flower.config import parse_run_config


def start_worker(socket_path: Path, log_file: Path, cache: Path) -> subprocess.Popen[bytes]:
    return start_client_worker(socket_path, dict(os.environ, FEDMOSAIC_CACHE=str(cache), HF_HUB_OFFLINE="1"), log_file)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def sockets() -> Iterator[Path]:
    """A private folder with a short path (a Unix socket's is limited to 107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="fmw-"))
    try:
        yield folder
    finally:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


@pytest.fixture(scope="module")
def worker(sockets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(socket, log) of a running worker, stopped by pid at the end."""
    logs = tmp_path_factory.mktemp("worker")
    socket_path, log_file = sockets / "w.sock", logs / "worker.log"
    process = start_worker(socket_path, log_file, logs / "cache")
    try:
        wait_for_workers([(socket_path, process, log_file)], timeout=300)
        yield socket_path, log_file
    finally:
        stop(process)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_drake_mini(tmp_path_factory.mktemp("drake") / "mini", seed=0, size="tiny")


def _config(data_root: Path, out: Path):  # type: ignore[no-untyped-def]
    return parse_run_config({
        "num-server-rounds": 2, "data-root": str(data_root), "output-dir": str(out), "run-name": "run",
        "pretrained": False, "align-bases": False, "local-steps": 2, "batch-size": 4, "probe-every": 1,
        "rounds-per-task": 1, "eval-max-samples": 2, "eval-others-max-samples": 2, "eval-unseen": False,
        "min-clients": 2,
    })


def _node(partition: int, run_config: dict[str, Any], extra: dict[str, Any]):  # type: ignore[no-untyped-def]
    context = Context(run_id=1, node_id=100 + partition, node_config={"partition-id": partition, **extra},
                      state=RecordDict(), run_config=run_config)
    replies: list[Message] = []

    def handle(msg: Message) -> Message:
        replies.append(client_app(msg, context))
        return replies[-1]

    return handle, replies


def _run(config, extra: dict[str, Any]):  # type: ignore[no-untyped-def]
    nodes = {100 + p: _node(p, config.to_flat(), extra) for p in (0, 1)}
    outcome = run_federation(InProcessGrid({node: handle for node, (handle, _) in nodes.items()}), config)
    return outcome, {node: replies for node, (_, replies) in nodes.items()}


def _untimed(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if not k.endswith("_s") and "time" not in k}


@pytest.mark.slow
def test_a_worker_answers_exactly_what_the_clientapp_would(worker: tuple[Path, Path], data_root: Path,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    socket_path, log_file = worker
    monkeypatch.setenv("FEDMOSAIC_CACHE", str(tmp_path / "cache"))
    here, here_replies = _run(_config(data_root, tmp_path / "here"), {})
    served_before = log_file.read_text().count("answered train")
    there, there_replies = _run(_config(data_root, tmp_path / "there"), {SOCKET_KEY: str(socket_path)})
    # the worker trained both clients in both rounds (nothing ran here)
    assert log_file.read_text().count("answered train") - served_before == 4
    assert [_untimed(r) for r in there.rows] == [_untimed(r) for r in here.rows]
    assert len(there.rows) == 4
    for node in here_replies:
        for a, b in zip(here_replies[node], there_replies[node], strict=True):
            assert a.metadata.message_type == b.metadata.message_type
            for name, record in a.content.array_records.items():
                other = b.content.array_records[name]
                assert list(record) == list(other), name
                for key in record:
                    x, y = record[key], other[key]
                    assert (x.dtype, x.shape, x.data) == (y.dtype, y.shape, y.data), (name, key)
            assert a.content.metric_records.keys() == b.content.metric_records.keys()
    # each client's saved state is the same byte for byte
    for path in sorted((tmp_path / "here" / "run" / "clients").rglob("*.safetensors")):
        twin = tmp_path / "there" / "run" / "clients" / path.relative_to(tmp_path / "here" / "run" / "clients")
        assert twin.read_bytes() == path.read_bytes(), path


def _query(extra: dict[str, Any], run_config: dict[str, Any]) -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0  # as a ServerApp's grid has them
    context = Context(run_id=7, node_id=1, node_config={"partition-id": 0, **extra}, state=RecordDict(),
                      run_config=run_config)
    msg = Message(RecordDict({proto.CONFIG: ConfigRecord({"server-round": 0})}), dst_node_id=1, message_type="query")
    return client_app(msg, context)


@pytest.mark.slow
def test_without_a_worker_or_with_other_code_the_clientapp_answers_itself(
    worker: tuple[Path, Path], sockets: Path, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    socket_path, log_file = worker
    monkeypatch.setenv("FEDMOSAIC_CACHE", str(tmp_path / "cache"))
    run_config = _config(data_root, tmp_path / "runs").to_flat()
    expected = _query({}, run_config).content.config_records[proto.CLIENT_INFO]
    with caplog.at_level(logging.WARNING, logger="fedmosaic.client"):
        reply = _query({SOCKET_KEY: str(sockets / "nobody.sock")}, run_config)
    assert reply.content.config_records[proto.CLIENT_INFO] == expected
    assert "no ClientApp worker at" in caplog.text and "answering query in this process" in caplog.text

    monkeypatch.setattr(worker_module, "app_digest", lambda root: "0" * 64)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedmosaic.client"):
        reply = _query({SOCKET_KEY: str(socket_path)}, run_config)
    assert reply.content.config_records[proto.CLIENT_INFO] == expected
    assert "runs other code" in caplog.text
    assert "refused query: code 000000000000 is not this worker's" in log_file.read_text()


@pytest.mark.slow
def test_a_failure_in_the_worker_is_the_messages_failure(worker: tuple[Path, Path], data_root: Path,
                                                          tmp_path: Path) -> None:
    socket_path, _ = worker
    run_config = _config(data_root, tmp_path / "runs").to_flat()
    context = Context(run_id=7, node_id=1, node_config={"partition-id": 0, SOCKET_KEY: str(socket_path)},
                      state=RecordDict(), run_config=run_config)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
    no_config = Message(RecordDict(), dst_node_id=1, message_type="train")
    with pytest.raises(WorkerError, match=f"worker at {socket_path} failed on train: KeyError"):
        client_app(no_config, context)


def _raw(socket_path: Path, *frames: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(socket_path))
        for frame in frames:
            sock.sendall(frame)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(1 << 16):  # until the worker closes: a reply comes in several writes
            answer += chunk
        return answer


@pytest.mark.slow
def test_the_worker_drops_malformed_requests_and_keeps_serving(worker: tuple[Path, Path], data_root: Path,
                                                               tmp_path: Path) -> None:
    socket_path, log_file = worker
    assert (socket_path.stat().st_mode & 0o777) == 0o600
    assert _raw(socket_path, (1 << 40).to_bytes(8, "big")) == b""  # a frame far beyond the limit
    assert _raw(socket_path, (4).to_bytes(8, "big"), b"[1]\n") == b""  # a header that is no object
    assert _raw(socket_path, (10).to_bytes(8, "big"), b"abc") == b""  # cut short
    header = json.dumps({"handler": "shutdown", "code": worker_module.app_digest(worker_module.own_app_root())}).encode()
    empty = b"\0" * 8
    answer = _raw(socket_path, len(header).to_bytes(8, "big"), header, empty, empty)
    assert b"unknown handler 'shutdown'" in answer
    assert _raw(socket_path) == b""  # connected, sent nothing: a readiness probe, not logged as a request
    text = log_file.read_text()
    assert "connection closed after 0 of" not in text
    assert "dropped a request: frame of 1099511627776 bytes announced; the limit is" in text
    assert "dropped a request: frame header is list, not a JSON object" in text
    assert "dropped a request: connection closed after 3 of 10 bytes" in text
    run_config = _config(data_root, tmp_path / "runs").to_flat()
    reply = _query({SOCKET_KEY: str(socket_path)}, run_config)  # still serving
    assert proto.CLIENT_INFO in reply.content.config_records


@pytest.mark.slow
def test_a_second_worker_on_a_live_socket_is_refused_a_stale_one_is_replaced(
    worker: tuple[Path, Path], sockets: Path, tmp_path: Path
) -> None:
    socket_path, _ = worker
    second = start_worker(socket_path, tmp_path / "second.log", tmp_path / "cache")
    try:
        assert second.wait(timeout=300) == 2
    finally:
        stop(second)
    assert f"a ClientApp worker already listens on {socket_path}" in (tmp_path / "second.log").read_text()

    stale = sockets / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(stale))
    dead.close()  # the file stays, nobody listens: a worker that was SIGKILLed
    third = start_worker(stale, tmp_path / "third.log", tmp_path / "cache")
    try:
        wait_for_workers([(stale, third, tmp_path / "third.log")], timeout=300)
        third.send_signal(signal.SIGTERM)
        assert third.wait(timeout=60) == 128 + signal.SIGTERM
        assert not stale.exists()  # it removed its socket on the way out
    finally:
        stop(third)
