"""End-of-run report: the Self/Others table, a JSON summary and PNG plots.

Per client and round the log row carries ``scores = {"self": {task: s}, "others": {...},
"unseen": {...}}`` (self: the client's own tasks already started; others: every other client's
tasks; unseen: the held-out tasks). From these:

* ``A_last`` — the mean score in the final round;
* ``A_AUC`` — the mean over the rounds in which the split was measured (area under the
  score-vs-round curve normalised by its length; docs/method.md, "DRAKE").
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fedmosaic_core.storage import atomic_write_text
from fedmosaic_flower.records import client_sort_key

SPLITS = ("self", "others", "unseen")


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def split_score(row: dict[str, Any], split: str) -> float:
    scores = row.get("scores", {}).get(split) or {}
    return _mean([float(v) for v in scores.values()])


def summarise(rows: list[dict[str, Any]], outcomes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Per-client and overall A_last / A_AUC for each split, bytes per round; with the rounds'
    outcomes (``outcomes.jsonl``) also each client's last selected round and the rounds it was left
    out of, with the reason."""
    by_client: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_client[str(row["client"])].append(row)
    clients: dict[str, dict[str, Any]] = {}
    for client, client_rows in sorted(by_client.items(), key=lambda kv: client_sort_key(kv[0])):
        client_rows.sort(key=lambda r: int(r["round"]))
        entry: dict[str, Any] = {"model_id": client_rows[-1].get("model_id", ""), "rounds": len(client_rows),
                                 "last_round": int(client_rows[-1]["round"])}
        for split in SPLITS:
            curve = [(int(r["round"]), split_score(r, split)) for r in client_rows]
            curve = [(k, v) for k, v in curve if not math.isnan(v)]
            entry[f"{split}_last"] = curve[-1][1] if curve else math.nan
            entry[f"{split}_auc"] = _mean([v for _, v in curve])
            entry[f"{split}_curve"] = curve
        entry["bytes_up_per_round"] = _mean([float(r.get("bytes_up", 0)) for r in client_rows])
        entry["bytes_down_per_round"] = _mean([float(r.get("bytes_down", 0)) for r in client_rows])
        clients[client] = entry
    overall = {
        key: _mean([c[key] for c in clients.values() if not math.isnan(c[key])])
        for key in [f"{s}_{m}" for s in SPLITS for m in ("last", "auc")]
        + ["bytes_up_per_round", "bytes_down_per_round"]
    }
    summary: dict[str, Any] = {"clients": clients, "overall": overall}
    if outcomes is not None:
        summary.update(participation(outcomes))
    return summary


def participation(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """``last_selected_round``: client → the last round it was asked to train in; ``left_out``:
    client → {round: why its reply did not count}, for the clients that missed a round they were in."""
    last_selected: dict[str, int] = {}
    left_out: dict[str, dict[str, str]] = defaultdict(dict)
    for outcome in sorted(outcomes, key=lambda o: int(o["round"])):
        server_round = int(outcome["round"])
        for client in outcome.get("selected", []):
            last_selected[str(client)] = server_round
        for client in outcome.get("missing", []):
            left_out[str(client)][str(server_round)] = "did not reply in time"
        for client, reason in (outcome.get("excluded") or {}).items():
            left_out[str(client)][str(server_round)] = str(reason)
    order = lambda kv: client_sort_key(kv[0])  # noqa: E731
    return {"last_selected_round": dict(sorted(last_selected.items(), key=order)),
            "left_out": dict(sorted(left_out.items(), key=order))}


def percent(x: Any) -> str:
    """A score in [0, 1] as a percentage with one decimal; "—" when missing."""
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * float(x):.1f}"


def format_table(summary: dict[str, Any], title: str = "") -> str:
    """A plain-text (Markdown) table; also what the CLI prints."""
    fmt = percent

    lines = [f"### {title}" if title else ""]
    lines.append("| client | model | Self A_last | Self A_AUC | Others A_last | Others A_AUC | Unseen A_last |")
    lines.append("|---|---|---|---|---|---|---|")
    for client, c in summary["clients"].items():
        lines.append(
            f"| {client} | {c['model_id']} | {fmt(c['self_last'])} | {fmt(c['self_auc'])} | "
            f"{fmt(c['others_last'])} | {fmt(c['others_auc'])} | {fmt(c['unseen_last'])} |"
        )
    o = summary["overall"]
    lines.append(
        f"| **mean** | | {fmt(o['self_last'])} | {fmt(o['self_auc'])} | {fmt(o['others_last'])} | "
        f"{fmt(o['others_auc'])} | {fmt(o['unseen_last'])} |"
    )
    for client, rounds in (summary.get("left_out") or {}).items():
        lines.append(f"\nclient {client} left out of round(s) " + "; ".join(f"{r}: {why}" for r, why in rounds.items()))
    return "\n".join(line for line in lines if line is not None) + "\n"


