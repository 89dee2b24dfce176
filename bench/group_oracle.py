"""How much a client could gain from its skill group at best: each skill group run as its own
federation (an oracle that knows the groups), paired against local training.

``split`` writes one scenario per skill group (the clients whose tasks have the same skill set,
with their own client ids; they run in simulation as they are). Run ``fedmosaic compare`` on each
(same strategies and seeds), then ``summary`` pools the groups: per seed, the mean over all
clients (each group weighted by its clients), and the paired difference to ``local``; then the
same per group, and for the clients with and without a same-model peer in their group apart.
``by-task`` splits Self A_last by where a task sits in its client's stream: the first task, a later
task whose kind another client of the run trained before it, or a later task new to the run
(on a full scenario too).

Inside a group run, *Others* is the group peers' tasks (Others of the own skill; on a full
scenario, every other client's tasks); Self is the client's own tasks as in the full scenario,
and a client's ``local`` run does not depend on which other clients exist, so local's Self here
is its Self in the full scenario.

    python bench/group_oracle.py split DATA_ROOT/scenario-homogeneous.json DATA_ROOT OUT_DIR
    fedmosaic compare --strategies local,fedavg,fedmosaic --seeds 5,6,7,8,9 \\
        -c "scenario='OUT_DIR/scenario-homogeneous-digits.json'" --out OUT_DIR/compare-digits   # each group
    python bench/group_oracle.py summary OUT_DIR/compare-digits OUT_DIR/compare-colours ...
    python bench/group_oracle.py by-task OUT_DIR/compare-digits OUT_DIR/compare-colours ...
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import typer

from drake_data.layout import load_scenario, write_scenario
from fedmosaic_cli.comparison import mean_interval, run_rows, task_skills
from fedmosaic_flower.prepare import scenario_path

app = typer.Typer(add_completion=False)
METRICS = {"self_last": "Self A_last", "self_auc": "Self A_AUC", "others_last": "Others A_last"}


@app.command()
def split(scenario_file: Path, data_root: Path, out_dir: Path) -> None:
    """One scenario file per skill set, named ``<scenario>-<skills>.json``."""
    scenario = load_scenario(scenario_file, data_root)
    skill = task_skills(data_root)
    if not skill:
        raise typer.BadParameter(f"{data_root}: no tasks.json with the tasks' skills")
    groups: dict[str, list[dict]] = {}
    for client in scenario.clients:
        skills = "+".join(sorted({skill[t.key] for t in client.datasets}))
        groups.setdefault(skills, []).append(client.model_dump(mode="json", exclude_none=True))
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = scenario_file.stem
    for skills, clients in groups.items():
        if len(clients) < 2:
            typer.echo(f"{skills}: one client only, skipped")
            continue
        path = write_scenario(out_dir / f"{stem}-{skills}.json", clients)
        typer.echo(f"{path}: clients {', '.join(str(c['client_id']) for c in clients)}")


ALSO_HELP = ("NAME=DIR: the reference method of comparison DIR joins as method NAME (repeat the option once per "
             "compare dir, in their order), e.g. local training on a copy of the data")


def _comparisons(compare_dirs: list[Path], also: list[str], reference: str) -> dict[str, dict]:
    """Each compare dir's ``comparison.json`` by folder name; with ``also``, the ``reference``
    method of each further comparison added under a name of its own, the i-th of a name to the
    i-th compare dir."""
    groups = {d.name: json.loads((d / "comparison.json").read_text()) for d in compare_dirs}
    extra: dict[str, list[Path]] = {}
    for spec in also:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise typer.BadParameter(f"--also {spec!r}: expected NAME=DIR")
        extra.setdefault(name, []).append(Path(folder))
    for name, folders in extra.items():
        if len(folders) != len(groups):
            raise typer.BadParameter(f"--also {name}: {len(folders)} folder(s) for {len(groups)} compare dir(s)")
        for comparison, folder in zip(groups.values(), folders, strict=True):
            if name in comparison["methods"]:
                raise typer.BadParameter(f"--also {name}: a method of that name is already compared")
            other = json.loads((folder / "comparison.json").read_text())["methods"]
            if reference not in other:
                raise typer.BadParameter(f"--also {name}: {folder} has no {reference!r} runs")
            comparison["methods"][name] = other[reference]
    return groups


def _methods_and_seeds(comparisons: list[dict], reference: str) -> tuple[list[str], list[int]]:
    """The methods every comparison holds, ``reference`` first, and the seeds all of them ran."""
    found = [m for m in comparisons[0]["methods"] if all(m in c["methods"] for c in comparisons)]
    if reference not in found:
        raise typer.BadParameter(f"{reference!r} is not in every comparison (have {', '.join(found)})")
    methods = [reference] + [m for m in found if m != reference]
    return methods, sorted(set.intersection(*(set(c["methods"][m]["seeds"]) for c in comparisons for m in methods)))


def _per_seed(comparison: dict, method: str, metric: str) -> dict[int, float]:
    entry = comparison["methods"][method]
    return dict(zip(entry["seeds"], entry[metric]["per_seed"], strict=True))


@app.command()
def summary(
    compare_dirs: list[Path],
    reference: str = typer.Option("local", help="the method paired against"),
    also: list[str] = typer.Option([], help=ALSO_HELP),
) -> None:
    """Mean ± 95 % over seeds of the client-weighted pool of the groups, and the paired difference
    to ``reference``; then the same per group."""
    groups = _comparisons(compare_dirs, also, reference)
    methods, seeds = _methods_and_seeds(list(groups.values()), reference)
    sizes = {name: len(c["methods"][reference]["clients"]) for name, c in groups.items()}
    total = sum(sizes.values())

    def pooled(method: str, metric: str) -> list[float]:
        per_group = {name: _per_seed(c, method, metric) for name, c in groups.items()}
        return [sum(sizes[g] * per_group[g][s] for g in groups) / total for s in seeds]

    def cell(values: list[float], signed: bool = True) -> str:
        stat = mean_interval([100 * v for v in values])
        return f"{stat['mean']:{'+' if signed else ''}.1f} ± {stat['ci95']:.1f}"

    typer.echo(f"Seeds {seeds}; groups {', '.join(f'{g} ({n} clients)' for g, n in sizes.items())}. Mean ± 95 % (points).\n")
    typer.echo("| method | " + " | ".join(METRICS.values()) + " | " + " | ".join(f"paired {v}" for v in METRICS.values()) + " |")
    typer.echo("|---" * (1 + 2 * len(METRICS)) + "|")
    base = {k: pooled(reference, k) for k in METRICS}
    for method in methods:
        values = {k: pooled(method, k) for k in METRICS}
        means = [cell(values[k], signed=False) for k in METRICS]
        paired = ["—" if method == reference else cell([a - b for a, b in zip(values[k], base[k], strict=True)]) for k in METRICS]
        typer.echo(f"| {method} | " + " | ".join(means + paired) + " |")
    typer.echo(f"\nPaired Self A_last / Others A_last per group (vs {reference}):\n")
    typer.echo("| group | " + " | ".join(m for m in methods if m != reference) + " |")
    typer.echo("|---" * len(methods) + "|")
    for name, c in groups.items():
        row = []
        for method in (m for m in methods if m != reference):
            parts = []
            for metric in ("self_last", "others_last"):
                a, b = _per_seed(c, method, metric), _per_seed(c, reference, metric)
                parts.append(cell([a[s] - b[s] for s in seeds]))
            row.append(" / ".join(parts))
        typer.echo(f"| {name} | " + " | ".join(row) + " |")
    _by_peer(groups, methods, reference, seeds, cell)


def _client_scores(comparison: dict, method: str, seeds: list[int]) -> dict[int, dict[str, dict]]:
    """Per seed, the run's per-client scores (``report/summary.json``), by client id."""
    entry = comparison["methods"][method]
    runs = dict(zip(entry["seeds"], entry["runs"], strict=True))
    return {s: json.loads((Path(runs[s]) / "report" / "summary.json").read_text())["clients"] for s in seeds}


