"""Run the Flower app with ``flwr run`` on a SuperLink this process starts and stops.

Why not the managed local SuperLink of a plain ``flwr run .``: it is started detached (no pid to
stop), outlives the command, is reused by later runs with its old settings, and by default
``uv sync``s the app's dependencies (a CUDA torch that shadows the installed one). Here the
SuperLink is started in simulation mode with ``--disable-runtime-dependency-installation`` on
free loopback ports under a private ``FLWR_HOME``, the run is submitted with ``flwr run``, its
final status is read with ``flwr ls`` (``flwr run --stream`` exits 0 even when the run failed),
and the SuperLink's process group is stopped by pid, also on failure.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmosaic_cli.tls import SupernodeKey, TlsFiles

CONNECTION = "fedmosaic-sim"


class LaunchError(RuntimeError):
    """The Flower run could not be started, or did not finish successfully."""


_HANDED_OUT: set[int] = set()
_HANDED_OUT_LOCK = threading.Lock()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 that this process has not handed out before: the kernel may
    give a port that was just released again before its first user binds it (seen here: two of 20
    SuperNodes started at once got the same port, and one exited)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        with _HANDED_OUT_LOCK:
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port


def _bin(name: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def run_config_args(overrides: Mapping[str, Any]) -> list[str]:
    args: list[str] = []
    for key, value in overrides.items():
        args += ["--run-config", f"{key}={toml_value(value)}"]
    return args


@dataclass(frozen=True)
class Host:
    """Where a process runs: this machine, or a command prefix that puts it elsewhere (the tests
    use ``ip netns exec NAME`` to make network namespaces separate hosts)."""

    prefix: tuple[str, ...] = ()

    @classmethod
    def netns(cls, name: str) -> Host:
        return cls(("ip", "netns", "exec", name))


LOCAL = Host()


@dataclass
class SuperLinkHandle:
    process: subprocess.Popen[bytes]
    control_address: str  # host:port as the operator (the flwr CLI) reaches it
    flwr_home: Path
    env: dict[str, str]
    log_file: Path
    operator: Host = LOCAL  # where the flwr CLI runs


def _reachable(host: str, port: int, where: Host) -> bool:
    if not where.prefix:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            return sock.connect_ex((host, port)) == 0
    probe = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 0.5)"
    return subprocess.run([*where.prefix, sys.executable, "-c", probe, host, str(port)],
                          capture_output=True, timeout=30).returncode == 0


def _wait_for_port(host: str, port: int, process: subprocess.Popen[bytes], timeout: float, log_file: Path,
                   where: Host = LOCAL) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LaunchError(f"flower-superlink exited with code {process.returncode}; see {log_file}")
        if _reachable(host, port, where):
            return
        time.sleep(0.2)
    raise LaunchError(f"flower-superlink did not open {host}:{port} within {timeout:.0f}s; see {log_file}")


def _wait_until_healthy(port: int, process: subprocess.Popen[bytes], name: str, log_file: Path,
                        timeout: float = 180.0) -> None:
    """Until ``process`` answers ``GET /health`` on 127.0.0.1:``port`` (Flower's HTTP APIs do; a
    port merely open may be another process's); LaunchError naming it if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LaunchError(f"{name} exited with code {process.returncode}; see {log_file}")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)  # no proxy, unlike urllib
        try:
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        finally:
            connection.close()
        time.sleep(0.3)
    raise LaunchError(f"{name} did not answer on 127.0.0.1:{port}/health within {timeout:.0f}s; see {log_file}")


def stop_process_group(process: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM the process group of ``process`` (started with a new session), then SIGKILL."""
    stop_process_groups([process], grace)


def stop_process_groups(processes: Sequence[subprocess.Popen[Any]], grace: float = 10.0) -> None:
    """:func:`stop_process_group` for many at once: SIGTERM them all, then wait for each until a
    common deadline, then SIGKILL the group of any still running. Many SuperNodes stop in the time
    of one. Returns once every group is empty, the groups of helpers that Flower starts in
    sessions of their own included (the SuperLink's ``flower-superexec``, which otherwise
    outlives it until its parent monitor notices): a member still alive at the deadline is
    SIGKILLed."""
    running = [p for p in processes if p.poll() is None]
    table = _process_table()
    groups = list(dict.fromkeys([p.pid for p in processes] + [
        table[pid][1] for p in running for pid in _descendants(p.pid, table) if pid in table]))
    groups = [g for g in groups if g != os.getpgrp()]
    for group in groups:
        _signal_group_id(group, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait(timeout=grace)
    for group in groups:
        _empty_group(group, deadline)


def _process_table() -> dict[int, tuple[int, int, str]]:
    """pid → (parent pid, process group, state) of every process in /proc (empty without it)."""
    table = {}
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else ():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0])
            except (OSError, IndexError, ValueError):
                continue
    return table


def _descendants(pid: int, table: Mapping[int, tuple[int, int, str]]) -> list[int]:
    """Every process below ``pid`` in the process tree, whatever its session."""
    children: dict[int, list[int]] = {}
    for child, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, frontier = [], [pid]
    while frontier:
        frontier = [c for p in frontier for c in children.get(p, [])]
        found += frontier
    return found


def _group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` has a live member. Zombies do not count: they only wait for
    a parent to reap them (where /proc is missing, any member counts)."""
    if not Path("/proc").is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    return any(group == pgid and state != "Z" for _, group, state in _process_table().values())


def _empty_group(pgid: int, deadline: float, grace: float = 10.0) -> None:
    """Wait until group ``pgid`` has no live member: SIGKILL it at ``deadline``, then give up
    ``grace`` seconds later (a process in uninterruptible sleep)."""
    killed_at: float | None = None
    while _group_alive(pgid):
        now = time.monotonic()
        if killed_at is None and now >= deadline:
            _signal_group_id(pgid, signal.SIGKILL)
            killed_at = now
        elif killed_at is not None and now - killed_at > grace:
            return
        time.sleep(0.05)


def _signal_group(process: subprocess.Popen[Any], signum: int) -> None:
    _signal_group_id(process.pid, signum)


def _signal_group_id(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None) -> None:
    """``flwr_home/config.toml`` with one default SuperLink connection ``name`` (TLS verified
    against ``root_certificates``, or insecure), which the ``flwr`` CLI uses."""
    security = f"root-certificates = {json.dumps(str(root_certificates))}" if root_certificates else "insecure = true"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = {json.dumps(address)}\n{security}\n'
    )


def _start_superlink(
    flwr_home: Path, extra_env: Mapping[str, str] | None, *, simulation: bool, tls: TlsFiles | None = None,
    supernode_auth: bool = False, superexec_secret: Path | None = None,
    host: Host = LOCAL, bind: str = "127.0.0.1", address: str = "127.0.0.1", operator: Host = LOCAL,
    port: int | None = None, persistent: bool = True,
) -> SuperLinkHandle:
    """Start ``flower-superlink`` on free loopback ports under a private ``FLWR_HOME`` and wait
    for its port; the caller stops ``handle.process`` (it is stopped here if it never comes up).
    With ``superexec_secret`` it runs ``--isolation process``: the ServerApp is started by a
    separate ``flower-superexec`` (:func:`start_superexec`) that holds the secret. On separate
    hosts it runs on ``host``, listens on ``bind`` and the operator (the flwr CLI, on
    ``operator``) reaches it at ``address``. ``port``: a fixed port (a restart on the same one,
    with the same database in ``flwr_home``); default a free one. ``persistent``: the state in
    ``flwr_home/state.db`` (it survives a restart), else in memory (Flower's default)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    # flwr 1.41-1.42 serve the Runtime, Control and Fleet HTTP APIs on one port (--host/--port).
    http_port, health_port = port or free_port(), free_port()
    # Flower starts its own helpers (flower-superexec, flwr-simulation) by name: _flower_env puts
    # this interpreter's scripts first on PATH, also when the venv is not activated (CI, make).
    env = _flower_env(flwr_home, extra_env)
    control = f"{address}:{http_port}"
    write_connection(flwr_home, CONNECTION, control, tls.ca_certificate if tls else None)
    log_file = flwr_home / "superlink.log"
    command = [
        *host.prefix, _bin("flower-superlink"), *(tls.superlink_args() if tls else ["--insecure"]),
        *(["--simulation"] if simulation else []),
        *(["--enable-supernode-auth"] if supernode_auth else []),
        *_isolation_args(superexec_secret), "--disable-runtime-dependency-installation",
        "--health-server-address", f"127.0.0.1:{health_port}",
        "--host", bind, "--port", str(http_port),
        "--database", str(flwr_home / "state.db") if persistent else IN_MEMORY_STATE,
    ]
    # cwd: Ray's simulation workers put their driver's cwd first on sys.path, so a caller's
    # checkout there would shadow the app that `flwr run` installed; the home holds no packages
    with open(log_file, "ab") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                   cwd=flwr_home)
    try:
        _wait_for_port(address, http_port, process, 60.0, log_file, operator)
    except BaseException:
        stop_process_group(process)
        raise
    return SuperLinkHandle(process, control, flwr_home, env, log_file, operator)


#: the lock file of a FLWR_HOME in use (see :func:`claim_flwr_home`)
HOME_LOCK = ".fedmosaic-lock"


@contextmanager
def claim_flwr_home(flwr_home: Path) -> Iterator[Path]:
    """Hold ``flwr_home`` for one launch: two launches on one FLWR_HOME at a time would share its
    ``config.toml``, so each one's ``flwr`` CLI could follow and poll the other's SuperLink (a run
    then waits for a status that never comes). A second claim fails at once with a LaunchError;
    the lock goes with the process, also when it is killed."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lock = flwr_home / HOME_LOCK
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise LaunchError(
                f"{flwr_home} is in use by another fedmosaic launch (pid {holder}); wait for it, or give "
                f"this one another run name or cache (FEDMOSAIC_CACHE)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield flwr_home
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def simulation_home(flwr_root: Path, run_dir: Path) -> Path:
    """The FLWR_HOME of a simulation: one per run folder, so that runs of other folders may go on at
    the same time (one launch per FLWR_HOME, :func:`claim_flwr_home`)."""
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:8]
    return flwr_root / f"{run_dir.name}-{digest}"


@contextmanager
def simulation_superlink(flwr_home: Path, extra_env: Mapping[str, str] | None = None) -> Iterator[SuperLinkHandle]:
    """A SuperLink in simulation mode on free loopback ports, stopped on exit. Its state is in
    memory: a database in ``flwr_home`` would outlive a stopped command, and the next SuperLink on
    it would start the run that command had left pending again, beside the new one."""
    handle = _start_superlink(flwr_home, extra_env, simulation=True, persistent=False)
    try:
        yield handle
    finally:
        stop_process_group(handle.process)


def _flower_env(flwr_home: Path, extra_env: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra_env or {})
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    return env


def _isolation_args(superexec_secret: Path | None) -> list[str]:
    if superexec_secret is None:
        return ["--isolation", "subprocess"]
    return ["--isolation", "process", "--superexec-auth-secret-file", str(superexec_secret)]


#: Flower's in-memory SuperLink state (``--database``)
IN_MEMORY_STATE = ":flwr-in-memory:"

#: niceness of the ClientApps a local deployment starts: on a shared host they yield the CPU to
#: the SuperLink and SuperNodes (a starved SuperLink fails pushes; see :func:`local_deployment`)
CLIENTAPP_NICENESS = 10
#: starts of a SuperNode whose ClientApp API port was taken by another process before it bound it
SUPERNODE_START_ATTEMPTS = 3


def start_superexec(
    runtime_api: str, env: Mapping[str, str], log_file: Path, secret: Path, root_certificates: Path | None = None,
    host: Host = LOCAL, niceness: int = 0,
) -> subprocess.Popen[bytes]:
    """A ``flower-superexec`` for the Runtime API at ``runtime_api`` (a SuperLink's: it runs the
    ServerApps; a SuperNode's: its ClientApps), authenticated by the shared ``secret``; TLS when
    ``root_certificates`` is given. It keeps a run going through short SuperLink outages, which
    ``--isolation subprocess`` does not. ``niceness`` > 0 lowers its priority and its apps'."""
    command = [
        *host.prefix, *(["nice", "-n", str(niceness)] if niceness else []),
        _bin("flower-superexec"), "--runtime-api-address", runtime_api,
        *(["--root-certificates", str(root_certificates)] if root_certificates else ["--insecure"]),
        "--superexec-auth-secret-file", str(secret),
    ]
    with open(log_file, "ab") as sink:
        return subprocess.Popen(command, env=dict(env), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


def node_config_arg(values: Mapping[str, Any]) -> str:
    """``--node-config`` text: space-separated ``key=value`` pairs with TOML values."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())


def tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of ``root_pid`` and all its descendants (from /proc; 0 where there is none)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(stat[1]), []).append(int(entry.name))
        rss[int(entry.name)] = int(stat[21]) * os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


@contextmanager
def peak_memory(every: float = 0.5) -> Iterator[list[int]]:
    """Samples the resident memory of this process and everything it started, every ``every``
    seconds; the yielded list holds the peak in bytes when the block ends."""
    peak = [tree_rss_bytes(os.getpid())]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every):
            peak[0] = max(peak[0], tree_rss_bytes(os.getpid()))

    sampler = threading.Thread(target=sample, name="peak-memory", daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


def worker_socket(flwr_home: Path, index: int) -> Path:
    """Where a local deployment's warm ClientApp worker ``index`` listens: a short path (a Unix
    socket's may not exceed 107 bytes) in a private folder named after ``flwr_home``."""
    tag = hashlib.sha256(str(flwr_home.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"fedmosaic-workers-{tag}" / f"worker-{index}.sock"


def start_client_worker(socket_path: Path, env: Mapping[str, str], log_file: Path, host: Host = LOCAL,
                        niceness: int = 0) -> subprocess.Popen[bytes]:
    """``fedmosaic client-worker --socket socket_path``: the SuperNode's warm ClientApp worker."""
    socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    command = [*host.prefix, *(["nice", "-n", str(niceness)] if niceness else []),
               _bin("fedmosaic"), "client-worker", "--socket", str(socket_path)]
    with open(log_file, "ab") as sink:
        return subprocess.Popen(command, env=dict(env), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_workers(workers: Sequence[tuple[Path, subprocess.Popen[bytes], Path]], timeout: float = 600.0) -> None:
    """Wait until every worker (socket, process, log) accepts connections: it has loaded torch
    and the app; a worker that exits first fails with its log's name."""
    from client_app.worker import listens

    deadline = time.monotonic() + timeout
    waiting = list(workers)
    while waiting:
        socket_path, process, log_file = waiting[0]
        if process.poll() is not None:
            raise LaunchError(f"the ClientApp worker for {socket_path.name} exited with code {process.returncode}; "
                              f"see {log_file}")
        if listens(socket_path):
            waiting.pop(0)
            continue
        if time.monotonic() > deadline:
            raise LaunchError(f"the ClientApp worker for {socket_path.name} was not ready within {timeout:.0f}s; "
                              f"see {log_file}")
        time.sleep(0.2)


@contextmanager
def local_deployment(
    flwr_home: Path,
    node_configs: Sequence[Mapping[str, Any]],
    extra_env: Mapping[str, str] | None = None,
    tls: TlsFiles | None = None,
    supernode_keys: Sequence[SupernodeKey] | None = None,
    superexec_secret: Path | None = None,
    warm_workers: int = 0,
    clientapp_isolation: str = "process",
) -> Iterator[tuple[SuperLinkHandle, list[subprocess.Popen[bytes]]]]:
    """A real deployment on loopback: a SuperLink (deployment runtime, not simulation) and one
    ``flower-supernode`` process per node config, each with its own ``--node-config`` (stable
    ``client-id``, ``state-dir``, ``data-root``), exactly what separate hosts would start.
    With ``tls`` the SuperLink serves TLS and the SuperNodes and the ``flwr`` CLI verify it
    against the CA; without, everything runs ``--insecure``. With ``supernode_keys`` (one per node
    config; needs ``tls``) the SuperLink admits only SuperNodes whose public key is registered: each
    key is registered with ``flwr supernode register`` before its SuperNode starts with it. With
    ``superexec_secret``, process isolation: the SuperLink and every SuperNode run
    ``--isolation process`` and one ``flower-superexec`` each starts their apps, as Flower's compose
    files do; ``clientapp_isolation="subprocess"`` leaves the SuperNodes without one: each starts
    its ClientApp processes itself (Flower's default for a SuperNode, one process less per node).
    All processes are stopped by pid on exit, also on failure.

    The SuperLink keeps its state in memory: this deployment lives and ends with the block, so
    there is nothing to keep, and with many SuperNodes on one host the SQLite state file fails
    pushes with "database is locked" past Flower's 5 s busy timeout, and Flower drops those
    replies (seen here: 20 SuperNodes on 2 cores lost one reply in its handshake).

    With ``warm_workers`` = K > 0, K warm ClientApp workers (``fedmosaic client-worker``) are
    started, and waited for, before the SuperNodes, and node config i gets worker i mod K's
    ``worker-socket``: the ClientApp processes Flower starts per message hand their messages to
    it. K = the number of nodes is what separate hosts have; fewer share a worker (and its cached
    base models) between nodes, as a simulation's actors do."""
    if supernode_keys is not None and (tls is None or len(supernode_keys) != len(node_configs)):
        raise LaunchError("SuperNode authentication needs TLS and one key per SuperNode")
    link = _start_superlink(flwr_home, extra_env, simulation=False, tls=tls, supernode_auth=supernode_keys is not None,
                            superexec_secret=superexec_secret, persistent=False)
    processes: list[subprocess.Popen[bytes]] = [link.process]
    try:
        if superexec_secret is not None:
            processes.append(start_superexec(link.control_address, link.env, flwr_home / "superexec-serverapp.log",
                                             superexec_secret, tls.ca_certificate if tls else None))
        workers = []
        for index in range(min(warm_workers, len(node_configs))):
            socket_path, log_file = worker_socket(flwr_home, index), flwr_home / f"client-worker-{index}.log"
            workers.append((socket_path, start_client_worker(socket_path, link.env, log_file,
                                                             niceness=CLIENTAPP_NICENESS), log_file))
            processes.append(workers[-1][1])
        # while the workers load torch: each key registered by its own `flwr` call, a few at once
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda key: register_supernode(link, key), supernode_keys or []))
        if workers:
            node_configs = [{**values, "worker-socket": str(workers[i % len(workers)][0])}
                            for i, values in enumerate(node_configs)]
            wait_for_workers(workers)

        def start(index: int) -> tuple[list[subprocess.Popen[bytes]], int, int]:
            """Start node ``index`` on a fresh port: (its processes, the port, where its log starts)."""
            log_file = link.flwr_home / f"supernode-{index}.log"
            log_start = log_file.stat().st_size if log_file.exists() else 0
            port = free_port()
            started = start_supernode(link, index, node_configs[index], tls=tls,
                                      key=supernode_keys[index] if supernode_keys else None,
                                      superexec_secret=superexec_secret if clientapp_isolation == "process" else None,
                                      runtime_port=port)
            processes.extend(started)
            return started, port, log_start

        launched = [start(index) for index in range(len(node_configs))]
        # a node that could not start fails the launch, not the run; one that lost its port to
        # another process (between free_port and its bind) is started again on another port
        for index in range(len(node_configs)):
            log_file = link.flwr_home / f"supernode-{index}.log"
            for attempt in range(1, SUPERNODE_START_ATTEMPTS + 1):
                started, port, log_start = launched[index]
                try:
                    _wait_until_healthy(port, started[0], f"flower-supernode {index}", log_file)
                    break
                except LaunchError:
                    with open(log_file, "rb") as log:
                        log.seek(log_start)
                        port_taken = b"address already in use" in log.read()
                    if attempt == SUPERNODE_START_ATTEMPTS or not port_taken:
                        raise
                    stop_process_groups(started)
                    launched[index] = start(index)
        nodes = [started[0] for started, _, _ in launched]
        yield link, nodes
    finally:
        # the nodes, their SuperExecs and the workers together, then the SuperLink they talk to
        stop_process_groups(processes[1:])
        stop_process_group(link.process)
        if warm_workers > 0:
            shutil.rmtree(worker_socket(flwr_home, 0).parent, ignore_errors=True)


def start_supernode(
    link: SuperLinkHandle,
    index: int,
    values: Mapping[str, Any],
    *,
    tls: TlsFiles | None,
    key: SupernodeKey | None = None,
    superexec_secret: Path | None = None,
    host: Host = LOCAL,
    superlink_address: str | None = None,
    runtime_port: int | None = None,
) -> list[subprocess.Popen[bytes]]:
    """One ``flower-supernode`` (logging to ``supernode-{index}.log``) with ``--node-config
    values``, and under process isolation its ``flower-superexec`` for the ClientApps: [node,
    superexec?]. Starting it again with the same key and values is a restart of the same client.
    On a separate ``host`` it dials the SuperLink at ``superlink_address`` (host:port). Its
    ClientApp API listens on ``runtime_port`` (default: a free port)."""
    runtime_port = runtime_port or free_port()
    command = [
        *host.prefix, _bin("flower-supernode"), *(tls.client_args() if tls else ["--insecure"]),
        *(key.supernode_args() if key else []),
        *_isolation_args(superexec_secret),
        "--superlink", superlink_address or link.control_address,
        "--host", "127.0.0.1", "--port", str(runtime_port),
        "--node-config", node_config_arg(values),
    ]
    with open(link.flwr_home / f"supernode-{index}.log", "ab") as sink:
        node = subprocess.Popen(command, env=link.env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    started = [node]
    if superexec_secret is not None:
        started.append(start_superexec(f"127.0.0.1:{runtime_port}", link.env,
                                       link.flwr_home / f"superexec-clientapp-{index}.log", superexec_secret,
                                       host=host, niceness=CLIENTAPP_NICENESS))
    return started


def flwr_register(
    public_key: Path, name: str, connection: str, env: Mapping[str, str], where: Host = LOCAL
) -> tuple[int | None, str]:
    """``flwr supernode register PUBLIC_KEY CONNECTION``: (the node id Flower assigned, "") or
    (None, Flower's reason, e.g. ``Public key already in use``)."""
    out = subprocess.run(
        [*where.prefix, _bin("flwr"), "supernode", "register", str(public_key), connection, "--name", name,
         "--format", "json"],
        env=dict(env), capture_output=True, text=True, timeout=120,
    )
    try:
        payload = json.loads(out.stdout)
    except json.JSONDecodeError:
        payload = {"success": False, "error-message": (out.stdout + out.stderr).strip()[-500:]}
    if payload.get("success") and "node-id" in payload:
        return int(payload["node-id"]), ""
    reason = (str(payload.get("error-message", "")).strip().splitlines() or ["unknown error"])[-1]
    return None, reason


def register_supernode(handle: SuperLinkHandle, key: SupernodeKey) -> int:
    """Register ``key`` with the SuperLink of ``handle`` (it will admit the SuperNode holding the
    private key); returns the node id, or :class:`LaunchError` with Flower's reason."""
    node_id, reason = flwr_register(key.public_key, key.name, CONNECTION, handle.env, handle.operator)
    if node_id is None:
        raise LaunchError(f"could not register SuperNode key {key.public_key}: {reason}")
    return node_id


def run_status(handle: SuperLinkHandle, run_id: int) -> str:
    """The run's status as ``flwr ls`` reports it (e.g. ``finished:completed``)."""
    out = subprocess.run(
        [*handle.operator.prefix, _bin("flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
        env=handle.env, capture_output=True, text=True, timeout=60,
    )
    try:
        payload = json.loads(out.stdout)
        runs = payload.get("runs") or payload.get("run") or []
        run = runs[0] if isinstance(runs, list) else runs
        return str(run.get("status", "unknown"))
    except (json.JSONDecodeError, IndexError, AttributeError):
        raise LaunchError(f"cannot read the status of run {run_id}: {out.stdout[-500:]} {out.stderr[-500:]}") from None


def flwr_stop(handle: SuperLinkHandle, run_id: int) -> None:
    """``flwr stop RUN_ID``: what an operator does with a run whose ServerApp died (its
    ``flwr run`` then ends); LaunchError with Flower's reason if it refuses."""
    out = subprocess.run(
        [*handle.operator.prefix, _bin("flwr"), "stop", str(run_id), CONNECTION, "--format", "json"],
        env=handle.env, capture_output=True, text=True, timeout=60,
    )
    try:
        payload = json.loads(out.stdout)
    except json.JSONDecodeError:
        payload = {}
    if not payload.get("success"):
        raise LaunchError(f"flwr stop {run_id} failed: {(out.stdout + out.stderr).strip()[-500:]}")


def flwr_run(
    app_dir: Path,
    handle: SuperLinkHandle,
    *,
    run_config: Mapping[str, Any],
    num_supernodes: int | None = None,
    num_cpus_per_client: int = 1,
    log_path: Path,
    timeout: float = 3600.0,
    on_wait: Callable[[], None] | None = None,
    on_submitted: Callable[[int], None] | None = None,
) -> tuple[int, str]:
    """Submit the app (``flwr run --format json`` gives the run id), stream its logs into
    ``log_path`` (``flwr log``) while calling ``on_wait`` about once a second, and return
    (run id, final status as ``flwr ls`` reports it).

    ``num_supernodes`` is for a simulation SuperLink; leave it None for a deployment.
    ``on_submitted`` is called with the run id as soon as Flower has accepted the run."""
    command = [*handle.operator.prefix, _bin("flwr"), "run", str(app_dir), CONNECTION, "--format", "json",
               *run_config_args(run_config)]
    if num_supernodes is not None:
        command += [
            "--federation-config",
            f"num-supernodes={num_supernodes} client-resources-num-cpus={num_cpus_per_client}",
        ]
    submitted = subprocess.run(command, env=handle.env, capture_output=True, text=True, timeout=600)
    try:
        payload = json.loads(submitted.stdout)
        run_id = int(payload["run-id"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise LaunchError(
            f"flwr run did not start a run (exit {submitted.returncode}): "
            f"{(submitted.stdout + submitted.stderr)[-2000:]}"
        ) from None
    if on_submitted is not None:
        on_submitted(run_id)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    started = time.monotonic()
    status = ""
    while not status.startswith("finished"):
        # follow the log until the stream ends; it also ends when the SuperLink goes away (a
        # restart): then the run is still going, and the log is followed again once it is back
        with open(log_path, "a") as sink:
            follower = subprocess.Popen(
                [*handle.operator.prefix, _bin("flwr"), "log", str(run_id), CONNECTION, "--stream"], env=handle.env,
                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            )
            try:
                while follower.poll() is None:
                    if on_wait is not None:
                        on_wait()
                    if time.monotonic() - started > timeout:
                        raise LaunchError(f"run {run_id} exceeded {timeout:.0f}s; log: {log_path}")
                    time.sleep(1.0)
            finally:
                stop_process_group(follower)
        while True:
            time.sleep(1.0)  # the stream may end a moment before the status is final
            try:
                status = run_status(handle, run_id)
            except LaunchError:
                status = ""  # the SuperLink is not answering (restarting): wait for it
            if status:  # finished, or the SuperLink answers and the run goes on: follow it again
                break
            if time.monotonic() - started > timeout:
                raise LaunchError(f"run {run_id} exceeded {timeout:.0f}s; log: {log_path}")
    if on_wait is not None:
        on_wait()
    return run_id, status
