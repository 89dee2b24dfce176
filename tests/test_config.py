"""Run configuration: pyproject is the single source of defaults; bad values fail early."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from flower_fakes import InProcessGrid
from flwr.app import Context, RecordDict

from fedmosaic_flower.config import ConfigError, FederationConfig, parse_run_config

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_config() -> dict:  # type: ignore[type-arg]
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_match_the_config_model() -> None:
    raw = _pyproject_config()
    assert set(raw) == {k.replace("_", "-") for k in FederationConfig.model_fields}
    assert parse_run_config(raw) == FederationConfig()


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("strategy", "fedprox", "strategy"),
        ("num-server-rounds", 0, "num-server-rounds"),
        ("tau", -1.0, "tau"),
        ("fraction-train", 1.5, "fraction-train"),
        ("output-dir", "relative/dir", "output-dir"),
        ("no-such-key", 1, "no-such-key"),
        ("local-steps", "many", "local-steps"),
        ("fixed-beta", 0.5 - 1.0, "fixed-beta"),
        ("fixed-beta", 1.5, "fixed-beta"),
    ],
)
def test_bad_values_name_the_key(key: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        parse_run_config({**_pyproject_config(), key: value})
    assert "\n" not in str(info.value)


def test_include_self_is_refused_for_a_strategy_without_relevance_weights() -> None:
    with pytest.raises(ConfigError, match="include-self.*'feddpa'"):
        parse_run_config({**_pyproject_config(), "strategy": "feddpa", "include-self": True})
    for strategy in ("fedmosaic", "fedmosaic-uniform", "fedmosaic-trained-global"):
        assert parse_run_config({**_pyproject_config(), "strategy": strategy, "include-self": True}).include_self


def test_peerless_global_keep_is_refused_for_a_strategy_without_relevance_weights() -> None:
    with pytest.raises(ConfigError, match="peerless-global.*'fedavg'"):
        parse_run_config({**_pyproject_config(), "strategy": "fedavg", "peerless-global": "keep"})
    with pytest.raises(ConfigError, match="peerless-global"):
        parse_run_config({**_pyproject_config(), "peerless-global": "zero"})
    assert parse_run_config({**_pyproject_config(), "peerless-global": "keep"}).peerless_global == "keep"


def test_server_app_rejects_bad_config_before_any_message(tmp_path: Path) -> None:
    from server_app.app import app as server_app

    def explode(_msg):  # type: ignore[no-untyped-def]
        raise AssertionError("no message may be sent with a bad config")

    grid = InProcessGrid({1: explode})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={**_pyproject_config(), "strategy": "bogus"})
    with pytest.raises(ConfigError, match="strategy"):
        server_app(grid, context)
    assert grid.sent == []


def test_cli_bad_config_exits_nonzero_with_one_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fedmosaic_cli.main", "main-job", "-c", "tau=0"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "FEDMOSAIC_CACHE": str(tmp_path), "HOME": str(tmp_path)},
    )
    assert out.returncode == 2
    assert "'tau'" in out.stderr
    assert not (tmp_path / "runs").exists()
