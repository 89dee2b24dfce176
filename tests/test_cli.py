"""The command line: Flower's --run-config syntax and one line per expected error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from cli_process import ROOT, run_fedmosaic

from fedmosaic_cli.main import parse_overrides


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


def test_help_and_a_bad_config_answer_without_loading_torch() -> None:
    """The command line loads torch only for work that needs it: ``--help`` and a config error
    answer in about a second, not after the several seconds torch and transformers take."""
    probe = ("import sys; from typer.testing import CliRunner; from fedmosaic_cli.main import app; "
             "runner = CliRunner(); assert runner.invoke(app, ['certificates', '--help']).exit_code == 0; "
             "result = runner.invoke(app, ['main-job', '-c', 'local-steps=0']); "
             "assert result.exit_code == 2, result.output; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_user_errors_exit_2_run_failures_1_and_bugs_keep_their_traceback() -> None:
    from fedmosaic_cli.launch import LaunchError
    from fedmosaic_cli.main import RunFailed, expected_errors
    from fedmosaic_core.models.align import AlignmentError
    from fedmosaic_flower.config import ConfigError

    for error, status in ((ConfigError("x"), 2), (AlignmentError("x"), 2), (FileNotFoundError("x"), 2),
                          (LaunchError("x"), 1), (RunFailed("x"), 1)):
        with pytest.raises(typer.Exit) as exited, expected_errors():
            raise error
        assert exited.value.exit_code == status, error
    with pytest.raises(KeyError), expected_errors():
        raise KeyError("a bug")


def test_compare_reuses_only_a_run_finished_under_the_same_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmosaic_cli.main import FINISHED_RUN, _app_dir, _config, _finished_summary
    from fedmosaic_core.storage import atomic_write_json

    monkeypatch.setenv("FEDMOSAIC_CACHE", str(tmp_path))
    app = _app_dir(None)
    asked = {"strategy": "local", "seed": 3, "output-dir": str(tmp_path / "runs")}
    assert _finished_summary(app, asked) is None  # nothing ran
    config = _config(app, asked)
    atomic_write_json(config.run_dir / "report" / FINISHED_RUN,
                      {"config": config.model_dump(mode="json"), "summary": {"seed": 3, "strategy": "local"}})
    assert _finished_summary(app, asked) == {"seed": 3, "strategy": "local"}
    assert _finished_summary(app, {**asked, "local-steps": 5}) is None  # same run name, other settings
    # a run finished before a config key existed: the same config while the key keeps its default
    older = {k: v for k, v in config.model_dump(mode="json").items() if k != "share_across_families"}
    atomic_write_json(config.run_dir / "report" / FINISHED_RUN, {"config": older, "summary": {"seed": 3}})
    assert _finished_summary(app, asked) == {"seed": 3}
    assert _finished_summary(app, {**asked, "share-across-families": False}) is None
    atomic_write_json(config.run_dir / "report" / FINISHED_RUN,
                      {"config": {**older, "retired_key": 1}, "summary": {"seed": 3}})
    assert _finished_summary(app, asked) is None  # a key that no longer exists: not the same config
    # a run whose last round timed out for a client: not finished well, so it runs again
    rounds = config.num_server_rounds
    complete = {"seed": 3, "clients": {"0": {"last_round": rounds}, "1": {"last_round": rounds}}}
    atomic_write_json(config.run_dir / "report" / FINISHED_RUN, {"config": config.model_dump(mode="json"), "summary": complete})
    assert _finished_summary(app, asked) == complete
    late = {"seed": 3, "clients": {"0": {"last_round": rounds}, "1": {"last_round": rounds - 1}}}
    atomic_write_json(config.run_dir / "report" / FINISHED_RUN, {"config": config.model_dump(mode="json"), "summary": late})
    assert _finished_summary(app, asked) is None


def test_compare_refuses_a_run_whose_last_round_lacks_a_clients_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A round that timed out leaves the clients' A_last at an earlier round: the comparison stops
    with one line naming the run and the clients instead of pairing it with complete runs."""
    from typer.testing import CliRunner

    import fedmosaic_cli.main as cli

    monkeypatch.setenv("FEDMOSAIC_CACHE", str(tmp_path))
    rounds = cli._config(cli._app_dir(None), {}).num_server_rounds
    summary = {"run_dir": str(tmp_path / "run"), "seed": 0, "strategy": "local",
               "clients": {"0": {"last_round": rounds}, "3": {"self_curve": [[1, 0.2], [rounds - 1, 0.3]]}},
               "left_out": {"3": {str(rounds): "did not reply in time"}}}
    monkeypatch.setattr(cli, "_run_one", lambda *args, **kwargs: summary)
    result = CliRunner().invoke(cli.app, ["compare", "--strategies", "local", "--seeds", "0"])
    assert result.exit_code == 1
    output = " ".join(result.output.split())  # rich wraps the line
    assert f"{tmp_path / 'run'}: client(s) 3 have no scores of the last round they were selected for" in output
    assert f"3 round {rounds}: did not reply in time" in output


