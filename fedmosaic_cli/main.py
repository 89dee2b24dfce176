"""``fedmosaic`` command line: the main job, the baseline comparison, and preparation.

``fedmosaic main-job`` prepares DRAKE-mini and the tiny models (cached), then runs the Flower app
with ``flwr run`` on a local simulation SuperLink that it starts and stops, checks the run's final
status with ``flwr ls`` and prints where the report is. ``fedmosaic compare`` does the same for
several strategies on the same scenario and seed and writes a comparison table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from fedmosaic_flower.logs import quiet_libraries

quiet_libraries()  # before the libraries are imported

import click  # noqa: E402
import typer  # noqa: E402
from flwr.common.config import parse_config_args  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn  # noqa: E402

from fedmosaic_core.storage import atomic_write_json, cache_home  # noqa: E402
from fedmosaic_flower.config import (  # noqa: E402
    ABLATIONS,
    STRATEGIES,
    FederationConfig,
    parse_run_config,
)

app = typer.Typer(add_completion=False, help="FedMosaic on Flower.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
log = logging.getLogger("fedmosaic")


def _exit_on_signal(signum: int, _frame: Any) -> None:
    # once: a second SIGTERM (``timeout`` and ``docker stop`` signal the whole process group,
    # a user may send one more) must not cut short the cleanup that the first one started
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise SystemExit(128 + signum)


@app.callback()
def _stop_cleanly() -> None:
    """SIGTERM/SIGHUP (``docker stop``, a closed terminal, a CI timeout) exit through the same
    cleanup as Ctrl-C: the SuperLink, SuperNodes and log followers this command started stop too."""
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)

#: errors a user can cause and fix: one red line, exit status 2. Named by module: an error of a
#: class can only be raised once its module is loaded, so none is imported here, and ``--help`` or
#: a bad config answers without loading torch.
USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("fedmosaic_flower.config", "ConfigError"), ("drake_data.errors", "DrakeDataError"),
    ("fedmosaic_core.models.loading", "ModelNotAvailableError"), ("fedmosaic_core.models.align", "AlignmentError"),
    ("fedmosaic_core.pqlora.state", "AdapterStateError"), ("server_app.run_store", "RunStateError"),
    ("builtins", "FileNotFoundError"), ("builtins", "NotADirectoryError"), ("builtins", "PermissionError"),
)
#: the run failed: one red line, exit status 1
RUN_ERRORS: tuple[tuple[str, str], ...] = (("fedmosaic_cli.launch", "LaunchError"), (__name__, "RunFailed"))


def _loaded(names: tuple[tuple[str, str], ...]) -> tuple[type[BaseException], ...]:
    """The classes of ``names`` whose modules are loaded (the others cannot have been raised)."""
    return tuple(getattr(sys.modules[module], name) for module, name in names if module in sys.modules)


RUN_CONFIG_HELP = "run-config overrides in Flower's syntax: \"key=value key2='text'\" (repeatable)"


class RunFailed(RuntimeError):
    """The Flower run ended with a status other than completed."""


@contextlib.contextmanager
def expected_errors() -> Iterator[None]:
    """Turn the errors a user can fix into one line on stderr and a non-zero exit."""
    try:
        yield
    except Exception as err:
        for classes, status in ((_loaded(USER_ERRORS), 2), (_loaded(RUN_ERRORS), 1)):
            if isinstance(err, classes):
                typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
                raise typer.Exit(status) from None
        raise


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


#: one ``key=value`` pair, as Flower's ``parse_config_args`` finds them
_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def parse_overrides(items: list[str], option: str = "--run-config") -> dict[str, Any]:
    """``--run-config`` values as Flower parses them (``"a=1 b='x'"``, repeatable); a bare word
    that is not a TOML value (``strategy=local``) is taken as a string, and text that is no
    ``key=value`` pair is an error (Flower would drop it silently)."""
    out: dict[str, Any] = {}
    for item in items:
        leftover = _PAIR.sub("", item).strip()
        if leftover:
            raise typer.BadParameter(f"{option} expects key=value pairs, got {leftover!r}")
        for key, value in _PAIR.findall(item):
            try:
                out.update(parse_config_args([f"{key}={value}"]))
            except (click.ClickException, ValueError):
                out[key] = value
    return out


class RoundProgress:
    """A progress bar of the run's rounds, read from its ``rounds.jsonl`` while it runs."""

    def __init__(self, progress: Progress, log_file: Path, num_rounds: int, num_clients: int) -> None:
        self.progress, self.log_file, self.num_clients = progress, log_file, num_clients
        self.task = progress.add_task("waiting for round 1", total=num_rounds)
        self.started = time.time()

    def __call__(self) -> None:
        if not self.log_file.exists() or self.log_file.stat().st_mtime < self.started:
            return  # none yet, or an earlier run's log that the ServerApp has not moved aside yet
        rounds: dict[int, int] = {}
        for line in self.log_file.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError, ValueError):
                server_round = int(json.loads(line)["round"])
                rounds[server_round] = rounds.get(server_round, 0) + 1
        if rounds:
            last = max(rounds)
            self.progress.update(self.task, completed=last,
                                 description=f"round {last} done, {rounds[last]}/{self.num_clients} clients replied")


