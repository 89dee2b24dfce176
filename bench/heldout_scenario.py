"""A scenario in the style of the issue-11 held-out check: DRAKE-mini's client tasks and models,
regrouped at random.

From the shipped two-families scenario it keeps every client's first task and the multiset of
models, then, with its own seed:
* deals the second tasks out again so that every client's second task is of another skill than its
  first (so the peers relevant to a client change at the task shift);
* deals the models out again (three of each, as in two families).

Run: ``python bench/heldout_scenario.py DATA_ROOT OUT.json --seed 11`` and pass the absolute path
as the run config's ``scenario``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from drake_data.layout import load_scenario, write_scenario
from fedmosaic_cli.comparison import task_skills


def regroup(data_root: Path, seed: int) -> list[dict]:
    base = load_scenario(data_root / "scenario-two-families.json", data_root)
    skill = task_skills(data_root)
    clients = base.clients
    if any(len(c.datasets) != 2 for c in clients):
        raise ValueError(f"{base.source}: expected two tasks per client")
    rng = np.random.default_rng(seed)
    seconds = [c.datasets[1] for c in clients]
    for _ in range(10_000):
        order = rng.permutation(len(seconds))
        if all(skill[seconds[k].key] != skill[c.datasets[0].key] for c, k in zip(clients, order, strict=True)):
            break
    else:
        raise RuntimeError("no cross-skill deal found")
    models = [clients[k].model_id for k in rng.permutation(len(clients))]
    return [{"client_id": c.client_id, "model_id": models[i],
             "datasets": [c.datasets[0].model_dump(), seconds[order[i]].model_dump()]}
            for i, c in enumerate(clients)]


def main(data_root: Path, out: Path, seed: int = typer.Option(11, help="seed of the regrouping")) -> None:
    entries = regroup(data_root, seed)
    write_scenario(out, entries)
    load_scenario(out, data_root)
    for e in entries:
        print(e["client_id"], e["model_id"], ", ".join(f"{d['dataset']}-{d['subset_id']}" for d in e["datasets"]))


if __name__ == "__main__":
    typer.run(main)
