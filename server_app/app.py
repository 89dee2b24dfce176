"""The FedMosaic ServerApp (thin: the logic lives in ``server_app.runner``)."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmosaic_core.federation.config import ConfigError, parse_run_config
from fedmosaic_core.federation.prepare import prepare_federation
from server_app.report import write_report
from server_app.runner import run_federation

app = ServerApp()
log = logging.getLogger("fedmosaic.server")


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = parse_run_config(context.run_config)
    except ConfigError as err:
        log.error("%s", err)
        raise  # Flower marks the run failed (a SystemExit would be reported as completed)
    prepare_federation(config)
    result = run_federation(grid, config)
    strategy = result.strategy
    _, table = write_report(
        result.run_dir, result.rows, strategy.last_weights, strategy.last_weight_ids,
        f"{config.strategy} on {config.scenario} (seed {config.seed})",
    )
    print(table, flush=True)
    print(f"Report written to {result.run_dir / 'report'}", flush=True)
