"""Statistics of a method comparison (``fedmosaic compare``): what a reader can trust.

Input: for each method, one run summary per seed (``server_app.report.summarise`` output plus
``run_dir``). Output (``comparison.json``, ``comparison.md``, ``comparison.png``):

* per method and metric, the mean over seeds ± the 95 % t-interval half-width;
* per method, the **paired** per-seed difference to the reference method (default ``local``):
  the same seed's data and models under both methods, mean and 95 % t-interval;
* per client, Self A_last (mean over seeds) per method beside the chance level of its tasks;
* for runs with task vectors (``fedmosaic``), the relevance quality: the AUROC of the task
  similarity s_ij of the last checkpoint, same-skill-group pairs against the rest;
* with task skills (DRAKE-mini), Others A_last split into the other clients' tasks of a skill
  the client trains itself and those of skills it does not (with paired differences): where
  sharing helps, if anywhere;
* per method and base model, the mean training loss and gate β of each round (the task shift,
  and whether clients use their global branch).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_file
from scipy import stats

from drake_data.layout import load_scenario, load_task
from drake_data.metrics import chance_level
from drake_data.prompts import parse_choices
from fedmosaic_core.rela import task_similarity
from fedmosaic_core.storage import (
    atomic_write_json,
    atomic_write_text,
    atomic_write_with,
    json_safe,
)
from fedmosaic_flower.records import client_sort_key
from server_app.report import percent

METRICS = ("self_last", "self_auc", "others_last", "unseen_last")
LABELS = {"self_last": "Self A_last", "self_auc": "Self A_AUC", "others_last": "Others A_last",
          "unseen_last": "Unseen A_last"}
#: Others A_last on tasks of the client's own skills / of the other skills (with task skills)
SPLIT_METRICS = ("others_own_skill", "others_other_skills")
SPLIT_LABELS = {"others_own_skill": "Others, own skill", "others_other_skills": "Others, other skills"}


def mean_interval(values: Sequence[float]) -> dict[str, float]:
    """Mean and 95 % t-interval half-width (NaN with fewer than two finite values)."""
    finite = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return {"mean": math.nan, "ci95": math.nan, "n": 0}
    half = (float(stats.t.ppf(0.975, finite.size - 1) * finite.std(ddof=1) / math.sqrt(finite.size))
            if finite.size > 1 else math.nan)
    return {"mean": float(finite.mean()), "ci95": half, "n": int(finite.size)}


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """P(score of a random positive > score of a random negative), ties counted ½ (Mann–Whitney)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (pos.size * neg.size))


def relevance_auroc(run_dir: Path, group_of: Mapping[str, str]) -> float:
    """AUROC of s_ij over client pairs i < j (same group = positive) from the run's last checkpoint."""
    checkpoints = sorted((run_dir / "checkpoints").glob("round-*"))
    if not checkpoints:
        return math.nan
    tensors = load_file(str(checkpoints[-1] / "state.safetensors"))
    vectors = {name.split("/", 1)[1]: t.numpy() for name, t in tensors.items() if name.startswith("task-vectors/")}
    clients = sorted((c for c in vectors if c in group_of), key=lambda c: (len(c), c))
    if len(clients) < 3:
        return math.nan
    similarity = task_similarity([vectors[c] for c in clients])
    scores, same = [], []
    for i in range(len(clients)):
        for j in range(i + 1, len(clients)):
            scores.append(float(similarity[i, j]))
            same.append(group_of[clients[i]] == group_of[clients[j]])
    return roc_auc(scores, same)


