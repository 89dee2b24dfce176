"""The comparison tables of `fedmosaic compare`, on hand-made run summaries."""

from __future__ import annotations

from fedmosaic_cli.main import comparison_table, per_model_table


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
