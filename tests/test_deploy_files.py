"""Static checks of the docker deployment files (no Docker daemon on the development machine):
every flag a service passes exists in the pinned Flower / our CLI, and the SuperNodes name the
scenario's client ids once each."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from drake_data.mini.builder import NUM_CLIENTS

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _help(binary: str, sub: str | None = None) -> str:
    exe = Path(sys.executable).with_name(binary)
    command = [str(exe)] + ([sub] if sub else []) + ["--help"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return out.stdout + out.stderr


def test_every_flag_exists_in_the_pinned_tools() -> None:
    helps: dict[tuple[str, str | None], str] = {}
    for name, service in _compose()["services"].items():
        command = service["command"]
        binary = command[0]
        sub = command[1] if binary == "fedmosaic" else None
        if (binary, sub) not in helps:  # one --help per tool
            helps[(binary, sub)] = _help(binary, sub)
        text = helps[(binary, sub)]
        for flag in (c for c in command if c.startswith("--")):
            assert re.search(rf"{re.escape(flag)}\b", text), f"{name}: {binary} has no flag {flag}"


def test_supernodes_cover_the_scenario_clients_once() -> None:
    services = _compose()["services"]
    ids = []
    for name, service in services.items():
        if not name.startswith("supernode-"):
            continue
        command = service["command"]
        node_config = dict(item.split("=", 1) for item in shlex.split(command[command.index("--node-config") + 1]))
        ids.append(int(node_config["client-id"]))
        assert command[command.index("--superlink") + 1] == "superlink:9092"
        # process isolation: the client's ClientApps run in its SuperExec, which holds its own state
        superexec = services[f"superexec-clientapp-{node_config['client-id']}"]
        state_volumes = [v for v in superexec["volumes"] if v.endswith(":/state")]
        assert state_volumes == [f"state-{node_config['client-id']}:/state"], name
    assert sorted(ids) == list(range(NUM_CLIENTS))


def _compose_binary() -> str:
    return str(Path(sys.executable).with_name("docker-compose"))


def _resolved(*files: str) -> dict:  # type: ignore[type-arg]
    """``docker compose config`` of ``files``: what Compose itself makes of them (it fails on errors)."""
    args = [_compose_binary(), *(a for f in files for a in ("-f", str(ROOT / f))), "config", "--format", "json"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _flag(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


@pytest.mark.parametrize("files", [("docker-compose.yml",), ("docker-compose.yml", "deploy/compose.cpu.yml")])
def test_compose_validates_and_runs_secure_process_isolated_services(files: tuple[str, ...]) -> None:
    quiet = subprocess.run([_compose_binary(), *(a for f in files for a in ("-f", str(ROOT / f))), "config", "--quiet"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert quiet.returncode == 0 and not quiet.stdout, quiet.stderr
    services = _resolved(*files)["services"]
    link = services["superlink"]["command"]
    # TLS and SuperNode authentication on; the database's folder is a volume's mount point
    assert "--insecure" not in link and _flag(link, "--ssl-certfile") and "--enable-supernode-auth" in link
    db_folder = str(Path(_flag(link, "--database")).parent)
    assert db_folder in [v["target"] for v in services["superlink"]["volumes"] if v["type"] == "volume"]
    assert _flag(link, "--isolation") == "process"
    secret = _flag(link, "--superexec-auth-secret-file")
    keys_made = [_flag(services["certificates"]["command"][i:], "--supernode")
                 for i, c in enumerate(services["certificates"]["command"]) if c == "--supernode"]
    registered = [c for c in services["register"]["command"] if c.endswith(".pub")]
    nodes = {n: s for n, s in services.items() if n.startswith("supernode-")}
    runtimes = {}
    for service in services.values():
        command = service["command"]
        if command[0] == "flower-superexec":
            assert _flag(command, "--superexec-auth-secret-file") == secret
            runtimes[_flag(command, "--runtime-api-address")] = service
    assert "superlink:9092" in runtimes  # one SuperExec for the ServerApp ...
    for name, service in nodes.items():
        command = service["command"]
        assert "--insecure" not in command and _flag(command, "--root-certificates")
        assert _flag(command, "--isolation") == "process" and _flag(command, "--superexec-auth-secret-file") == secret
        key = Path(_flag(command, "--auth-supernode-private-key"))
        assert key.name in keys_made and f"{key}.pub" in registered  # its key is made and registered first
        assert service["depends_on"]["register"]["condition"] == "service_completed_successfully"
        assert "healthcheck" in service and "/health" in " ".join(service["healthcheck"]["test"])
        clientapps = runtimes[f"{name}:9094"]  # ... and one per SuperNode, for its ClientApps
        # its warm worker listens where the node config says, on a volume it shares with the ClientApps
        socket_path = dict(item.split("=", 1) for item in shlex.split(_flag(command, "--node-config")))["worker-socket"]
        worker = services[f"client-worker-{name.removeprefix('supernode-')}"]
        assert worker["command"][:2] == ["fedmosaic", "client-worker"] and _flag(worker["command"], "--socket") == socket_path
        shared = {v["source"] for v in worker["volumes"] if v["target"] == str(Path(socket_path).parent)}
        assert shared and shared == {v["source"] for v in clientapps["volumes"] if v["target"] == str(Path(socket_path).parent)}
        assert socket_path in " ".join(worker["healthcheck"]["test"])
        for runner in (clientapps, worker):
            gpus = runner.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
            assert (bool(gpus) and gpus[0]["capabilities"] == ["gpu"]) == (len(files) == 1)  # the CPU file drops them
            assert runner["cpu_shares"] < services["superlink"].get("cpu_shares", 1024)  # apps yield to Flower
    assert len(runtimes) == len(nodes) + 1
    assert "/health" in " ".join(services["superlink"]["healthcheck"]["test"])
    assert all(s.get("restart") in ("unless-stopped", "no") for s in services.values())
    # one image for every role, built once from deploy/Dockerfile: one flwr version (pyproject's pin)
    assert len({s["image"] for s in services.values()}) == 1
    assert not any("flwr/" in s["image"] for s in services.values())
    assert not re.search(r"flwr(\[\w+\])?\s*[=<>~]", (ROOT / "deploy" / "Dockerfile").read_text())


@pytest.mark.parametrize("path", ["deploy/Dockerfile"])
def test_dockerfile_installs_cpu_torch_before_the_project(path: str) -> None:
    text = (ROOT / path).read_text()
    assert text.index('pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"') < text.index("RUN pip install . ")
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in text
