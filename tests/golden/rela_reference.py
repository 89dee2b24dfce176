"""Reference RELA weights and per-client globals for tests/test_strategy_golden.py.

Written from the method's equations with plain NumPy loops, independent of the project's code:

    s_ij = (1/C) Σ_c cos(g_i[:, c], g_j[:, c])                   task similarity of sketches
    w_ij = exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ)  (j ≠ i),  w_ii = 0     relevance weights
    G_i[P/Q] = Σ_j w_ij L_j                                         shared part, every architecture
    G_i[A/B] = Σ_{j∈arch(i)} w_ij L_j / Σ_{j∈arch(i)} w_ij          plain LoRA, same architecture only

A client alone in its architecture gets its own local plain LoRA as that global (as the reference
code does). Run ``python tests/golden/rela_reference.py``
to rewrite ``rela_golden.json`` (inputs and expected outputs, seeded).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

TAU = 0.5
CLIENTS = [("c0", "arch-a"), ("c1", "arch-a"), ("c2", "arch-b"), ("c3", "arch-a")]
WIDTH = {"arch-a": 3, "arch-b": 5}
R = 2


def main() -> None:
    rng = np.random.default_rng(2026)
    base = rng.normal(size=(3, 4))
    inputs = {}
    for index, (cid, arch) in enumerate(CLIENTS):
        related = base if index != 2 else rng.normal(size=(3, 4))
        d = WIDTH[arch]
        inputs[cid] = {
            "arch": arch,
            "sketch": (related + 0.5 * rng.normal(size=(3, 4))).round(4).tolist(),
            "shared": {"pq.0.q_proj.P": rng.normal(size=(R, R)).round(4).tolist(),
                       "pq.0.q_proj.Q": rng.normal(size=(R,)).round(4).tolist()},
            "same-arch": {"lora.1.q_proj.A": rng.normal(size=(R, d)).round(4).tolist(),
                          "lora.1.q_proj.B": rng.normal(size=(d, R)).round(4).tolist()},
        }
    ids = [cid for cid, _ in CLIENTS]
    sim = [[0.0] * len(ids) for _ in ids]
    for i, a in enumerate(ids):
        for j, b in enumerate(ids):
            ga, gb = np.array(inputs[a]["sketch"]), np.array(inputs[b]["sketch"])
            cosines = []
            for c in range(ga.shape[1]):
                x, y = ga[:, c], gb[:, c]
                cosines.append(float(x @ y) / (math.sqrt(float(x @ x)) * math.sqrt(float(y @ y))))
            sim[i][j] = sum(cosines) / len(cosines)
    weights = []
    for i in range(len(ids)):
        total = sum(math.exp(sim[i][k] / TAU) for k in range(len(ids)) if k != i)
        weights.append([0.0 if j == i else math.exp(sim[i][j] / TAU) / total for j in range(len(ids))])
    globals_ = {}
    for i, cid in enumerate(ids):
        shared = {key: sum(weights[i][j] * np.array(inputs[other]["shared"][key]) for j, other in enumerate(ids)).tolist()
                  for key in inputs[cid]["shared"]}
        peers = [j for j, other in enumerate(ids) if inputs[other]["arch"] == inputs[cid]["arch"] and j != i]
        if peers:
            norm = sum(weights[i][j] for j in peers)
            same = {key: (sum(weights[i][j] * np.array(inputs[ids[j]]["same-arch"][key]) for j in peers) / norm).tolist()
                    for key in inputs[cid]["same-arch"]}
        else:
            same = {key: list(value) for key, value in inputs[cid]["same-arch"].items()}
        globals_[cid] = {"shared": shared, "same-arch": same}
    out = {"tau": TAU, "ids": ids, "inputs": inputs, "weights": weights, "globals": globals_}
    (Path(__file__).with_name("rela_golden.json")).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
