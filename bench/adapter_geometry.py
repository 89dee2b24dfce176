"""How aligned are the adapters that RELA mixes, and how large is the mix?

For finished runs (`fedmosaic compare` run folders), from each client's last saved state:

* the cosine between two clients' **local** branches: the shared PQ part (every P and Q of the PQ
  layers, flattened) for every pair, and the plain-LoRA part (every ΔW = B·A, flattened) for pairs
  of the same architecture, split by same/other architecture and same/other skill group;
* the norm of the client's **global** branch over that of its local branch (PQ part; LoRA part
  where the global is not zero). A weighted mean of n unit vectors at pairwise cosine c has norm
  sqrt(Σw² + c·(1 − Σw²)): 1/√n for orthogonal ones under equal weights, 1 for identical ones.

    python bench/adapter_geometry.py RUN_DIR [RUN_DIR ...]

Prints one table (mean ± 95 % t-interval over the runs).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import typer
from safetensors.numpy import load_file

from fedmosaic_cli.comparison import client_chance_and_groups, mean_interval

app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


def last_states(run_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """Client id → the tensors of its last saved round."""
    states = {}
    for folder in sorted(run_dir.glob("clients/*/client-*")):
        rounds = sorted(folder.glob("round-*"))
        if rounds:
            states[folder.name.removeprefix("client-")] = load_file(str(rounds[-1] / "state.safetensors"))
    return states


def branch_vectors(state: dict[str, np.ndarray], branch: str) -> tuple[np.ndarray, np.ndarray]:
    """(PQ part, LoRA part) of one branch, each flattened in key order (LoRA as ΔW = B·A)."""
    prefix = f"adapter/{branch}/"
    pq = [state[k].ravel() for k in sorted(state) if k.startswith(prefix + "pq.")]
    lora_keys = sorted(k.removesuffix(".A") for k in state if k.startswith(prefix + "lora.") and k.endswith(".A"))
    lora = [(state[k + ".B"] @ state[k + ".A"]).ravel() for k in lora_keys]
    flat = [np.concatenate(p).astype(np.float64) if p else np.zeros(0) for p in (pq, lora)]
    return flat[0], flat[1]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm > 0 else math.nan


def run_geometry(run_dir: Path) -> dict[str, float]:
    summary = json.loads((run_dir / "report" / "finished-run.json").read_text())["summary"]
    model = {c: v["model_id"] for c, v in summary["clients"].items()}
    _, _, group = client_chance_and_groups(Path(summary["data_root"]), Path(summary["scenario_path"]))
    states = last_states(run_dir)
    local = {c: branch_vectors(s, "local") for c, s in states.items()}
    glob_ = {c: branch_vectors(s, "global") for c, s in states.items()}
    pairs: dict[str, list[float]] = defaultdict(list)
    clients = sorted(states, key=int)
    for i, a in enumerate(clients):
        for b in clients[i + 1:]:
            arch = "same arch" if model[a] == model[b] else "other arch"
            skill = "same group" if group.get(a) == group.get(b) else "other group"
            pairs[f"PQ cos, {arch}, {skill}"].append(cosine(local[a][0], local[b][0]))
            if model[a] == model[b]:
                pairs[f"LoRA cos, same arch, {skill}"].append(cosine(local[a][1], local[b][1]))
    out = {name: float(np.nanmean(values)) for name, values in pairs.items()}
    ratios_pq = [np.linalg.norm(glob_[c][0]) / np.linalg.norm(local[c][0]) for c in clients]
    ratios_lora = [np.linalg.norm(glob_[c][1]) / np.linalg.norm(local[c][1])
                   for c in clients if glob_[c][1].size and np.linalg.norm(glob_[c][1]) > 0]
    out["|global| / |local|, PQ"] = float(np.mean(ratios_pq))
    if ratios_lora:
        out["|global| / |local|, LoRA"] = float(np.mean(ratios_lora))
    out["1/sqrt(n - 1)"] = 1 / math.sqrt(len(clients) - 1)
    return out


@app.command()
def main(runs: list[Path]) -> None:
    rows = [run_geometry(r) for r in runs]
    names = sorted({k for r in rows for k in r}, key=lambda k: (k.startswith("|"), k.startswith("1/"), k))
    typer.echo(f"| quantity ({len(rows)} runs) | mean ± 95 % |\n|---|---:|")
    for name in names:
        stat = mean_interval([r[name] for r in rows if name in r])
        typer.echo(f"| {name} | {stat['mean']:.3f} ± {stat['ci95']:.3f} |")


if __name__ == "__main__":
    app()
