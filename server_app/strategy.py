"""The FedMosaic strategy on Flower's Message API.

Every round each selected client receives **its own** global adapter state ``G_i`` (a different
``Message`` per node), trains, and replies with its local shared state, its same-architecture
state, its compressed task vector and its metrics. ``aggregate_train`` turns the valid replies
into the next round's ``G_i`` with :func:`fedmosaic_core.rela.aggregate_global_states`.

Clients are identified by their **stable client id** (``client-id`` from ``--node-config`` in a
deployment, the partition id in simulation), learnt from a ``query`` handshake; Flower node ids
are only the current address of a client and may change when a SuperNode restarts.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmosaic_core.federation import protocol as proto
from fedmosaic_core.federation.config import FederationConfig
from fedmosaic_core.rela import ClientUpdate, GlobalState, aggregate_global_states

log = logging.getLogger("fedmosaic.server")


@dataclass
class ClientRecord:
    """What the server knows about one client (learnt from the handshake)."""

    client_id: str
    arch: str
    model_id: str
    schema_shared: dict[str, tuple[int, ...]]
    schema_same_arch: dict[str, tuple[int, ...]]


@dataclass
class RoundOutcome:
    """Everything one round produced (for the log, the report and the checkpoint)."""

    server_round: int
    replied: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    weights: np.ndarray | None = None
    weight_ids: list[str] = field(default_factory=list)


class FedMosaicStrategy(Strategy):
    """RELA per-client aggregation (and the baselines on the same code path).

    ``config.strategy`` selects: ``fedmosaic`` (relevance weights), ``fedmosaic-uniform`` (equal
    weights over the other clients), ``fedavg`` (averaging within architecture groups) and
    ``local`` (no sharing).
    """

    def __init__(self, config: FederationConfig) -> None:
        self.config = config
        self.clients: dict[str, ClientRecord] = {}
        self.node_of: dict[str, int] = {}
        self.globals: dict[str, GlobalState] = {}
        self.task_vectors: dict[str, np.ndarray] = {}
        self.last_weights: np.ndarray | None = None
        self.last_weight_ids: list[str] = []
        self._sent_bytes: dict[str, int] = {}

    # ------------------------------------------------------------------ handshake
    def register_nodes(self, grid: Grid, node_ids: Iterable[int], timeout: float) -> None:
        """Ask unknown nodes who they are; map stable client ids to current node ids."""
        known_nodes = set(self.node_of.values())
        unknown = [n for n in node_ids if n not in known_nodes]
        if not unknown:
            return
        messages = [
            Message(
                RecordDict({proto.CONFIG: ConfigRecord({"server-round": 0})}),
                dst_node_id=node_id,
                message_type=MessageType.QUERY,
                group_id="handshake",
            )
            for node_id in unknown
        ]
        for reply in grid.send_and_receive(messages, timeout=timeout):
            self.register_reply(reply)

    def register_reply(self, reply: Message) -> str | None:
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("handshake: node %s failed: %s", node_id, reply.error.reason)
            return None
        try:
            info = proto.read_client_info(reply.content)
            schema = info.get("schema")
            if not isinstance(schema, dict) or {"shared", "same-arch"} - set(schema):
                raise proto.ProtocolError("client-info: missing 'schema' with 'shared' and 'same-arch'")
        except proto.ProtocolError as err:
            log.warning("handshake: node %s excluded: %s", node_id, err)
            return None
        client_id = info["client-id"]
        previous_node = self.node_of.get(client_id)
        if previous_node is not None and previous_node != node_id:
            log.info("client %s moved from node %s to node %s", client_id, previous_node, node_id)
        self.node_of[client_id] = node_id
        self.clients[client_id] = ClientRecord(
            client_id=client_id,
            arch=info["arch"],
            model_id=info["model-id"],
            schema_shared={k: tuple(v) for k, v in schema["shared"].items()},
            schema_same_arch={k: tuple(v) for k, v in schema["same-arch"].items()},
        )
        return client_id

    # ------------------------------------------------------------------ train
    def select_clients(self, server_round: int) -> list[str]:
        """A seeded fraction of the known clients (all of them at fraction 1)."""
        ids = sorted(self.node_of)
        count = max(1, math.ceil(self.config.fraction_train * len(ids)))
        if count >= len(ids):
            return ids
        rng = random.Random(self.config.seed * 100_003 + server_round)
        return sorted(rng.sample(ids, count))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per selected client, carrying that client's own global state."""
        messages = []
        self._sent_bytes = {}
        for client_id in self.select_clients(server_round):
            content = RecordDict({proto.CONFIG: ConfigRecord(dict(config))})
            state = self.globals.get(client_id)
            if state is not None and self.config.strategy != "local":
                content[proto.GLOBAL_SHARED] = proto.encode_state(state.shared)
                content[proto.GLOBAL_SAME_ARCH] = proto.encode_state(state.same_arch)
            self._sent_bytes[client_id] = proto.content_bytes(content)
            messages.append(
                Message(
                    content,
                    dst_node_id=self.node_of[client_id],
                    message_type=MessageType.TRAIN,
                    group_id=str(server_round),
                )
            )
        return messages

    def parse_reply(self, reply: Message) -> tuple[ClientUpdate, dict[str, Any]]:
        """Decode one train reply; raises ProtocolError with the reason when it is unusable."""
        if reply.has_error():
            raise proto.ProtocolError(f"client error: {reply.error.reason}")
        size = proto.content_bytes(reply.content)
        if size > self.config.max_reply_mb * 2**20:
            raise proto.ProtocolError(
                f"reply of {size / 2**20:.1f} MB exceeds max-reply-mb={self.config.max_reply_mb}"
            )
        info = proto.read_client_info(reply.content)
        client_id = info["client-id"]
        known = self.clients.get(client_id)
        if known is None:
            raise proto.ProtocolError(f"unknown client id {client_id!r} (no handshake)")
        if info["arch"] != known.arch:
            raise proto.ProtocolError(
                f"architecture changed from {known.arch!r} to {info['arch']!r} without a handshake"
            )
        records = reply.content.array_records
        for key in (proto.LOCAL_SHARED, proto.LOCAL_SAME_ARCH, proto.TASK_VECTOR):
            if key not in records:
                raise proto.ProtocolError(f"reply has no {key!r} record")
        update = ClientUpdate(
            client_id=client_id,
            arch=known.arch,
            shared=proto.decode_state(records[proto.LOCAL_SHARED], proto.LOCAL_SHARED),
            same_arch=proto.decode_state(records[proto.LOCAL_SAME_ARCH], proto.LOCAL_SAME_ARCH),
            task_vector=proto.decode_task_vector(records[proto.TASK_VECTOR]),
        )
        metrics = dict(reply.content.metric_records.get(proto.METRICS, MetricRecord()))
        row: dict[str, Any] = {
            "client": client_id,
            "arch": known.arch,
            "model_id": known.model_id,
            "bytes_up": size,
            **{k.replace("-", "_"): v for k, v in metrics.items()},
        }
        scores = info.get("scores")
        if isinstance(scores, dict):
            row["scores"] = scores
        return update, row

    def expected_schemas(
        self,
    ) -> tuple[dict[str, tuple[int, ...]] | None, dict[str, dict[str, tuple[int, ...]]]]:
        """Shared schema agreed by the majority of clients; same-arch schema per architecture."""
        shared_votes: dict[tuple[tuple[str, tuple[int, ...]], ...], int] = {}
        same_arch: dict[str, dict[str, tuple[int, ...]]] = {}
        for rec in self.clients.values():
            key = tuple(sorted(rec.schema_shared.items()))
            shared_votes[key] = shared_votes.get(key, 0) + 1
            same_arch.setdefault(rec.arch, rec.schema_same_arch)
        if not shared_votes:
            return None, same_arch
        best = max(shared_votes.items(), key=lambda kv: kv[1])[0]
        return dict(best), same_arch

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        outcome = self.aggregate_round(server_round, list(replies), expected=None)
        metrics = MetricRecord({"num-replied": len(outcome.replied)})
        return None, metrics

    def aggregate_round(
        self, server_round: int, replies: list[Message], expected: list[str] | None
    ) -> RoundOutcome:
        """Validate replies, log exclusions, and build every client's next global state."""
        outcome = RoundOutcome(server_round)
        updates: list[ClientUpdate] = []
        seen: set[str] = set()
        for reply in replies:
            node_id = reply.metadata.src_node_id
            try:
                update, row = self.parse_reply(reply)
            except proto.ProtocolError as err:
                client = next((c for c, n in self.node_of.items() if n == node_id), f"node-{node_id}")
                log.warning("round %d: client %s excluded: %s", server_round, client, err)
                outcome.excluded[client] = str(err)
                continue
            if update.client_id in seen:
                log.warning("round %d: duplicate reply from %s ignored", server_round, update.client_id)
                continue
            seen.add(update.client_id)
            row["bytes_down"] = self._sent_bytes.get(update.client_id, 0)
            row["round"] = server_round
            updates.append(update)
            outcome.rows.append(row)
        if expected is not None:
            outcome.missing = sorted(set(expected) - seen - set(outcome.excluded))
            for client in outcome.missing:
                log.warning("round %d: client %s did not reply in time; left out", server_round, client)
        # replies arrive in whatever order the clients finish: aggregate in client-id order so the
        # floating-point sums, and hence a whole run, are reproducible for a seed
        updates.sort(key=lambda u: client_sort_key(u.client_id))
        outcome.rows.sort(key=lambda r: client_sort_key(str(r["client"])))
        expected_shared, expected_same_arch = self.expected_schemas()
        result = aggregate_global_states(
            updates,
            dict(self.globals),
            mode=self.config.strategy,
            tau=self.config.tau,
            expected_shared=expected_shared,
            expected_same_arch=expected_same_arch,
        )
        for client, reason in result.excluded.items():
            outcome.excluded[client] = reason
            log.warning("round %d: client %s excluded from aggregation: %s", server_round, client, reason)
        valid = {u.client_id for u in updates} - set(result.excluded)
        outcome.replied = sorted(valid)
        outcome.rows = [r for r in outcome.rows if r["client"] in valid]
        for u in updates:
            if u.client_id in valid and u.task_vector is not None:
                self.task_vectors[u.client_id] = u.task_vector
        self.globals.update(result.globals)
        outcome.weights = result.weights
        outcome.weight_ids = list(result.client_ids)
        if result.weights is not None and result.weights.size:
            self.last_weights = result.weights
            self.last_weight_ids = list(result.client_ids)
        return outcome

    # ------------------------------------------------------------------ evaluate (in train)
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation rides in the train message (one model load per round): nothing to send."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info(
            "FedMosaicStrategy: strategy=%s tau=%s fraction-train=%s min-clients=%s timeout=%ss",
            self.config.strategy,
            self.config.tau,
            self.config.fraction_train,
            self.config.min_clients,
            self.config.round_timeout,
        )

    # ------------------------------------------------------------------ state for checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict of all per-client server state (for safetensors)."""
        out: dict[str, torch.Tensor] = {}
        for client, state in self.globals.items():
            for key, value in state.shared.items():
                out[f"globals/{client}/shared/{key}"] = value.detach().cpu().float().contiguous()
            for key, value in state.same_arch.items():
                out[f"globals/{client}/same-arch/{key}"] = value.detach().cpu().float().contiguous()
        for client, vector in self.task_vectors.items():
            out[f"task-vectors/{client}"] = torch.from_numpy(np.ascontiguousarray(vector, np.float32))
        if self.last_weights is not None:
            out["weights"] = torch.from_numpy(np.ascontiguousarray(self.last_weights, np.float64))
        return out

    def state_meta(self) -> dict[str, Any]:
        return {
            "clients": {
                c: {
                    "arch": r.arch,
                    "model_id": r.model_id,
                    "schema_shared": {k: list(v) for k, v in r.schema_shared.items()},
                    "schema_same_arch": {k: list(v) for k, v in r.schema_same_arch.items()},
                }
                for c, r in self.clients.items()
            },
            "weight_ids": self.last_weight_ids,
        }

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Inverse of :meth:`state_tensors` / :meth:`state_meta`."""
        self.clients = {
            c: ClientRecord(
                client_id=c,
                arch=r["arch"],
                model_id=r["model_id"],
                schema_shared={k: tuple(v) for k, v in r["schema_shared"].items()},
                schema_same_arch={k: tuple(v) for k, v in r["schema_same_arch"].items()},
            )
            for c, r in meta.get("clients", {}).items()
        }
        globals_: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        self.task_vectors = {}
        self.last_weights = None
        for name, value in tensors.items():
            parts = name.split("/", 3)
            if parts[0] == "globals" and len(parts) == 4:
                _, client, kind, key = parts
                globals_.setdefault(client, {"shared": {}, "same-arch": {}})[kind][key] = value
            elif parts[0] == "task-vectors" and len(parts) == 2:
                self.task_vectors[parts[1]] = value.numpy().astype(np.float32)
            elif name == "weights":
                self.last_weights = value.numpy()
        self.globals = {
            c: GlobalState(shared=g["shared"], same_arch=g["same-arch"]) for c, g in globals_.items()
        }
        self.last_weight_ids = list(meta.get("weight_ids", []))


def client_sort_key(client_id: str) -> tuple[int, int, str]:
    """Numeric ids in numeric order, then the others by name."""
    return (0, int(client_id), "") if client_id.isdigit() else (1, 0, client_id)


def wait_for_nodes(grid: Grid, minimum: int, timeout: float, poll: float = 1.0) -> list[int]:
    """Node ids once at least ``minimum`` are connected (or whatever is there at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum or time.monotonic() >= deadline:
            return nodes
        time.sleep(poll)
