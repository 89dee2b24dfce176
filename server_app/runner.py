"""The round loop of the ServerApp: handshake, per-client rounds, checkpoints, resume, log, report.

Flower's built-in ``Strategy.start`` keeps one global model, always starts at round 1 and waits an
hour for slow replies; FedMosaic needs per-client state, resumable runs and a configurable round
timeout, so the loop lives here and uses the strategy's ``configure_train``/``aggregate_round``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedmosaic_core.federation.config import FederationConfig
from server_app.checkpoint import atomic_write_text, load_latest_checkpoint, save_checkpoint
from server_app.strategy import FedMosaicStrategy, wait_for_nodes

log = logging.getLogger("fedmosaic.server")

LOG_FILE = "rounds.jsonl"
RESUME_IGNORED_KEYS = {"resume", "num_server_rounds", "round_timeout"}


class RunStateError(RuntimeError):
    """The run directory does not fit the requested run (e.g. resume with another config)."""


@dataclass
class RunResult:
    run_dir: Path
    last_round: int
    rows: list[dict[str, Any]]
    strategy: FedMosaicStrategy


def round_config(config: FederationConfig, server_round: int) -> ConfigRecord:
    """Per-round instructions for the clients (training knobs come from the run config)."""
    last = server_round == config.num_server_rounds
    every = config.eval_others_every
    eval_others = last or (every > 0 and server_round % every == 0)
    return ConfigRecord(
        {
            "server-round": server_round,
            "num-server-rounds": config.num_server_rounds,
            "eval-others": bool(eval_others),
            "eval-unseen": bool(config.eval_unseen and eval_others),
            "run-name": config.resolved_run_name,
        }
    )


def _read_rows(path: Path, up_to_round: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if int(r.get("round", 0)) <= up_to_round]


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def prepare_run_dir(config: FederationConfig) -> tuple[FedMosaicStrategy, int, list[dict[str, Any]]]:
    """Fresh run or resume: returns the strategy, the first round to run and the log so far."""
    run_dir = config.run_dir
    strategy = FedMosaicStrategy(config)
    saved_config = run_dir / "config.json"
    if config.resume:
        checkpoint = load_latest_checkpoint(run_dir)
        if checkpoint is not None:
            previous = json.loads(saved_config.read_text()) if saved_config.exists() else {}
            mine = config.model_dump()
            changed = sorted(
                k for k in mine if k not in RESUME_IGNORED_KEYS and k in previous and previous[k] != mine[k]
            )
            if changed:
                raise RunStateError(
                    f"resume: {run_dir} was run with different values for {', '.join(changed)}"
                )
            server_round, tensors, meta = checkpoint
            strategy.load_state(tensors, meta)
            rows = _read_rows(run_dir / LOG_FILE, server_round)
            log.info("resuming %s after round %d", run_dir, server_round)
            return strategy, server_round + 1, rows
        log.info("resume: no checkpoint in %s, starting at round 1", run_dir)
    elif (run_dir / "checkpoints").exists():
        archive = run_dir.with_name(f"{run_dir.name}-previous-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(run_dir), str(archive))
        log.info("a previous run of %s was moved to %s", run_dir.name, archive)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved_config, json.dumps(config.model_dump(), indent=1, sort_keys=True))
    return strategy, 1, []


def run_federation(grid: Grid, config: FederationConfig, *, stop_after: int | None = None) -> RunResult:
    """Run rounds until ``num-server-rounds`` (or ``stop_after``, for tests of resume)."""
    strategy, first_round, rows = prepare_run_dir(config)
    run_dir = config.run_dir
    strategy.summary()
    timeout = config.round_timeout
    last_round = first_round - 1
    for server_round in range(first_round, config.num_server_rounds + 1):
        if stop_after is not None and server_round > stop_after:
            break
        nodes = wait_for_nodes(grid, config.min_clients, timeout)
        present = set(nodes)
        for client, node in list(strategy.node_of.items()):
            if node not in present:
                del strategy.node_of[client]
        strategy.register_nodes(grid, nodes, timeout)
        if len(strategy.node_of) < config.min_clients:
            raise RuntimeError(
                f"round {server_round}: only {len(strategy.node_of)} client(s) registered, "
                f"min-clients={config.min_clients}"
            )
        log.info("[ROUND %d/%d] %d clients", server_round, config.num_server_rounds, len(strategy.node_of))
        started = time.monotonic()
        messages = list(strategy.configure_train(server_round, ArrayRecord(), round_config(config, server_round), grid))
        selected = [c for c, n in strategy.node_of.items() if any(m.metadata.dst_node_id == n for m in messages)]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        outcome = strategy.aggregate_round(server_round, replies, expected=selected)
        elapsed = time.monotonic() - started
        for row in outcome.rows:
            row["strategy"] = config.strategy
            row["round_time_s"] = round(elapsed, 3)
        rows.extend(outcome.rows)
        _write_rows(run_dir / LOG_FILE, rows)
        save_checkpoint(run_dir, server_round, strategy.state_tensors(), strategy.state_meta())
        log.info(
            "round %d done in %.1fs: %d replied, %d excluded, %d missing",
            server_round, elapsed, len(outcome.replied), len(outcome.excluded), len(outcome.missing),
        )
        last_round = server_round
    return RunResult(run_dir=run_dir, last_round=last_round, rows=rows, strategy=strategy)
