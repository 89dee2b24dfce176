"""``fedmosaic`` command line: the main job, the baseline comparison, and preparation.

``fedmosaic main-job`` prepares DRAKE-mini and the tiny models (cached), then runs the Flower app
with ``flwr run`` on a local simulation SuperLink that it starts and stops, checks the run's final
status with ``flwr ls`` and prints where the report is. ``fedmosaic compare`` does the same for
several strategies on the same scenario and seed and writes a comparison table.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import typer

from fedmosaic_core.federation.config import (
    STRATEGIES,
    ConfigError,
    FederationConfig,
    default_home,
    parse_run_config,
)

app = typer.Typer(add_completion=False, help="FedMosaic on Flower.", no_args_is_help=True)
log = logging.getLogger("fedmosaic")


def _app_dir(app_dir: Path | None) -> Path:
    if app_dir is not None:
        return app_dir.resolve()
    here = Path(__file__).resolve().parents[1]
    if (here / "pyproject.toml").exists():
        return here
    raise typer.BadParameter("cannot find the Flower app (pyproject.toml); pass --app-dir")


def _defaults(app_dir: Path) -> dict[str, Any]:
    import tomllib

    data = tomllib.loads((app_dir / "pyproject.toml").read_text())
    return dict(data["tool"]["flwr"]["app"]["config"])


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    import tomllib

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"--run-config expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


def _config_or_exit(raw: dict[str, Any]) -> FederationConfig:
    """The validated run config, or one red line naming the bad key and exit status 2."""
    try:
        return parse_run_config(raw)
    except ConfigError as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _run_one(
    app_dir: Path,
    overrides: dict[str, Any],
    flwr_home: Path,
    deployment_clients: list[str] | None = None,
    tls: bool = False,
) -> dict[str, Any]:
    """Prepare, run one federation through Flower, check its status; returns the summary.

    By default on a simulation SuperLink; with ``deployment_clients`` on a local deployment
    (a SuperLink and one SuperNode process per client id; an empty list: every scenario client)."""
    from fedmosaic_core.federation.launch import flwr_run, local_deployment, simulation_superlink
    from fedmosaic_core.federation.prepare import load_run_scenario, prepare_federation

    raw = {**_defaults(app_dir), **overrides}
    config = _config_or_exit(raw)
    started = time.monotonic()
    typer.secho("Preparing DRAKE-mini, tiny models and A/B alignment (cached after the first run)...", fg=typer.colors.BLUE)
    data_root = prepare_federation(config)
    prepared_s = time.monotonic() - started
    scenario = load_run_scenario(config, data_root)
    if not config.data_root:
        overrides = {**overrides, "data-root": str(data_root)}
    if not config.output_dir:
        overrides = {**overrides, "output-dir": str(config.run_dir.parent)}
    cpus = config.torch_threads or (os.cpu_count() or 1)
    if deployment_clients is None:
        with simulation_superlink(flwr_home) as link:
            run_id, status, _ = flwr_run(
                app_dir, link, run_config=overrides, num_supernodes=len(scenario.clients),
                num_cpus_per_client=cpus, log_path=config.run_dir / "flwr-run.log",
            )
    else:
        known = {str(c.client_id) for c in scenario.clients}
        deployment_clients = deployment_clients or sorted(known, key=int)
        # wait for every SuperNode before the first round (they connect within seconds)
        overrides = {"min-clients": len(deployment_clients), **overrides}
        unknown = [c for c in deployment_clients if c not in known]
        if unknown:
            typer.secho(f"unknown client id(s) {', '.join(unknown)}: scenario {config.scenario!r} has "
                        f"{', '.join(sorted(known, key=int))}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
        node_configs = [
            {"client-id": cid, "state-dir": str(config.run_dir / "supernode-state" / f"client-{cid}"),
             "data-root": str(data_root)}
            for cid in deployment_clients
        ]
        from fedmosaic_core.federation.tls import write_certificates

        tls_files = write_certificates(flwr_home / "certificates") if tls else None
        with local_deployment(flwr_home, node_configs, tls=tls_files) as (link, _nodes):
            run_id, status, _ = flwr_run(app_dir, link, run_config=overrides,
                                         log_path=config.run_dir / "flwr-run.log")
    elapsed = time.monotonic() - started
    if status != "finished:completed":
        typer.secho(f"Flower run {run_id} ended with status {status!r}; log: {config.run_dir / 'flwr-run.log'}",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    summary = json.loads((config.run_dir / "report" / "summary.json").read_text())
    summary["timing"] = {"prepare_s": round(prepared_s, 1), "total_s": round(elapsed, 1)}
    summary["run_dir"] = str(config.run_dir)
    summary["strategy"] = config.strategy
    (config.run_dir / "report" / "timing.json").write_text(json.dumps(summary["timing"]))
    return summary


@app.command("main-job")
def main_job(
    run_config: list[str] = typer.Option([], "--run-config", "-c", help="key=value overrides"),
    app_dir: Path | None = typer.Option(None, help="Flower app folder (default: this checkout)"),
) -> None:
    """FedMosaic on DRAKE-mini with heterogeneous tiny models, via `flwr run`."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    directory = _app_dir(app_dir)
    summary = _run_one(directory, _parse_overrides(run_config), default_home() / "flwr-home")
    table = (Path(summary["run_dir"]) / "report" / "table.md").read_text()
    typer.echo(table)
    typer.echo(f"Report: {Path(summary['run_dir']) / 'report'}  (total {summary['timing']['total_s']} s, "
               f"of which preparation {summary['timing']['prepare_s']} s)")