def plot_scores(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, split in zip(axes, ("self", "others"), strict=True):
        for client, c in summary["clients"].items():
            curve = c[f"{split}_curve"]
            if curve:
                ax.plot([k for k, _ in curve], [100 * v for _, v in curve], marker="o", label=client)
        ax.set_title(f"{split.capitalize()} score vs round")
        ax.set_xlabel("round")
        ax.set_ylabel("score (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gate_curves(rows: list[dict[str, Any]]) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """client → layer block → [(round, mean β while training)] from the ``beta_block_{k}`` fields."""
    curves: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("beta_block_") and isinstance(value, (int, float)) and math.isfinite(value):
                block = int(key.rsplit("_", 1)[1])
                curves.setdefault(str(row["client"]), {}).setdefault(block, []).append((int(row["round"]), float(value)))
    return {c: {k: sorted(v) for k, v in sorted(blocks.items())} for c, blocks in sorted(curves.items(), key=lambda kv: client_sort_key(kv[0]))}


def plot_gates(curves: dict[str, dict[int, list[tuple[int, float]]]], path: Path, title: str) -> None:
    """β per round: per client (mean over its blocks) and per layer block (mean over clients).
    β = 0.5 is the untrained gate; above it a client leans on its global branch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    by_block: dict[int, dict[int, list[float]]] = {}
    for client, blocks in curves.items():
        by_round: dict[int, list[float]] = {}
        for block, curve in blocks.items():
            for rnd, beta in curve:
                by_round.setdefault(rnd, []).append(beta)
                by_block.setdefault(block, {}).setdefault(rnd, []).append(beta)
        axes[0].plot(sorted(by_round), [float(np.mean(by_round[r])) for r in sorted(by_round)], marker="o", label=client)
    for block, per_round in sorted(by_block.items()):
        axes[1].plot(sorted(per_round), [float(np.mean(per_round[r])) for r in sorted(per_round)], marker="o",
                     label=f"block {block}")
    for ax, what in zip(axes, ("per client (mean over blocks)", "per layer block (mean over clients)"), strict=True):
        ax.axhline(0.5, color="gray", lw=0.8, ls="--")
        ax.set_title(f"gate β while training, {what}", fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("mean β (1 = global branch only)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_relevance(weights: np.ndarray, ids: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(range(len(ids)), key=lambda i: client_sort_key(ids[i]))
    weights = np.asarray(weights)[np.ix_(order, order)]
    ids = [ids[i] for i in order]
    fig, ax = plt.subplots(figsize=(5 + 0.2 * len(ids), 4 + 0.2 * len(ids)), constrained_layout=True)
    image = ax.imshow(weights, cmap="viridis", vmin=0.0)
    ax.set_xticks(range(len(ids)), ids, rotation=90)
    ax.set_yticks(range(len(ids)), ids)
    ax.set_xlabel("peer j")
    ax.set_ylabel("client i")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="w_ij")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    run_dir: Path,
    rows: list[dict[str, Any]],
    weights: np.ndarray | None,
    weight_ids: list[str],
    title: str,
    outcomes: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], str]:
    """Write ``report/{summary.json,table.md,scores.png,relevance.png,gates.png}``; return (summary, table)."""
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows, outcomes)
    gates = gate_curves(rows)
    if gates:
        summary["gate_beta"] = {c: {str(k): v for k, v in blocks.items()} for c, blocks in gates.items()}
    table = format_table(summary, title)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=float))
    atomic_write_text(out / "table.md", table)
    plot_scores(summary, out / "scores.png", title)
    if gates:
        plot_gates(gates, out / "gates.png", title)
    if weights is not None and weights.size:
        plot_relevance(weights, weight_ids, out / "relevance.png", f"{title}: relevance weights")
    return summary, table