def _config(app_dir: Path, overrides: dict[str, Any]) -> FederationConfig:
    """The validated run config: the app's defaults with ``overrides`` (ConfigError if bad)."""
    return parse_run_config({**_defaults(app_dir), **overrides})


_VARIANT = re.compile(r"\s*([a-z0-9][a-z0-9._-]*)\s*:(.*)", re.DOTALL)
#: keys a comparison sets for each of its runs
_SET_PER_RUN = ("seed", "run-name")


def parse_variants(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--variant "NAME: strategy=S key=value ..."`` (repeatable): strategy S under other run-config
    values, compared as one more method, in run folders of its own name (as the ablations are)."""
    variants: dict[str, dict[str, Any]] = {}
    for item in items:
        match = _VARIANT.fullmatch(item)
        if not match:
            raise typer.BadParameter(
                f"--variant expects 'NAME: strategy=S key=value ...' (NAME in lower case, digits, '.', '-', '_'), got {item!r}")
        name, pairs = match.groups()
        if name in STRATEGIES or name in ABLATIONS or name in variants:
            raise typer.BadParameter(f"--variant {name!r}: that name is taken by a strategy, an ablation or another variant")
        values = parse_overrides([pairs], option=f"--variant {name!r}")
        if values.get("strategy") not in STRATEGIES:
            raise typer.BadParameter(
                f"--variant {name!r} must name its strategy (strategy=S, one of {', '.join(STRATEGIES)}), "
                f"got {values.get('strategy')!r}")
        fixed = [key for key in _SET_PER_RUN if key in values]
        if fixed:
            raise typer.BadParameter(f"--variant {name!r}: {', '.join(fixed)} is set by the comparison for each run")
        variants[name] = values
    return variants


def method_overrides(app_dir: Path, overrides: dict[str, Any], method: str, seed: int,
                     variants: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The run config of one comparison run: a strategy, or an ablation or variant (a strategy with
    other settings, in a run folder of its own name)."""
    settings = ABLATIONS.get(method) or (variants or {}).get(method)
    if settings is None:
        return {**overrides, "strategy": method, "seed": seed}
    scenario = _config(app_dir, overrides).scenario.rsplit("/", 1)[-1].removesuffix(".json")
    return {**overrides, **settings, "seed": seed, "run-name": f"{scenario}-{method}-seed{seed}"}


def _run_one(
    app_dir: Path,
    overrides: dict[str, Any],
    flwr_home: Path,
    deployment_clients: list[str] | None = None,
    tls: bool = False,
    auth: bool = False,
    warm_workers: int = 0,
    clientapp_isolation: str = "process",
) -> dict[str, Any]:
    """Prepare, run one federation through Flower, check its status; returns the summary.

    By default on a simulation SuperLink; with ``deployment_clients`` on a local deployment
    (a SuperLink and one SuperNode process per client id, sharing ``warm_workers`` warm ClientApp
    workers, -1: one each; an empty list: every scenario client)."""
    config = _config(app_dir, overrides)
    if Path(config.scenario).is_absolute():  # a missing or malformed file fails before anything is built
        from drake_data.layout import load_scenario

        load_scenario(config.scenario)
    from fedmosaic_cli.launch import (
        claim_flwr_home,
        flwr_run,
        local_deployment,
        peak_memory,
        simulation_home,
        simulation_superlink,
    )
    from fedmosaic_flower.prepare import (  # torch: once the config is good
        load_run_scenario,
        prepare_data,
        prepare_models,
        scenario_path,
    )

    started = time.monotonic()
    preparing = "the scenario's models" if config.data_root else "DRAKE-mini, tiny models"
    typer.secho(f"Preparing {preparing} and A/B alignment (cached after the first run)...", fg=typer.colors.BLUE)
    data_root = prepare_data(config)
    scenario = load_run_scenario(config, data_root)
    known = {str(c.client_id) for c in scenario.clients}
    if deployment_clients is not None:
        deployment_clients = deployment_clients or sorted(known, key=int)
        unknown = [c for c in deployment_clients if c not in known]
        if unknown:
            typer.secho(f"unknown client id(s) {', '.join(unknown)}: scenario {config.scenario!r} has "
                        f"{', '.join(sorted(known, key=int))}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
    prepare_models(config, data_root)
    prepared_s = time.monotonic() - started
    if not config.data_root:
        overrides = {**overrides, "data-root": str(data_root)}
    if not config.output_dir:
        overrides = {**overrides, "output-dir": str(config.run_dir.parent)}
    cpus = config.torch_threads or (os.cpu_count() or 1)
    log_path = config.run_dir.parent / f"{config.run_dir.name}-flwr-run.log"
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} rounds"),
                        TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), transient=False)
    typer.secho(f"Running {config.strategy} on {config.scenario} via `flwr run`; Flower's log: {log_path}",
                fg=typer.colors.BLUE)
    if deployment_clients is None:
        with claim_flwr_home(simulation_home(flwr_home, config.run_dir)) as home, peak_memory() as peak, \
                simulation_superlink(home) as link, progress:
            watch = RoundProgress(progress, config.run_dir / "rounds.jsonl", config.num_server_rounds,
                                  len(scenario.clients))
            run_id, status = flwr_run(
                app_dir, link, run_config=overrides, num_supernodes=len(scenario.clients),
                num_cpus_per_client=cpus, log_path=log_path, on_wait=watch,
            )
    else:
        # wait for every SuperNode before the first round (they connect within seconds)
        overrides = {"min-clients": len(deployment_clients), **overrides}
        node_configs = [
            {"client-id": cid, "state-dir": str(config.run_dir / "supernode-state" / f"client-{cid}"),
             "data-root": str(data_root)}
            for cid in deployment_clients
        ]
        from fedmosaic_cli.tls import (
            write_certificates,
            write_superexec_secret,
            write_supernode_keys,
        )

        with claim_flwr_home(flwr_home):  # certificates, keys and sockets of one deployment at a time
            tls_files = write_certificates(flwr_home / "certificates") if tls else None
            # fresh keys every run: a key registered once cannot be registered again
            keys = write_supernode_keys(flwr_home / "keys", [f"client-{cid}" for cid in deployment_clients]) if auth else None
            secret = write_superexec_secret(flwr_home / "superexec.secret")
            with peak_memory() as peak, local_deployment(flwr_home, node_configs, tls=tls_files, supernode_keys=keys,
                                                         superexec_secret=secret, clientapp_isolation=clientapp_isolation,
                                                         warm_workers=len(deployment_clients) if warm_workers < 0
                                                         else warm_workers) as (link, _nodes), progress:
                watch = RoundProgress(progress, config.run_dir / "rounds.jsonl", config.num_server_rounds,
                                      len(deployment_clients))
                run_id, status = flwr_run(app_dir, link, run_config=overrides, log_path=log_path, on_wait=watch)
    elapsed = time.monotonic() - started
    if status != "finished:completed":
        raise RunFailed(f"Flower run {run_id} ended with status {status!r}; log: {log_path}")
    summary = json.loads((config.run_dir / "report" / "summary.json").read_text())
    # peak: resident memory of this command and every process it started (Flower's, the apps')
    summary["timing"] = {"prepare_s": round(prepared_s, 1), "total_s": round(elapsed, 1),
                         "peak_rss_gib": round(peak[0] / 2**30, 2)}
    summary["run_dir"] = str(config.run_dir)
    summary["strategy"] = config.strategy
    summary["seed"] = config.seed
    summary["data_root"] = str(data_root)
    summary["scenario_path"] = str(scenario_path(config, data_root))
    atomic_write_json(config.run_dir / "report" / "timing.json", summary["timing"])
    atomic_write_json(config.run_dir / "report" / FINISHED_RUN, {"config": config.model_dump(mode="json"), "summary": summary})
    return summary