def _by_peer(groups: dict[str, dict], methods: list[str], reference: str, seeds: list[int], cell) -> None:
    """Paired Self / Others per base model, and of the clients with a same-model peer in their
    group and of those without one (their same-architecture global has no peer to come from),
    apart: per seed the mean over those clients, then mean ± 95 % over seeds."""
    scores = {(g, m): _client_scores(c, m, seeds) for g, c in groups.items() for m in methods}
    first = {g: scores[g, reference][seeds[0]] for g in groups}
    peerless = {(g, cid) for g, clients in first.items() for cid, row in clients.items()
                if sum(other["model_id"] == row["model_id"] for other in clients.values()) == 1}

    def paired(members: list[tuple[str, str]], method: str) -> str:
        """Self / Others of ``method`` − ``reference``, per seed the mean over ``members``."""
        return " / ".join(cell([sum(scores[g, method][s][cid][metric] - scores[g, reference][s][cid][metric]
                                    for g, cid in members) / len(members) for s in seeds])
                          for metric in ("self_last", "others_last"))

    models = sorted({row["model_id"] for clients in first.values() for row in clients.values()})
    typer.echo(f"\nPer base model, paired Self A_last / Others A_last (vs {reference}):\n")
    typer.echo("| method | " + " | ".join(f"{m} ({sum(r['model_id'] == m for c in first.values() for r in c.values())})"
                                         for m in models) + " |")
    typer.echo("|---" * (1 + len(models)) + "|")
    for method in (m for m in methods if m != reference):
        row = [paired([(g, cid) for g in groups for cid, r in first[g].items() if r["model_id"] == model], method)
               for model in models]
        typer.echo(f"| {method} | " + " | ".join(row) + " |")
    typer.echo(f"\nClients with a same-model peer in their group and without one, paired Self A_last / Others A_last "
               f"(vs {reference}; {len(peerless)} client(s) without):\n")
    typer.echo("| method | with a same-model peer | without one |")
    typer.echo("|---" * 3 + "|")
    for method in (m for m in methods if m != reference):
        row = []
        for without in (False, True):
            members = [(g, cid) for g in groups for cid in first[g] if ((g, cid) in peerless) == without]
            if not members:
                row.append("— (no client)")
                continue
            row.append(paired(members, method))
        typer.echo(f"| {method} | " + " | ".join(row) + " |")