def others_by_skill(run_dir: Path, skill_of: Mapping[str, str]) -> dict[str, float]:
    """The last round's Others accuracy split by skill (:data:`SPLIT_METRICS`): per client, the
    mean over the other clients' tasks whose skill is one of its own tasks' skills, and over the
    rest; then the mean over clients (nan where no client has such tasks)."""
    scored = [r for r in run_rows(run_dir) if isinstance(r.get("scores"), dict)]
    last = max((int(r["round"]) for r in scored), default=0)
    per_client: dict[str, list[float]] = {name: [] for name in SPLIT_METRICS}
    for row in (r for r in scored if int(r["round"]) == last):
        own = {skill_of[t] for t in row["scores"].get("self", {}) if t in skill_of}
        split: dict[str, list[float]] = {name: [] for name in SPLIT_METRICS}
        for task, score in row["scores"].get("others", {}).items():
            if task in skill_of:
                split["others_own_skill" if skill_of[task] in own else "others_other_skills"].append(float(score))
        for name, values in split.items():
            if values:
                per_client[name].append(float(np.mean(values)))
    return {name: float(np.mean(v)) if v else math.nan for name, v in per_client.items()}


def run_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The run's ``rounds.jsonl`` rows (none when it has no log)."""
    path = run_dir / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


def _round_values(run_dir: Path, value: Callable[[dict[str, Any]], float | None]) -> dict[str, list[float]]:
    """Each client's per-round ``value(row)`` from the run's ``rounds.jsonl`` (rows without one skipped)."""
    out: dict[str, list[float]] = {}
    for row in run_rows(run_dir):
        found = value(row)
        if found is not None:
            out.setdefault(str(row["client"]), []).append(found)
    return out


def _round_losses(run_dir: Path) -> dict[str, list[float]]:
    """Each client's per-round mean training loss."""
    return _round_values(run_dir, lambda row: float(row["train_loss"])
                         if isinstance(row.get("train_loss"), (int, float)) else None)


def _round_gates(run_dir: Path) -> dict[str, list[float]]:
    """Each client's per-round gate β, the mean over its layer blocks (``beta_block_k``)."""
    def mean_beta(row: dict[str, Any]) -> float | None:
        betas = [float(v) for k, v in row.items() if k.startswith("beta_block_") and isinstance(v, (int, float))]
        return float(np.mean(betas)) if betas else None

    return _round_values(run_dir, mean_beta)