FINISHED_RUN = "finished-run.json"  # a run that ended well: the config it was asked for and its summary


def _finished_summary(app_dir: Path, overrides: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of a run already finished under this run config, or None. A key the run's
    config lacks (one added to the config since) matches when it has its default here: a new key's
    default keeps the behaviour from before it existed."""
    config = _config(app_dir, overrides)
    path = config.run_dir / "report" / FINISHED_RUN
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    saved, current = record.get("config") or {}, config.model_dump(mode="json")
    defaults = type(config).model_validate({}).model_dump(mode="json")
    if set(saved) - set(current) or any(
            saved[k] != v if k in saved else v != defaults[k] for k, v in current.items()):
        return None
    summary: dict[str, Any] = record["summary"]
    late = _clients_with_stale_scores(summary, config)
    if late:
        log.warning("%s: client(s) %s have no scores of the last round they were selected for; running it again",
                    config.run_dir, ", ".join(late))
        return None
    return summary


def _clients_with_stale_scores(summary: dict[str, Any], config: FederationConfig) -> list[str]:
    """The clients whose scores stop before the last round they were due in: the last round they
    were selected for and, where every client trains in every round (``fraction-train`` 1), the
    run's last."""
    from fedmosaic_cli.comparison import clients_with_stale_scores

    return clients_with_stale_scores(summary, config.num_server_rounds if config.fraction_train >= 1.0 else None)


@app.command("main-job")
def main_job(
    run_config: list[str] = typer.Option([], "--run-config", "-c", help=RUN_CONFIG_HELP),
    app_dir: Path | None = typer.Option(None, help="Flower app folder (default: this checkout)"),
) -> None:
    """FedMosaic on DRAKE-mini with heterogeneous tiny models, via `flwr run`."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with expected_errors():
        summary = _run_one(_app_dir(app_dir), parse_overrides(run_config), cache_home() / "flwr-home")
    table = (Path(summary["run_dir"]) / "report" / "table.md").read_text()
    typer.echo(table)
    typer.echo(f"Report: {Path(summary['run_dir']) / 'report'}  (total {summary['timing']['total_s']} s, "
               f"of which preparation {summary['timing']['prepare_s']} s)")


@app.command("local-deployment")
def local_deployment_command(
    clients: str = typer.Option("", help="comma-separated client ids (default: every scenario client)"),
    run_config: list[str] = typer.Option([], "--run-config", "-c", help=RUN_CONFIG_HELP),
    app_dir: Path | None = typer.Option(None, help="Flower app folder (default: this checkout)"),
    tls: bool = typer.Option(True, "--tls/--insecure", help="TLS with a fresh self-signed CA (default) or none"),
    auth: bool | None = typer.Option(None, "--auth/--no-auth",
                                     help="SuperNode authentication: registered keys only (default with TLS)"),
    workers: int = typer.Option(-1, help="warm ClientApp workers: -1 one per SuperNode (default, as on separate "
                                         "hosts), K > 0 shared by the SuperNodes in turn, 0 none (every message "
                                         "answered in the fresh process Flower starts for it)"),
    clientapp_isolation: str = typer.Option(
        "process", click_type=click.Choice(["process", "subprocess"]),
        help="how each SuperNode starts its ClientApps: process (its own flower-superexec, as in "
             "docker-compose.yml) or subprocess (the SuperNode itself; one process less per node)"),
) -> None:
    """The app on a real Flower deployment on this host: a SuperLink and one SuperNode process
    per client (``--node-config client-id=… state-dir=… data-root=…``), as on separate hosts."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ids = [c.strip() for c in clients.split(",") if c.strip()]
    auth = tls if auth is None else auth
    if auth and not tls:
        typer.secho("error: SuperNode authentication needs TLS (use --no-auth with --insecure)", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    with expected_errors():
        summary = _run_one(_app_dir(app_dir), parse_overrides(run_config),
                           cache_home() / "flwr-home-deployment", deployment_clients=ids, tls=tls, auth=auth,
                           warm_workers=workers, clientapp_isolation=clientapp_isolation)
    typer.echo((Path(summary["run_dir"]) / "report" / "table.md").read_text())
    typer.echo(f"Report: {Path(summary['run_dir']) / 'report'}  (total {summary['timing']['total_s']} s)")


@app.command("client-worker")
def client_worker(
    socket_path: Path = typer.Option(..., "--socket", help="the Unix socket named by the SuperNode's "
                                                           "--node-config worker-socket"),
    idle_timeout: float = typer.Option(0.0, help="stop after this many seconds without a message (0: never)"),
) -> None:
    """A warm worker for one SuperNode's ClientApp: it keeps torch, the data and the model loaded
    and answers the messages its ClientApp processes hand it (see client_app/worker.py). Start it
    on the SuperNode's host, from the same app version, before the SuperNode."""
    from client_app.worker import serve
    from fedmosaic_flower.logs import setup_logging

    setup_logging()
    try:
        serve(socket_path, idle_timeout)
    except (RuntimeError, OSError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


@app.command()
def compare(
    strategies: str = typer.Option(",".join(["local", "fedavg", "feddpa", "ditto", "fedsim", "fedmosaic-uniform", "fedmosaic"]),
                                   help="comma-separated strategies and ablations ("
                                        + ", ".join(ABLATIONS) + ")"),
    seeds: str = typer.Option("0,1,2,3,4", help="comma-separated seeds (paired statistics need several)"),
    reference: str = typer.Option("local", help="method the paired differences are taken against"),
    run_config: list[str] = typer.Option([], "--run-config", "-c", help=RUN_CONFIG_HELP),
    variant: list[str] = typer.Option(
        [], "--variant",
        help="one more method: \"NAME: strategy=S key=value ...\", a strategy under other run-config values, "
             "run in folders named NAME and compared like the strategies (repeatable)"),
    out: Path | None = typer.Option(None, help="where to write comparison.{md,json,png}"),
    app_dir: Path | None = typer.Option(None, help="Flower app folder (default: this checkout)"),
    reuse_finished: bool = typer.Option(
        False, "--reuse-finished",
        help="reuse each run that already finished under the same run config (keys added since at "
             "their defaults; e.g. to complete an "
             "interrupted comparison); code changes since are not detected"),
) -> None:
    """Run the baselines and FedMosaic on the same scenario and seeds; write the comparison with
    95 % intervals, paired differences to the reference, per-client chance levels and relevance AUROC."""
    from fedmosaic_cli.comparison import (
        build_comparison,
        client_chance_and_groups,
        task_skills,
        write_comparison,
    )

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    directory = _app_dir(app_dir)
    names = [s.strip() for s in strategies.split(",") if s.strip()]
    for name in names:
        if name not in STRATEGIES and name not in ABLATIONS:
            raise typer.BadParameter(
                f"unknown strategy {name!r}; expected some of {', '.join([*STRATEGIES, *ABLATIONS])}")
    variants = parse_variants(variant)
    names += list(variants)
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"seeds must be comma-separated integers, got {seeds!r}") from None
    overrides = parse_overrides(run_config)
    with expected_errors():  # every method's config checked before the first run starts
        for name in names:
            _config(directory, method_overrides(directory, overrides, name, seed_list[0] if seed_list else 0, variants))
    per_seed: dict[str, list[dict[str, Any]]] = {}
    for seed in seed_list:
        for name in names:
            run_overrides = method_overrides(directory, overrides, name, seed, variants)
            with expected_errors():
                summary = (_finished_summary(directory, run_overrides) if reuse_finished else None) or _run_one(
                    directory, run_overrides, cache_home() / "flwr-home")
                late = _clients_with_stale_scores(summary, _config(directory, run_overrides))
                if late:  # A_last of an earlier round would enter the paired differences unnoticed
                    left_out = summary.get("left_out") or {}
                    why = "; ".join(f"{c} round {r}: {reason}" for c in late for r, reason in left_out.get(c, {}).items())
                    raise RunFailed(
                        f"{summary['run_dir']}: client(s) {', '.join(late)} have no scores of the last "
                        "round they were selected for (the round timed out or they dropped out; see its "
                        f"flwr-run log{': ' + why if why else ''}), so their A_last is of an earlier round: "
                        "run it again, with a longer round-timeout on a busy machine")
            per_seed.setdefault(name, []).append(summary)
    first = next(iter(per_seed.values()))[0]
    chance, others_chance, groups = client_chance_and_groups(Path(first["data_root"]), Path(first["scenario_path"]))
    comparison = build_comparison(per_seed, reference=reference, chance=chance, group_of=groups,
                                  skill_of=task_skills(Path(first["data_root"])),
                                  others_chance=others_chance)
    target = out or (cache_home() / "comparisons" / time.strftime("%Y%m%d-%H%M%S"))
    table = write_comparison(comparison, target)
    typer.echo(table)
    typer.echo(f"Comparison written to {target}")


@app.command()
def certificates(
    out: Path = typer.Option(..., help="folder for ca.crt, server.pem, server.key (and ca.key)"),
    host: list[str] = typer.Option(["127.0.0.1", "localhost"], help="SuperLink host name or IP (repeat)"),
    days: int = typer.Option(365, help="validity in days"),
    supernode: list[str] = typer.Option([], help="also a key pair keys/NAME(.pub) for this SuperNode (repeat)"),
    if_missing: bool = typer.Option(False, "--if-missing", help="do nothing when OUT/ca.crt exists (compose restarts)"),
) -> None:
    """A self-signed CA and a SuperLink server certificate for TLS, SuperNode keys for
    authentication and the SuperExec secret for process isolation (see deploy/README.md)."""
    from fedmosaic_cli.tls import write_certificates, write_superexec_secret, write_supernode_keys

    if if_missing and (out / "ca.crt").is_file():
        typer.echo(f"{out / 'ca.crt'} exists: keeping the certificates and keys in {out}")
        return
    try:
        files = write_certificates(out, host, days)
        keys = write_supernode_keys(out / "keys", supernode) if supernode else []
    except ValueError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    secret = write_superexec_secret(out / "superexec.secret")
    typer.echo(f"SuperLink: {' '.join(files.superlink_args())} --enable-supernode-auth")
    typer.echo(f"SuperNodes and flwr CLI: {' '.join(files.client_args())}")
    typer.echo(f"SuperLink, SuperNodes and SuperExecs (--isolation process): --superexec-auth-secret-file {secret}")
    for key in keys:
        typer.echo(f"SuperNode {key.name}: {' '.join(key.supernode_args())} (register {key.public_key})")


@app.command("register-supernodes")
def register_supernodes(
    public_keys: list[Path] = typer.Argument(..., help="the SuperNodes' public keys (keys/NAME.pub)"),
    connection: str = typer.Option("", help="a SuperLink connection of $FLWR_HOME/config.toml"),
    superlink: str = typer.Option("", help="or the SuperLink's address (host:port), with --root-certificates"),
    root_certificates: Path | None = typer.Option(None, help="the CA certificate that signed the SuperLink's"),
    exist_ok: bool = typer.Option(False, "--exist-ok", help="a key already in use is not an error (compose restarts)"),
) -> None:
    """Register SuperNode public keys with a SuperLink started with ``--enable-supernode-auth``
    (``flwr supernode register`` for each); prints each node id. A key that was registered and
    later removed stays "in use" and is refused: make a new key for that SuperNode."""
    import tempfile

    from fedmosaic_cli.launch import flwr_register, write_connection

    def fail(message: str) -> NoReturn:
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)

    if bool(connection) == bool(superlink):
        fail("give either --connection or --superlink (with --root-certificates)")
    if superlink and (root_certificates is None or not root_certificates.is_file()):
        fail(f"--superlink needs --root-certificates pointing to the CA file, got {root_certificates}")
    for key in public_keys:
        if not key.is_file():
            fail(f"{key}: public key file not found")
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="fedmosaic-flwr-home-") as home:
        if superlink:
            assert root_certificates is not None
            connection = "fedmosaic-register"
            write_connection(Path(home), connection, superlink, root_certificates.resolve())
            env["FLWR_HOME"] = home
        failed = False
        for key in public_keys:
            name = key.name.removesuffix(".pub")
            node_id, reason = flwr_register(key, name, connection, env)
            if node_id is not None:
                typer.echo(f"{name}: node id {node_id}")
            elif exist_ok and "already in use" in reason:
                typer.echo(f"{name}: already registered")
            else:
                failed = True
                typer.secho(f"error: {name}: {reason}", fg=typer.colors.RED, err=True)
    if failed:
        raise typer.Exit(1)


