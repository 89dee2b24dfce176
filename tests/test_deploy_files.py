"""Static checks of the docker deployment files (no Docker daemon on the development machine):
every flag a service passes exists in the pinned Flower / our CLI, and the SuperNodes name the
scenario's client ids once each."""

from __future__ import annotations

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
        text = helps.setdefault((binary, sub), _help(binary, sub))
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
        state_volumes = [v for v in service["volumes"] if v.endswith(":/state")]
        assert state_volumes == [f"state-{node_config['client-id']}:/state"], name  # own state per client
    assert sorted(ids) == list(range(NUM_CLIENTS))


@pytest.mark.parametrize("path", ["deploy/Dockerfile"])
def test_dockerfile_installs_cpu_torch_before_the_project(path: str) -> None:
    text = (ROOT / path).read_text()
    assert text.index('pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"') < text.index("RUN pip install . ")
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in text