@app.command("local-deployment")
def local_deployment_command(
    clients: str = typer.Option("", help="comma-separated client ids (default: every scenario client)"),
    run_config: list[str] = typer.Option([], "--run-config", "-c", help="key=value overrides"),
    app_dir: Path | None = typer.Option(None, help="Flower app folder (default: this checkout)"),
    tls: bool = typer.Option(True, "--tls/--insecure", help="TLS with a fresh self-signed CA (default) or none"),
) -> None:
    """The app on a real Flower deployment on this host: a SuperLink and one SuperNode process
    per client (``--node-config client-id=… state-dir=… data-root=…``), as on separate hosts."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ids = [c.strip() for c in clients.split(",") if c.strip()]
    summary = _run_one(_app_dir(app_dir), _parse_overrides(run_config),
                       default_home() / "flwr-home-deployment", deployment_clients=ids, tls=tls)
    typer.echo((Path(summary["run_dir"]) / "report" / "table.md").read_text())
    typer.echo(f"Report: {Path(summary['run_dir']) / 'report'}  (total {summary['timing']['total_s']} s)")


def comparison_table(summaries: dict[str, dict[str, Any]]) -> str:
    def pct(x: Any) -> str:
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * float(x):.1f}"

    lines = [
        "| method | Self A_last | Self A_AUC | Others A_last | Others A_AUC | Unseen A_last | bytes up / client / round | bytes down / client / round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        o = s["overall"]
        lines.append(
            f"| {name} | {pct(o['self_last'])} | {pct(o['self_auc'])} | {pct(o['others_last'])} | "
            f"{pct(o['others_auc'])} | {pct(o['unseen_last'])} | {o['bytes_up_per_round']:.0f} | {o['bytes_down_per_round']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def per_model_table(per_seed: dict[str, list[dict[str, Any]]]) -> str:
    """Self A_last (mean %) by base model, over the clients of that model and all seeds."""
    models = sorted({c["model_id"] for runs in per_seed.values() for r in runs for c in r["clients"].values()})
    lines = ["| method | " + " | ".join(f"Self A_last: {m}" for m in models) + " |",
             "|---|" + "---|" * len(models)]
    for name, runs in per_seed.items():
        cells = []
        for model in models:
            values = [float(c["self_last"]) for r in runs for c in r["clients"].values() if c["model_id"] == model]
            cells.append(f"{100 * sum(values) / len(values):.1f}" if values else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@app.command()
def compare(
    strategies: str = typer.Option(",".join(["local", "fedavg", "fedmosaic-uniform", "fedmosaic"]),
                                   help="comma-separated strategies"),
    seeds: str = typer.Option("0", help="comma-separated seeds"),
    run_config: list[str] = typer.Option([], "--run-config", "-c", help="key=value overrides"),
    out: Path | None = typer.Option(None, help="where to write comparison.md / comparison.json"),
    app_dir: Path | None = typer.Option(None, help="Flower app folder (default: this checkout)"),
) -> None:
    """Run the baselines and FedMosaic on the same scenario and seed(s); write a comparison table."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    directory = _app_dir(app_dir)
    names = [s.strip() for s in strategies.split(",") if s.strip()]
    for name in names:
        if name not in STRATEGIES:
            raise typer.BadParameter(f"unknown strategy {name!r}; expected some of {', '.join(STRATEGIES)}")
    overrides = _parse_overrides(run_config)
    results: dict[str, dict[str, Any]] = {}
    per_seed: dict[str, list[dict[str, Any]]] = {}
    for seed in [int(s) for s in seeds.split(",")]:
        for name in names:
            summary = _run_one(directory, {**overrides, "strategy": name, "seed": seed}, default_home() / "flwr-home")
            per_seed.setdefault(name, []).append(summary)
    for name, runs in per_seed.items():
        keys = runs[0]["overall"].keys()
        results[name] = {"overall": {k: float(sum(r["overall"][k] for r in runs) / len(runs)) for k in keys},
                         "runs": [r["run_dir"] for r in runs]}
    table = comparison_table(results) + "\n" + per_model_table(per_seed)
    target = out or (default_home() / "comparisons" / time.strftime("%Y%m%d-%H%M%S"))
    target.mkdir(parents=True, exist_ok=True)
    (target / "comparison.md").write_text(table)
    (target / "comparison.json").write_text(json.dumps(results, indent=1))
    typer.echo(table)
    typer.echo(f"Comparison written to {target}")


@app.command()
def certificates(
    out: Path = typer.Option(..., help="folder for ca.crt, server.pem, server.key (and ca.key)"),
    host: list[str] = typer.Option(["127.0.0.1", "localhost"], help="SuperLink host name or IP (repeat)"),
    days: int = typer.Option(365, help="validity in days"),
) -> None:
    """A self-signed CA and a SuperLink server certificate for TLS (see deploy/README.md)."""
    from fedmosaic_core.federation.tls import write_certificates

    try:
        files = write_certificates(out, host, days)
    except ValueError as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(f"SuperLink: {' '.join(files.superlink_args())}")
    typer.echo(f"SuperNodes and flwr CLI: {' '.join(files.client_args())}")


@app.command()
def prepare(
    run_config: list[str] = typer.Option([], "--run-config", "-c", help="key=value overrides"),
    app_dir: Path | None = typer.Option(None, help="Flower app folder (default: this checkout)"),
) -> None:
    """Build DRAKE-mini, prepare the tiny models and align A/B (what the first run does)."""
    from fedmosaic_core.federation.prepare import prepare_federation

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raw = {**_defaults(_app_dir(app_dir)), **_parse_overrides(run_config)}
    config = _config_or_exit(raw)
    typer.echo(f"Prepared; data at {prepare_federation(config)}")


if __name__ == "__main__":
    app()