@app.command()
def export(
    run: str = typer.Option(..., help="a finished run: its folder, or its name under $FEDMOSAIC_CACHE/runs"),
    client: str = typer.Option(..., help="the client id to export"),
    out: Path = typer.Option(..., help="folder to write (new, or empty)"),
    state_dir: Path | None = typer.Option(None, help="where the client's state is (default: the run's clients/; "
                                                     "in a deployment, its SuperNode's state-dir)"),
    beta_samples: int = typer.Option(32, help="own training samples per task the gates' mean β is taken over"),
    eval_samples: int = typer.Option(0, help="test samples per own task scored gated and merged (0: all)"),
) -> None:
    """Write one client's personal model: a merged Hugging Face checkpoint (the gate fixed at its mean
    β per module) and a peft LoRA adapter that reproduces it on the base, both checked by reloading."""
    from client_app.export import ExportError, export_client, open_finished_client

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_dir = Path(run).expanduser()
    if not run_dir.is_dir() and "/" not in run:
        run_dir = cache_home() / "runs" / run
    with expected_errors():
        try:
            finished = open_finished_client(run_dir, client, state_dir)
            report = export_client(finished, out, beta_samples=beta_samples, eval_samples=eval_samples,
                                   progress=typer.echo)
        except ExportError as err:
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
    rows = "\n".join(f"| {task} | {report['self_gated'][task]:.1f} | {report['self_merged'][task]:.1f} | "
                     f"{report['self_gap'][task]:+.1f} |" for task in report["self_gated"])
    typer.echo(f"client {client} ({report['model']}, {report['strategy']}, round {report['round']}); "
               f"mean β {report['beta']['mean']:.3f} (per module {report['beta']['min']:.3f}-{report['beta']['max']:.3f})\n"
               f"| task | gated | merged | merged − gated |\n|---|---|---|---|\n{rows}\n"
               f"merged checkpoint: {out / 'model'}\npeft adapter:      {out / 'peft-adapter'} (base: {report['base']})")


