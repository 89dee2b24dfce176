"""The FedMosaic ServerApp: validate the run config, prepare, run the strategy, report."""

from __future__ import annotations

import logging

from fedmosaic_flower.logs import quiet_libraries, setup_logging

quiet_libraries()  # before the libraries are imported

from flwr.app import ArrayRecord, Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from fedmosaic_flower.config import ConfigError, parse_run_config  # noqa: E402
from fedmosaic_flower.prepare import prepare_federation  # noqa: E402
from server_app.report import write_report  # noqa: E402
from server_app.run_store import RunStore  # noqa: E402
from server_app.strategy import FedMosaicStrategy  # noqa: E402

app = ServerApp()
log = logging.getLogger("fedmosaic.server")


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    try:
        config = parse_run_config(context.run_config)
    except ConfigError as err:
        log.error("%s", err)
        raise  # Flower marks the run failed (a SystemExit would be reported as completed)
    prepare_federation(config)
    with RunStore(config) as store:
        strategy = FedMosaicStrategy(config, store)
        strategy.start(grid, ArrayRecord(), num_rounds=config.num_server_rounds, timeout=config.round_timeout)
        _, table = write_report(
            store.dir, store.rows, strategy.last_weights, strategy.last_weight_ids,
            f"{config.strategy} on {config.scenario} (seed {config.seed})", outcomes=store.outcomes,
        )
    print(table, flush=True)
    print(f"Report written to {store.dir / 'report'}", flush=True)