def test_compare_runs_ablations_in_run_folders_of_their_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmosaic_cli.main import _app_dir, _config, method_overrides

    monkeypatch.setenv("FEDMOSAIC_CACHE", str(tmp_path))
    app = _app_dir(None)
    plain = _config(app, method_overrides(app, {}, "fedmosaic", 2))
    pq_only = _config(app, method_overrides(app, {}, "fedmosaic-pq-only", 2))
    half = _config(app, method_overrides(app, {"scenario": "two-sizes"}, "fedmosaic-beta-half", 1))
    assert (plain.strategy, plain.share_same_arch, plain.fixed_beta) == ("fedmosaic", True, -1.0)
    assert (pq_only.strategy, pq_only.share_same_arch, pq_only.seed) == ("fedmosaic", False, 2)
    assert (half.strategy, half.fixed_beta, half.resolved_run_name) == ("fedmosaic", 0.5, "two-sizes-fedmosaic-beta-half-seed1")
    assert len({plain.run_dir, pq_only.run_dir}) == 2


def test_one_launch_per_flwr_home_and_a_home_per_simulation_run(tmp_path: Path) -> None:
    """Two launches on one FLWR_HOME would share its config.toml, so one's ``flwr ls`` could poll the
    other's SuperLink: the second claim fails at once and names the holder; the lock goes with the
    process, also a killed one. Simulations of other run folders get homes of their own."""
    from fedmosaic_cli.launch import HOME_LOCK, LaunchError, claim_flwr_home, simulation_home

    home = tmp_path / "flwr-home"
    with claim_flwr_home(home):
        with pytest.raises(LaunchError, match=rf"{home} is in use by another fedmosaic launch \(pid {os.getpid()}\)"):
            with claim_flwr_home(home):
                pass
    with claim_flwr_home(home):  # released on exit
        pass

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from fedmosaic_cli.launch import claim_flwr_home\n"
         f"with claim_flwr_home(Path({str(home)!r})):\n    print('held', flush=True); time.sleep(300)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LaunchError, match=f"pid {holder.pid}"), claim_flwr_home(home):
            pass
        holder.kill()
        holder.wait(timeout=30)
        with claim_flwr_home(home):  # a killed holder leaves no stale lock
            assert (home / HOME_LOCK).read_text() == str(os.getpid())
    finally:
        holder.kill()
        holder.wait(timeout=30)

    runs = tmp_path / "runs"
    seed0, seed1 = simulation_home(home, runs / "two-families-local-seed0"), simulation_home(home, runs / "two-families-local-seed1")
    elsewhere = simulation_home(home, tmp_path / "other" / "two-families-local-seed0")
    assert len({seed0, seed1, elsewhere}) == 3 and seed0.parent == home
    assert simulation_home(home, runs / "two-families-local-seed0") == seed0