@app.command()
def prepare(
    run_config: list[str] = typer.Option([], "--run-config", "-c", help=RUN_CONFIG_HELP),
    app_dir: Path | None = typer.Option(None, help="Flower app folder (default: this checkout)"),
) -> None:
    """Build DRAKE-mini, prepare the tiny models and align A/B (what the first run does)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with expected_errors():
        config = _config(_app_dir(app_dir), parse_overrides(run_config))
        from fedmosaic_flower.prepare import prepare_federation  # torch: once the config is good

        typer.echo(f"Prepared; data at {prepare_federation(config)}")


@app.command("build-drake-text")
def build_drake_text_command(
    out: Path = typer.Option(..., help="folder to write DRAKE-text into"),
    seed: int = typer.Option(0, help="seed of the generated tasks and option orders"),
) -> None:
    """Build DRAKE-text, the text-only benchmark for real pretrained LLMs (SmolLM2-135M and
    Gemma-3-270M clients); run it with -c "data-root='OUT' scenario='real-two-families'"."""
    from drake_data.text.builder import build_drake_text

    with expected_errors():
        typer.echo(f"DRAKE-text (seed {seed}) at {build_drake_text(out, seed)}")


@app.command("prepare-models")
def prepare_models(
    presets: list[str] = typer.Option(None, "--presets", help="tiny presets to prepare (default: all)"),
    seed: int = typer.Option(0, help="seed of the preparation (and of DRAKE-mini when it is built)"),
    public_data: Path | None = typer.Option(None, help="a DRAKE-mini root (default: built in the cache)"),
    cache_dir: Path | None = typer.Option(None, help="cache root (default: $FEDMOSAIC_CACHE)"),
    threads: int = typer.Option(1, help="torch threads (tiny models gain little from more)"),
) -> None:
    """Pretrain and cache the tiny presets on DRAKE-mini's public split."""
    import torch

    from fedmosaic_core.models.pretrain import prepare_presets
    from fedmosaic_flower.prepare import DrakePublicSplit, default_public_data_root

    torch.set_num_threads(threads)
    with expected_errors():
        root = public_data or default_public_data_root(seed, cache_dir)
        start = time.perf_counter()
        prepared = prepare_presets(DrakePublicSplit(root), cache_dir, seed, presets or None)
    for name, directory in prepared.items():
        record = json.loads((directory / "prepare.json").read_text(encoding="utf-8"))
        before, after = record["before"], record["after"]
        typer.echo(f"{name}: {directory}\n  held-out answer loss {before['held_out_answer_loss']:.2f} -> "
                   f"{after['held_out_answer_loss']:.2f}; {record['train_seconds']:.1f} s training")
    typer.echo(f"total {time.perf_counter() - start:.1f} s")


