"""The command line: comparison tables on hand-made run summaries, Flower's --run-config syntax,
and one line per expected error."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from cli_process import run_fedmosaic

from fedmosaic_cli.main import comparison_table, parse_overrides, per_model_table


def _summary(self_by_client: dict[str, tuple[str, float]]) -> dict:  # type: ignore[type-arg]
    clients = {cid: {"model_id": model, "self_last": v} for cid, (model, v) in self_by_client.items()}
    return {"clients": clients}


def test_per_model_table_averages_over_clients_and_seeds() -> None:
    runs = {
        "local": [_summary({"0": ("m-a", 0.2), "1": ("m-b", 0.4)}), _summary({"0": ("m-a", 0.4), "1": ("m-b", 0.0)})],
        "fedmosaic": [_summary({"0": ("m-a", 0.1), "1": ("m-b", 0.3)})],
    }
    table = per_model_table(runs)
    assert "| local | 30.0 | 20.0 |" in table
    assert "| fedmosaic | 10.0 | 30.0 |" in table
    assert table.splitlines()[0] == "| method | Self A_last: m-a | Self A_last: m-b |"


def test_comparison_table_prints_percent_and_dashes_for_missing() -> None:
    overall = {"self_last": 0.25, "self_auc": 0.125, "others_last": float("nan"), "others_auc": None,
               "unseen_last": 0.5, "bytes_up_per_round": 1000.4, "bytes_down_per_round": 0.0}
    table = comparison_table({"fedavg": {"overall": overall}})
    assert "| fedavg | 25.0 | 12.5 | — | — | 50.0 | 1000 | 0 |" in table


def test_run_config_takes_flowers_syntax() -> None:
    assert parse_overrides(["num-server-rounds=2 local-steps=8", "strategy='local' tau=0.25"]) == {
        "num-server-rounds": 2, "local-steps": 8, "strategy": "local", "tau": 0.25,
    }
    assert parse_overrides(["strategy=fedavg resume=true"]) == {"strategy": "fedavg", "resume": True}
    with pytest.raises(typer.BadParameter, match="key=value"):
        parse_overrides(["local-steps"])


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["main-job", "-c", "scenario='/nonexistent.json'"], "/nonexistent.json: scenario file not found"),
        (["main-job", "--run-config", "local-steps=0"], "bad value for 'local-steps'"),
        (["prepare", "-c", "no-such-key=1"], "unknown key 'no-such-key'"),
    ],
)
def test_expected_errors_print_one_line_and_exit_2(tmp_path: Path, args: list[str], line: str) -> None:
    result = run_fedmosaic(args, tmp_path / "cache", timeout=300)
    assert result.returncode == 2, result.stdout[-3000:]
    errors = [x for x in result.stdout.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and line in errors[0], result.stdout[-3000:]
    assert "Traceback" not in result.stdout