@pytest.mark.slow
def test_a_simulation_superlink_keeps_no_state_on_disk(tmp_path: Path) -> None:
    """A database in the run's FLWR_HOME would outlive a stopped command, and the next SuperLink on
    it would start the run left pending there again, beside the new one (seen: two ServerApps
    writing one run folder). The simulation SuperLink keeps its state in memory."""
    from fedmosaic_cli.launch import simulation_superlink

    home = tmp_path / "flwr-home"
    with simulation_superlink(home) as link:
        assert link.process.poll() is None
        assert not list(home.glob("state.db*"))
    assert link.process.poll() is not None
    assert not list(home.glob("state.db*"))


def _compare_without_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[list[dict], dict]:
    """``compare`` with its runs and its table replaced by recorders: which runs it would start."""
    import fedmosaic_cli.comparison as comparison
    import fedmosaic_cli.main as cli

    monkeypatch.setenv("FEDMOSAIC_CACHE", str(tmp_path))
    started: list[dict] = []
    compared: dict = {}

    def run_one(app_dir: Path, overrides: dict, flwr_home: Path) -> dict:
        started.append(overrides)
        return {"run_dir": str(tmp_path / "run"), "seed": overrides["seed"], "clients": {},
                "data_root": str(tmp_path), "scenario_path": str(tmp_path / "scenario.json")}

    monkeypatch.setattr(cli, "_run_one", run_one)
    monkeypatch.setattr(comparison, "client_chance_and_groups", lambda *args: ({}, {}, {}))
    monkeypatch.setattr(comparison, "task_skills", lambda *args: {})
    monkeypatch.setattr(comparison, "build_comparison", lambda per_seed, **kwargs: compared.update(per_seed) or {})
    monkeypatch.setattr(comparison, "write_comparison", lambda *args: "table")
    return started, compared


def test_compare_runs_a_variant_as_one_more_method_in_folders_of_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import fedmosaic_cli.main as cli

    started, compared = _compare_without_runs(monkeypatch, tmp_path)
    result = CliRunner().invoke(cli.app, [
        "compare", "--strategies", "local,fedmosaic", "--seeds", "0,1", "-c", "tau=0.3",
        "--variant", "fedmosaic-tau0.1: strategy=fedmosaic tau=0.1 local-steps=8"])
    assert result.exit_code == 0, result.output
    assert list(compared) == ["local", "fedmosaic", "fedmosaic-tau0.1"]
    app = cli._app_dir(None)
    configs = [cli._config(app, overrides) for overrides in started]
    assert [(c.strategy, c.seed, c.tau, c.local_steps) for c in configs] == [
        ("local", 0, 0.3, 32), ("fedmosaic", 0, 0.3, 32), ("fedmosaic", 0, 0.1, 8),
        ("local", 1, 0.3, 32), ("fedmosaic", 1, 0.3, 32), ("fedmosaic", 1, 0.1, 8)]
    assert configs[2].resolved_run_name == "two-families-fedmosaic-tau0.1-seed0"
    assert len({c.run_dir for c in configs}) == 6


@pytest.mark.parametrize(
    ("variant", "line"),
    [
        ("tau0.1 tau=0.1", "--variant expects 'NAME: strategy=S key=value ...'"),
        ("fedavg: strategy=fedavg", "--variant 'fedavg': that name is taken"),
        ("sharp: tau=0.1", "--variant 'sharp' must name its strategy"),
        ("sharp: strategy=fedmosaic seed=3", "--variant 'sharp': seed is set by the comparison"),
        ("sharp: strategy=fedmosaic tua=0.1", "tua"),
        ("sharp: strategy=fedmosaic tau", "--variant 'sharp' expects key=value pairs"),
    ],
)
def test_a_bad_variant_is_one_error_before_any_run(
        variant: str, line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import fedmosaic_cli.main as cli

    started, _ = _compare_without_runs(monkeypatch, tmp_path)
    result = CliRunner().invoke(cli.app, ["compare", "--strategies", "local", "--seeds", "0", "--variant", variant])
    assert result.exit_code == 2
    assert line in " ".join(result.output.split())
    assert started == []
