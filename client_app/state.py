"""A client's state on its own disk, one snapshot per completed round: the one owner of its format.

In a deployment every message starts a fresh ClientApp process and ``context.state`` lives only in
the SuperNode's memory, so everything a client carries across rounds is saved here, keyed by its
**stable client id**:

``<state-root>/<run-name>/client-<id>/round-0003/``
    ``state.safetensors``: ``adapter/local/<key>``, ``adapter/global/<key>`` (shared and
    same-architecture keys of both branches), ``adapter/gate/<key>`` (the local-only gates),
    ``optim/<group>.<i>/<moment>`` (AdamW moments by parameter group and position) and
    ``tv/<name>`` (the task-vector accumulator);
    ``state.json``: ``round``, ``stream`` (position), ``replay`` (memory), ``optimizer`` (step
    counts) and ``task_vector`` (accumulator counters);
    and what the client answered for the round: ``reply/task-vector`` (tensor) and ``reply`` in
    ``state.json`` (the branch it uploaded, metrics, scores, architecture, model id and the
    SHA-256 of the global state it received), so that a repeated question is answered again
    from disk, without training the round twice.

Round ``t`` starts from the snapshot of round ``t-1`` (round 1 from scratch), so a client that
crashed mid-round, or a server that resumed from its round-``k`` checkpoint, replays the round
from exactly the same state. Snapshots are written to a temporary directory and renamed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from drake_data.streams import ReplayMemory, Stream
from fedmosaic_core.pqlora import PQLoRAModel
from fedmosaic_core.pqlora.state import is_key
from fedmosaic_core.rela import TaskVectorAccumulator
from fedmosaic_core.storage import SnapshotError, prune_rounds, read_snapshot, write_snapshot

ADAPTER, OPTIMIZER, TASK_VECTOR, REPLY = "adapter/", "optim/", "tv/", "reply/"
LOCAL, GLOBAL, GATE = "local/", "global/", "gate/"


class ClientStateError(RuntimeError):
    """A needed snapshot is missing or unreadable; the message names the directory."""


@dataclass
class ClientSnapshot:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class ClientStateStore:
    """Snapshots of one client's state, by round."""

    def __init__(self, root: Path, run_name: str, client_id: str, keep: int = 2) -> None:
        safe_id = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in client_id)
        self.dir = Path(root) / run_name / f"client-{safe_id}"
        self.keep = keep

    def _round_dir(self, server_round: int) -> Path:
        return self.dir / f"round-{server_round:04d}"

    def saved_rounds(self) -> list[int]:
        """Rounds with a complete snapshot, oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted(int(p.name[6:]) for p in self.dir.iterdir()
                      if p.is_dir() and p.name.startswith("round-") and p.name[6:].isdigit())

    def load_latest(self, up_to: int, at_least: int = 0) -> ClientSnapshot | None:
        """The newest state saved after a round ≤ ``up_to``; None when the client has not completed
        a round yet. A client can miss rounds (not selected, its node lost mid-round): it goes on
        from the last round it completed. ``at_least`` is the server's record of that round: older
        or no state means the state directory was moved, cleared or rolled back, an error."""
        rounds = [r for r in self.saved_rounds() if r <= up_to]
        newest = rounds[-1] if rounds else 0
        if newest < at_least:
            found = f"its newest state is from round {newest}" if newest else "it has no saved state"
            raise ClientStateError(
                f"client state in {self.dir} is missing: the server recorded round {at_least} as this "
                f"client's last completed round, but {found} (was the state directory moved or cleared?)"
            )
        return self.load_round(newest) if newest else None

    def load_round(self, server_round: int) -> ClientSnapshot | None:
        """The snapshot saved after exactly ``server_round``, or None (not saved, or pruned)."""
        if server_round not in self.saved_rounds():
            return None
        try:
            tensors, meta = read_snapshot(self._round_dir(server_round), "state")
        except SnapshotError as err:
            raise ClientStateError(str(err)) from None
        return ClientSnapshot(tensors=tensors, meta=meta)

    def save(self, server_round: int, snapshot: ClientSnapshot) -> Path:
        final = write_snapshot(self._round_dir(server_round), "state", snapshot.tensors, snapshot.meta)
        prune_rounds(self.dir, self.keep)
        return final


def adapter_snapshot(model: PQLoRAModel) -> dict[str, torch.Tensor]:
    """Both branches and the gates as one flat dict (``local/…``, ``global/…``, ``gate/…``)."""
    out: dict[str, torch.Tensor] = {}
    for branch, prefix in (("local", LOCAL), ("global", GLOBAL)):
        for key, value in {**model.shared_state(branch), **model.same_arch_state(branch)}.items():
            out[prefix + key] = value
    for key, value in model.local_only_state().items():
        out[GATE + key] = value
    return out


def _part(tensors: dict[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}


def restore_adapter(model: PQLoRAModel, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`adapter_snapshot` (validated by the adapter before anything is written)."""
    local, global_, gates = _part(tensors, LOCAL), _part(tensors, GLOBAL), _part(tensors, GATE)
    shared_keys = set(model.shared_state("local"))
    model.load_local_state(
        shared={k: v for k, v in local.items() if k in shared_keys},
        same_arch={k: v for k, v in local.items() if k not in shared_keys},
        local_only=gates,
    )
    model.load_global_state(
        shared={k: v for k, v in global_.items() if k in shared_keys},
        same_arch={k: v for k, v in global_.items() if k not in shared_keys},
    )