@app.command()
def align(
    anchor: str = typer.Option(..., help="the smallest model of the federation (preset, path or hub id)"),
    other: list[str] = typer.Option(..., help="a model to align to the anchor (repeat)"),
    out: Path = typer.Option(..., help="folder for one A/B file per architecture"),
    r: int = typer.Option(16, help="PQ-LoRA rank"),
    seed: int = typer.Option(0, help="PQ-LoRA seed of the anchor's A/B"),
    public_data: Path | None = typer.Option(None, help="a DRAKE-mini root (default: built in the cache)"),
    quantization: str = typer.Option("none", help="none, nf4 or int8"),
) -> None:
    """Align the PQ layers' A/B of other architectures to an anchor's, on public data."""
    import torch

    from fedmosaic_core.models.align import (
        AlignConfig,
        align_bases,
        alignment_summary,
        anchor_aligned_bases,
        save_aligned_bases,
    )
    from fedmosaic_core.models.loading import load_model
    from fedmosaic_flower.prepare import DrakePublicSplit, default_public_data_root

    torch.manual_seed(seed)
    config = AlignConfig(r=r, seed=seed)
    with expected_errors():
        public = DrakePublicSplit(public_data or default_public_data_root(0))
        samples = public.samples()
        anchor_model = load_model(anchor, quantization=quantization, public_split=public)  # type: ignore[arg-type]
        typer.echo(f"anchor {anchor}: {save_aligned_bases(anchor_aligned_bases(anchor_model, config), out)}")
        for name in other:
            bases = align_bases(anchor_model, load_model(name, quantization=quantization, public_split=public),  # type: ignore[arg-type]
                                samples, config)
            typer.echo(f"{name}: {save_aligned_bases(bases, out)}\n  {alignment_summary(bases.metrics)}")


if __name__ == "__main__":
    app()