SLOTS = ("the client's first task", "a later task whose kind another client trained before",
         "a later task whose kind no other client trained before")


def _task_slots(run: Path) -> dict[str, dict[str, int]]:
    """Client id → task key → its slot (index into ``SLOTS``), from the run's scenario and the
    task kinds in its data's ``tasks.json``: a client's first task; a later task whose kind
    another client of the scenario had as an earlier task (so its training came first); any other."""
    config = json.loads((run / "config.json").read_text())
    kinds = {t["key"]: t["kind"] for t in json.loads((Path(config["data_root"]) / "tasks.json").read_text())}
    scenario = load_scenario(scenario_path(SimpleNamespace(scenario=config["scenario"]), Path(config["data_root"])))
    order = {str(c.client_id): [t.key for t in c.datasets] for c in scenario.clients}
    slots: dict[str, dict[str, int]] = {}
    for cid, tasks in order.items():
        slots[cid] = {}
        for i, key in enumerate(tasks):
            before = any(kinds[other[j]] == kinds[key] for p, other in order.items() if p != cid
                         for j in range(min(i, len(other))))
            slots[cid][key] = 0 if i == 0 else (1 if before else 2)
    return slots


def _last_round_self(run: Path) -> dict[str, dict[str, float]]:
    """Client id → task key → its Self score at the client's last round (``rounds.jsonl``)."""
    last: dict[str, tuple[int, dict[str, float]]] = {}
    for row in run_rows(run):
        if row["round"] >= last.get(str(row["client"]), (-1, {}))[0]:
            last[str(row["client"])] = (row["round"], row["scores"]["self"])
    return {cid: scores for cid, (_, scores) in last.items()}


@app.command("by-task")
def by_task(
    compare_dirs: list[Path],
    reference: str = typer.Option("local", help="the method paired against"),
    also: list[str] = typer.Option([], help=ALSO_HELP),
) -> None:
    """Self A_last split by where a task sits in its client's stream (``SLOTS``), paired against
    ``reference``: per seed the mean over the groups' tasks of that slot, then mean ± 95 %."""
    groups = list(_comparisons(compare_dirs, also, reference).values())
    methods, seeds = _methods_and_seeds(groups, reference)
    runs = [{m: dict(zip(c["methods"][m]["seeds"], map(Path, c["methods"][m]["runs"]), strict=True)) for m in methods}
            for c in groups]
    slots = [_task_slots(g[reference][seeds[0]]) for g in runs]
    counts = [sum(v == k for s in slots for c in s.values() for v in c.values()) for k in range(len(SLOTS))]
    per_slot: dict[tuple[str, int], list[float]] = {}
    for seed in seeds:
        scores = {m: [_last_round_self(g[m][seed]) for g in runs] for m in methods}
        for method in methods:
            for k in range(len(SLOTS)):
                diffs = [scores[method][i][cid][key] - (0.0 if method == reference else scores[reference][i][cid][key])
                         for i, group in enumerate(slots) for cid, tasks in group.items()
                         for key, slot in tasks.items() if slot == k]
                if diffs:
                    per_slot.setdefault((method, k), []).append(100 * sum(diffs) / len(diffs))
    typer.echo(f"Seeds {seeds}. Self A_last per task, by its place in the client's stream: {reference}'s "
               f"score and each method's paired difference to it (mean ± 95 % over seeds, points).\n")
    shown = [k for k in range(len(SLOTS)) if counts[k]]
    typer.echo("| method | " + " | ".join(f"{SLOTS[k]} ({counts[k]})" for k in shown) + " |")
    typer.echo("|---" * (len(shown) + 1) + "|")
    for method in methods:
        cells = []
        for k in shown:
            stat = mean_interval(per_slot[method, k])
            sign = "" if method == reference else "+"
            cells.append(f"{stat['mean']:{sign}.1f} ± {stat['ci95']:.1f}")
        typer.echo(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    app()