@dataclass
class SavedReply:
    """What a client answered for a round (:data:`REPLY`): ``upload`` names the adapter branch it
    sent; ``received`` is :func:`received_digest` of the global state the round started from;
    ``run_id`` the Flower run it answered (a new run of the same name does not reuse it)."""

    run_id: int
    upload: str
    task_vector: np.ndarray | None
    metrics: dict[str, float]
    scores: dict[str, dict[str, float]]
    arch: str
    model_id: str
    received: str


def received_digest(*states: Mapping[str, torch.Tensor] | None) -> str:
    """SHA-256 of global states as received (keys and float32 values; None and {} differ)."""
    sha = hashlib.sha256()
    for state in states:
        if state is None:
            sha.update(b"none;")
            continue
        sha.update(f"{len(state)};".encode())
        for key in sorted(state):
            sha.update(key.encode() + b"=")
            sha.update(state[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return sha.hexdigest()


def capture_state(
    server_round: int, model: PQLoRAModel, optimizer: torch.optim.Optimizer, names: dict[int, str],
    accumulator: TaskVectorAccumulator, stream: Stream, memory: ReplayMemory, reply: SavedReply | None = None,
) -> ClientSnapshot:
    """Everything a client carries into the next round, as one snapshot (and its reply)."""
    tensors = {ADAPTER + k: v for k, v in adapter_snapshot(model).items()}
    optim_tensors, optim_meta = optimizer_to_snapshot(optimizer, names)
    tv_tensors, tv_meta = accumulator.state_dict()
    tensors.update(optim_tensors)
    tensors.update({TASK_VECTOR + k: v for k, v in tv_tensors.items()})
    meta: dict[str, Any] = {"round": server_round, "stream": stream.state_dict(), "replay": memory.state_dict(),
                            "optimizer": optim_meta, "task_vector": tv_meta}
    if reply is not None:
        if reply.task_vector is not None:
            tensors[REPLY + "task-vector"] = torch.from_numpy(np.ascontiguousarray(reply.task_vector, np.float32))
        meta["reply"] = {"run-id": reply.run_id, "upload": reply.upload, "metrics": reply.metrics, "scores": reply.scores,
                         "arch": reply.arch, "model-id": reply.model_id, "received": reply.received}
    return ClientSnapshot(tensors, meta)


def saved_reply(snapshot: ClientSnapshot) -> tuple[SavedReply, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """The reply a snapshot keeps, with the uploaded branch's shared and same-architecture states;
    None for a snapshot without one."""
    meta = snapshot.meta.get("reply")
    if not isinstance(meta, dict):
        return None
    vector = snapshot.tensors.get(REPLY + "task-vector")
    reply = SavedReply(int(meta["run-id"]), str(meta["upload"]), None if vector is None else vector.numpy(),
                       {k: float(v) for k, v in meta["metrics"].items()}, meta["scores"],
                       str(meta["arch"]), str(meta["model-id"]), str(meta["received"]))
    branch = _part(snapshot.tensors, ADAPTER + (LOCAL if reply.upload == "local" else GLOBAL))
    shared = {k: v for k, v in branch.items() if is_key("shared", k)}
    same_arch = {k: v for k, v in branch.items() if not is_key("shared", k)}
    return reply, shared, same_arch


def restore_adapter_from(snapshot: ClientSnapshot, model: PQLoRAModel) -> None:
    """Only the adapter (both branches and the gates) of a snapshot: what scoring a finished
    client needs."""
    restore_adapter(model, _part(snapshot.tensors, ADAPTER))


def restore_state(
    snapshot: ClientSnapshot, model: PQLoRAModel, optimizer: torch.optim.Optimizer, names: dict[int, str],
    accumulator: TaskVectorAccumulator, stream: Stream, memory: ReplayMemory,
) -> None:
    """Inverse of :func:`capture_state`."""
    restore_adapter(model, _part(snapshot.tensors, ADAPTER))
    stream.load_state_dict(snapshot.meta["stream"])
    memory.load_state_dict(snapshot.meta["replay"])
    optimizer_from_snapshot(optimizer, names, snapshot.tensors, snapshot.meta["optimizer"])
    accumulator.load_state_dict(_part(snapshot.tensors, TASK_VECTOR), snapshot.meta["task_vector"])


def optimizer_to_snapshot(
    optimizer: torch.optim.Optimizer, names: dict[int, str], prefix: str = OPTIMIZER
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """AdamW-style state → (tensors keyed by parameter name, JSON meta). No pickle."""
    tensors: dict[str, torch.Tensor] = {}
    steps: dict[str, float] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state:
                continue
            name = names[id(param)]
            for key, value in state.items():
                if key == "step":
                    steps[name] = float(value)
                elif torch.is_tensor(value):
                    tensors[f"{prefix}{name}/{key}"] = value
    return tensors, {"steps": steps}


def optimizer_from_snapshot(
    optimizer: torch.optim.Optimizer,
    names: dict[int, str],
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    prefix: str = OPTIMIZER,
) -> None:
    steps = meta.get("steps", {})
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            if name not in steps:
                continue
            state: dict[str, Any] = {"step": torch.tensor(steps[name], dtype=torch.float32)}
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                value = tensors.get(f"{prefix}{name}/{key}")
                if value is not None:
                    if value.shape != param.shape:
                        raise ClientStateError(
                            f"optimizer state {name}/{key}: shape {tuple(value.shape)} "
                            f"!= parameter {tuple(param.shape)}"
                        )
                    state[key] = value.to(param.device, param.dtype).clone()
            optimizer.state[param] = state
