"""Load: 20 SuperNodes × 3 rounds through ``fedmosaic local-deployment`` on loopback (in ``make
test``, in the deployment tests' pytest process; alone: ``make load-test``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cli_process import run_fedmosaic
from test_deployment import _processes_mentioning

from drake_data.mini.builder import build_drake_mini, write_scaled_scenario
from fedmosaic_cli.launch import worker_socket

pytestmark = pytest.mark.xdist_group("deployment")


@pytest.mark.load
def test_twenty_supernodes_run_three_rounds_and_lose_no_message(tmp_path: Path) -> None:
    """Load: 20 SuperNodes × 3 rounds on loopback through ``fedmosaic local-deployment``, the
    cheapest way that is still a real deployment: no TLS or
    authentication (the SIGTERM and separate-hosts tests run those), each SuperNode starting a
    fresh ClientApp process for each of the 80 messages itself (``--clientapp-isolation
    subprocess``), two warm workers shared by the nodes. Every client answers every round; the
    wall time and the peak memory of the whole process tree are printed (BENCHMARKS.md)."""
    clients, workers = 20, 2
    data_root = build_drake_mini(tmp_path / "mini", seed=0, size="tiny")
    scenario = write_scaled_scenario(data_root, clients)
    settings = [f"data-root='{data_root}'", f"scenario='{scenario}'", "num-server-rounds=3", "local-steps=2",
                "eval-max-samples=2", "eval-others-max-samples=2", "rounds-per-task=1", "pretrained=false",
                "align-bases=false", "eval-unseen=false", "batch-size=4", "run-name='load'"]
    started = time.monotonic()
    flags = ["--insecure", "--workers", str(workers), "--clientapp-isolation", "subprocess"]
    result = run_fedmosaic(["local-deployment", *flags, *(a for item in settings for a in ("-c", item))],
                           tmp_path / "cache", timeout=1500)
    wall = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-4000:]
    run_dir = tmp_path / "cache" / "runs" / "load"
    rows = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    expected = sorted((r, str(c)) for r in (1, 2, 3) for c in range(clients))
    assert sorted((r["round"], str(r["client"])) for r in rows) == expected  # no reply lost
    # each SuperNode kept its client's state where its --node-config said, keyed by the client id
    for cid in range(clients):
        state = run_dir / "supernode-state" / f"client-{cid}"
        assert list(state.rglob("*.safetensors")), f"no adapter state for client {cid}"
    assert not (run_dir / "clients").exists()
    home = tmp_path / "cache" / "flwr-home-deployment"
    # every message went to its SuperNode's warm worker (node i → worker i mod 2), none was answered cold
    for index in range(workers):
        text = (home / f"client-worker-{index}.log").read_text()
        assert text.count("answered query") == clients // workers and text.count("answered train") == 3 * clients // workers
    # the SuperNodes started their ClientApps themselves: no SuperExec per node
    assert not list(home.glob("superexec-clientapp-*.log"))
    timing = json.loads((run_dir / "report" / "timing.json").read_text())
    print(f"\n{clients} SuperNodes x 3 rounds: wall {wall:.1f} s, rounds {[rows[i * clients]['round_time_s'] for i in range(3)]} s, "
          f"peak RSS {timing['peak_rss_gib']} GiB")
    assert 0 < timing["peak_rss_gib"] < 16
    # the SuperLink, SuperNodes, SuperExecs and workers the launcher started are gone, and the
    # workers' socket folder with them
    assert not _processes_mentioning(str(tmp_path))
    assert not _processes_mentioning(str(worker_socket(home, 0).parent))
    assert not worker_socket(home, 0).parent.exists()