def _model_curves(runs: Sequence[Mapping[str, Any]], curves_of_runs: Sequence[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Per base model, the mean of each round's value over its clients and the seeds."""
    by_model: dict[str, list[list[float]]] = {}
    for run, curves in zip(runs, curves_of_runs, strict=True):
        for client, curve in curves.items():
            model = run["clients"].get(client, {}).get("model_id")
            if model is None:
                continue
            rounds = by_model.setdefault(model, [])
            rounds.extend([] for _ in range(len(curve) - len(rounds)))
            for index, value in enumerate(curve):
                rounds[index].append(value)
    return {model: [float(np.mean(v)) for v in rounds] for model, rounds in sorted(by_model.items())}


def build_comparison(
    per_seed: Mapping[str, Sequence[Mapping[str, Any]]],
    reference: str = "local",
    chance: Mapping[str, float] | None = None,
    group_of: Mapping[str, str] | None = None,
    others_chance: Mapping[str, float] | None = None,
    skill_of: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The comparison (see the module docstring) from run summaries keyed by method, in seed
    order; ``skill_of`` (task key → skill) adds the Others split by skill."""
    methods: dict[str, Any] = {}
    split = {name: [others_by_skill(Path(r["run_dir"]), skill_of) for r in runs]
             for name, runs in per_seed.items()} if skill_of else {}
    seeds = {name: [int(r["seed"]) for r in runs] for name, runs in per_seed.items()}
    for name, runs in per_seed.items():
        entry: dict[str, Any] = {"seeds": seeds[name], "runs": [str(r["run_dir"]) for r in runs]}
        for metric in METRICS:
            entry[metric] = mean_interval([float(r["overall"][metric]) for r in runs])
            entry[metric]["per_seed"] = [float(r["overall"][metric]) for r in runs]
        if reference in per_seed and name != reference:
            ref_by_seed = {int(r["seed"]): r for r in per_seed[reference]}
            entry["vs_reference"] = {}
            for metric in METRICS:
                diffs = [float(r["overall"][metric]) - float(ref_by_seed[int(r["seed"])]["overall"][metric])
                         for r in runs if int(r["seed"]) in ref_by_seed]
                entry["vs_reference"][metric] = mean_interval(diffs)
        if split:
            reference_split = dict(zip(seeds.get(reference, []), split.get(reference, []), strict=True))
            entry["others_by_skill"] = {metric: mean_interval([v[metric] for v in split[name]]) for metric in SPLIT_METRICS}
            if reference in per_seed and name != reference:
                entry["others_by_skill_vs_reference"] = {metric: mean_interval(
                    [v[metric] - reference_split[seed][metric] for seed, v in zip(seeds[name], split[name], strict=True)
                     if seed in reference_split]) for metric in SPLIT_METRICS}
        entry["bytes_per_client_round"] = {
            side: float(np.mean([float(r["overall"][f"bytes_{side}_per_round"]) for r in runs]))
            if all(f"bytes_{side}_per_round" in r["overall"] for r in runs) else math.nan
            for side in ("up", "down")
        }
        clients: dict[str, Any] = {}
        for run in runs:
            for client, c in run["clients"].items():
                clients.setdefault(client, {"model_id": c["model_id"], "self_last": []})["self_last"].append(float(c["self_last"]))
        entry["clients"] = {k: {"model_id": v["model_id"], "self_last": mean_interval(v["self_last"])} for k, v in clients.items()}
        models = sorted({v["model_id"] for v in clients.values()})
        entry["models"] = {m: mean_interval([x for v in clients.values() if v["model_id"] == m for x in v["self_last"]])
                           for m in models}
        losses = [_round_losses(Path(r["run_dir"])) for r in runs]
        entry["train_loss"] = {
            "max": max((v for run in losses for curve in run.values() for v in curve), default=math.nan),
            "max_by_client": {c: max(v for run in losses for v in run.get(c, [])) for c in sorted({c for run in losses for c in run})},
            "by_model_round": _model_curves(runs, losses),
        }
        gates = _model_curves(runs, [_round_gates(Path(r["run_dir"])) for r in runs])
        if gates:
            entry["gate_beta_by_model_round"] = gates
        if group_of:
            aurocs = [relevance_auroc(Path(r["run_dir"]), group_of) for r in runs]
            if any(math.isfinite(a) for a in aurocs):
                entry["relevance_auroc"] = mean_interval(aurocs)
                entry["relevance_auroc"]["per_seed"] = aurocs
        methods[name] = entry
    return {"reference": reference, "methods": methods, "chance": dict(chance or {}),
            "others_chance": dict(others_chance or {}), "groups": dict(group_of or {})}


def _cell(stat: Mapping[str, float], signed: bool = False) -> str:
    if not math.isfinite(stat["mean"]):
        return "—"
    sign = "+" if signed else ""
    half = f" ± {100 * stat['ci95']:.1f}" if math.isfinite(stat["ci95"]) else ""
    return f"{100 * stat['mean']:{sign}.1f}{half}"


def _kib(value: float) -> str:
    return f"{value / 1024:.0f} KiB" if math.isfinite(value) else "—"


def comparison_markdown(comparison: Mapping[str, Any]) -> str:
    methods = comparison["methods"]
    reference = comparison["reference"]
    n = max((len(m["seeds"]) for m in methods.values()), default=0)
    others_chance = comparison.get("others_chance") or {}
    lines = [f"Mean over {n} seed(s) ± 95 % t-interval half-width, in %.", ""]
    if comparison.get("chance"):
        lines += [f"Chance: Self {percent(np.mean(list(comparison['chance'].values())))}, Others "
                  f"{percent(np.mean(list(others_chance.values())) if others_chance else None)} (mean over clients).", ""]
    lines += [
             "| method | " + " | ".join(LABELS[m] for m in METRICS) + " | relevance AUROC |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    for name, m in methods.items():
        auroc = m.get("relevance_auroc")
        auc = f"{auroc['mean']:.2f}" + (f" ± {auroc['ci95']:.2f}" if math.isfinite(auroc["ci95"]) else "") if auroc else "—"
        lines.append(f"| {name} | " + " | ".join(_cell(m[k]) for k in METRICS) + f" | {auc} |")
    lines += ["", "Bytes per client and round (Flower record content, mean over seeds): "
              + ", ".join(f"{name} ↑ {_kib(m['bytes_per_client_round']['up'])} ↓ {_kib(m['bytes_per_client_round']['down'])}"
                          for name, m in methods.items() if "bytes_per_client_round" in m) + "."]
    lines += ["", f"Paired per-seed difference to `{reference}` (points; mean ± 95 % half-width; an interval "
              "that contains 0 is no difference):", "",
              "| method | " + " | ".join(LABELS[m] for m in METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name, m in methods.items():
        if "vs_reference" in m:
            lines.append(f"| {name} | " + " | ".join(_cell(m["vs_reference"][k], signed=True) for k in METRICS) + " |")
    if any("others_by_skill" in m for m in methods.values()):
        lines += ["", "Others A_last split: other clients' tasks of a skill the client trains itself, and of the "
                  "skills it does not (mean over clients); paired difference to "
                  f"`{reference}`:", "",
                  "| method | " + " | ".join(SPLIT_LABELS.values()) + " | "
                  + " | ".join(f"paired {v}" for v in SPLIT_LABELS.values()) + " |",
                  "|---|" + "---|" * (2 * len(SPLIT_METRICS))]
        for name, m in methods.items():
            if "others_by_skill" in m:
                paired = m.get("others_by_skill_vs_reference")
                lines.append(f"| {name} | " + " | ".join(_cell(m["others_by_skill"][k]) for k in SPLIT_METRICS) + " | "
                             + " | ".join(_cell(paired[k], signed=True) if paired else "—" for k in SPLIT_METRICS) + " |")
    clients = sorted({c for m in methods.values() for c in m["clients"]}, key=lambda c: (len(c), c))
    chance = comparison.get("chance", {})
    groups = comparison.get("groups", {})
    lines += ["", "Self A_last per client (mean over seeds ± 95 %), beside the chance level of its tasks:", "",
              "| client | group | model | chance | " + " | ".join(methods) + " |", "|---|---|---|---|" + "---|" * len(methods)]
    for client in clients:
        model = next(m["clients"][client]["model_id"] for m in methods.values() if client in m["clients"])
        cells = [_cell(m["clients"][client]["self_last"]) if client in m["clients"] else "—" for m in methods.values()]
        lines.append(f"| {client} | {groups.get(client, '')} | {model} | {percent(chance.get(client))} | " + " | ".join(cells) + " |")
    lines += ["", "Largest per-round mean training loss of any client in any seed (bounded = no collapse): "
              + ", ".join(f"{name} {m['train_loss']['max']:.2f}" for name, m in methods.items()
                          if math.isfinite(m["train_loss"]["max"])) + "."]
    lines += _curve_table("Mean training loss per round (a client's local steps in that round; clients of the base "
                          "model × seeds):", {name: m["train_loss"].get("by_model_round", {}) for name, m in methods.items()})
    lines += _curve_table("Mean gate β per round (1: the global branch only; the mean over layer blocks, clients of "
                          "the base model × seeds):", {name: m["gate_beta_by_model_round"] for name, m in methods.items()
                                                       if "gate_beta_by_model_round" in m})
    models = sorted({k for m in methods.values() for k in m["models"]})
    lines += ["", "Self A_last per base model (clients × seeds):", "",
              "| method | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for name, m in methods.items():
        lines.append(f"| {name} | " + " | ".join(_cell(m["models"][k]) if k in m["models"] else "—" for k in models) + " |")
    return "\n".join(lines) + "\n"


def _curve_table(title: str, curves: Mapping[str, Mapping[str, Sequence[float]]]) -> list[str]:
    """Markdown lines of per-round values, a row per method and base model (none if no values)."""
    longest = max((len(c) for per_model in curves.values() for c in per_model.values()), default=0)
    if not longest:
        return []
    lines = ["", title, "", "| method | model | " + " | ".join(str(r) for r in range(1, longest + 1)) + " |",
             "|---|---|" + "---|" * longest]
    for name, per_model in curves.items():
        for model, curve in per_model.items():
            lines.append(f"| {name} | {model} | " + " | ".join([f"{v:.2f}" for v in curve] + ["—"] * (longest - len(curve))) + " |")
    return lines


def comparison_figure(comparison: Mapping[str, Any], path: Path) -> None:
    """Bar chart of each metric per method with 95 % error bars (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(comparison["methods"])
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.2), sharey=True)
    for ax, metric in zip(np.atleast_1d(axes), METRICS, strict=True):
        means = [100 * comparison["methods"][m][metric]["mean"] for m in methods]
        errors = [100 * np.nan_to_num(comparison["methods"][m][metric]["ci95"]) for m in methods]
        ax.bar(range(len(methods)), means, yerr=errors, capsize=4, color="#4c72b0")
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        ax.set_title(LABELS[metric])
    np.atleast_1d(axes)[0].set_ylabel("% (mean over seeds, 95 % CI)")
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_comparison(comparison: Mapping[str, Any], target: Path) -> str:
    """``comparison.json``, ``comparison.md`` and ``comparison.png`` in ``target``; returns the table."""
    target.mkdir(parents=True, exist_ok=True)
    table = comparison_markdown(comparison)
    atomic_write_json(target / "comparison.json", json_safe(comparison))
    atomic_write_text(target / "comparison.md", table)
    comparison_figure(comparison, target / "comparison.png")
    return table


def clients_with_stale_scores(summary: Mapping[str, Any], due_round: int | None) -> list[str]:
    """Clients of a run whose scores stop before the round they were due to report: their A_last
    would be of an earlier round than the run says. A client is due at its last selected round
    (the summary's ``last_selected_round``, from the run's outcomes) and, where every client trains
    in every round (``fraction-train`` 1), at ``due_round``, the run's last: a client that was
    selected but did not reply in time, was excluded, or left the federation, counts."""
    clients = summary.get("clients") or {}
    due: dict[str, int] = {str(c): int(r) for c, r in (summary.get("last_selected_round") or {}).items()}
    if due_round is not None:
        for client in clients:
            due[str(client)] = max(due.get(str(client), 0), due_round)
    stale = []
    for client, round_due in due.items():
        entry = clients.get(client) or {}
        last = entry.get("last_round")
        if last is None:  # a summary written before the field: its last round with a Self score
            last = max((int(r) for r, _ in entry.get("self_curve") or []), default=0)
        if int(last) < round_due:
            stale.append(client)
    return sorted(stale, key=client_sort_key)


def task_skills(data_root: Path) -> dict[str, str]:
    """Task key → skill, from DRAKE-mini's ``tasks.json`` (empty for data without one)."""
    meta = data_root / "tasks.json"
    if not meta.is_file():
        return {}
    return {t["key"]: t["skill"] for t in json.loads(meta.read_text(encoding="utf-8"))}


def client_chance_and_groups(
    data_root: Path, scenario_file: Path
) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """Per client: the chance level of its own tasks' test questions and of every other client's
    tasks (each the mean over tasks of the mean of 1/|options|) and, on DRAKE-mini (whose
    ``tasks.json`` names each task's skill), its skill group."""
    skills = task_skills(data_root)
    scenario = load_scenario(scenario_file)
    task_chance = {ref.key: chance_level([parse_choices(r["conversations"][0]["value"])
                                          for r in load_task(data_root, ref.dataset, ref.subset_id, "test")])
                   for ref in scenario.tasks()}
    own: dict[str, float] = {}
    others: dict[str, float] = {}
    groups: dict[str, str] = {}
    for client in scenario.clients:
        mine = {r.key for r in client.datasets}
        own[str(client.client_id)] = float(np.nanmean([task_chance[k] for k in mine]))
        others[str(client.client_id)] = float(np.nanmean([v for k, v in task_chance.items() if k not in mine]))
        owned = sorted({skills[k] for k in mine if k in skills})
        if owned:
            groups[str(client.client_id)] = "+".join(owned)
    return own, others, groups
