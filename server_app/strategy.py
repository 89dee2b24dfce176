"""The FedMosaic strategy on Flower's Message API.

Every round each selected client receives **its own** global adapter state ``G_i`` (a different
``Message`` per node), trains, and replies with its local shared state, its same-architecture
state, its compressed task vector and its metrics. ``aggregate_train`` turns the valid replies
into the next round's ``G_i`` with :func:`fedmosaic_core.rela.aggregate_global_states`.
``start`` drives the rounds through ``configure_train`` / ``aggregate_train`` as Flower's own
strategies do, and adds what FedMosaic needs: per-client globals instead of one global model,
a handshake that learns who each node is, a round timeout, checkpoints and resume.

Clients are identified by their **stable client id** (``client-id`` from ``--node-config`` in a
deployment, the partition id in simulation), learnt from a ``query`` handshake; Flower node ids
are only the current address of a client and may change when a SuperNode restarts.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedmosaic_core.methods import METHODS
from fedmosaic_core.pqlora.state import Spec
from fedmosaic_core.rela import ClientUpdate, GlobalState, aggregate_global_states
from fedmosaic_flower import records
from fedmosaic_flower.config import FederationConfig
from fedmosaic_flower.records import ProtocolError, client_sort_key
from server_app.run_store import RunStore

log = logging.getLogger("fedmosaic.server")

#: fields of a log row that a client's metrics may not overwrite
ROW_FIELDS = frozenset({"client", "arch", "model_id", "bytes_up", "bytes_down", "round", "scores",
                        "strategy", "round_time_s"})


@dataclass
class ClientRecord:
    """What the server knows about one client (learnt from the handshake)."""

    client_id: str
    arch: str
    model_id: str
    schema_shared: Spec
    schema_same_arch: Spec


@dataclass
class RoundOutcome:
    """Everything one round produced (for the log, the report and the checkpoint)."""

    server_round: int
    selected: list[str] = field(default_factory=list)
    replied: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def log_entry(self) -> dict[str, Any]:
        """The round's line in ``outcomes.jsonl``: who was asked, who counted, who was left out and why."""
        return {"round": self.server_round, "selected": list(self.selected), "replied": list(self.replied),
                "excluded": dict(self.excluded), "missing": list(self.missing)}


def round_config(config: FederationConfig, server_round: int) -> ConfigRecord:
    """Per-round instructions for the clients (training knobs come from the run config)."""
    last = server_round == config.num_server_rounds
    every = config.eval_others_every
    eval_others = last or (every > 0 and server_round % every == 0)
    return ConfigRecord(
        {
            "server-round": server_round,
            "num-server-rounds": config.num_server_rounds,
            "eval-others": bool(eval_others),
            "eval-unseen": bool(config.eval_unseen and eval_others),
            "run-name": config.resolved_run_name,
            # the local states the server aggregates: a client uploads only these
            "upload-shared": config.upload_shared,
            "upload-same-arch": config.upload_same_arch,
        }
    )


#: seconds before a node's unanswered handshake is asked again (then doubling; see register_nodes):
#: long enough for 20 ClientApps starting at once on 2 cores (about 150 s here)
HANDSHAKE_FIRST_WAIT = 300.0
#: seconds before a client whose train reply has not come is asked again (then doubling; see
#: train_replies). A client answers a repeated question from its saved state, so asking a client
#: that is still training costs one more ClientApp start after it finishes, nothing more.
TRAIN_FIRST_WAIT = 300.0


def _waits(first: float, timeout: float) -> list[float]:
    """How long each attempt of a question waits for its answers: ``first`` seconds, then twice as
    long each time, the last cut so that all of them add up to ``timeout`` (e.g. 300 + 600 for
    900). A fixed schedule, so that a grid that returns before the time is up (an answer that will
    not come) is not asked again and again."""
    waits: list[float] = []
    wait, left = first, timeout
    while left > 0:
        waits.append(min(wait, left))
        left -= waits[-1]
        wait *= 2
    return waits or [0.0]


class FedMosaicStrategy(Strategy):
    """RELA per-client aggregation (and the baselines on the same code path).

    ``config.strategy`` selects the aggregation (:data:`fedmosaic_core.methods.METHODS`):
    ``fedmosaic`` (relevance weights), ``fedmosaic-uniform`` (equal weights over the other
    clients), the architecture group's mean (``fedavg``, ``fedavg-dual``, ``feddpa``, ``ditto``,
    ``fedsim``; what a client does with it is its side) or ``local`` (no sharing); ``rela-fedavg``
    takes relevance weights with the client in its own mix. ``store``
    (optional) keeps the run log and checkpoints on disk.
    """

    def __init__(self, config: FederationConfig, store: RunStore | None = None) -> None:
        self.config = config
        self.store = store
        self.clients: dict[str, ClientRecord] = {}
        self.node_of: dict[str, int] = {}
        self.globals: dict[str, GlobalState] = {}
        self.task_vectors: dict[str, np.ndarray] = {}
        self.last_weights: np.ndarray | None = None
        self.last_weight_ids: list[str] = []
        self.last_outcome: RoundOutcome | None = None
        self.last_round = 0
        self._selected: dict[str, int] = {}
        self._sent_messages: dict[str, Message] = {}  # this round's latest train message per client
        self._round_messages: list[tuple[str, Message]] = []  # every train message of this round
        self.last_round_of: dict[str, int] = {}  # the last round whose reply each client completed
        self._sent_bytes: dict[str, int] = {}

    # ------------------------------------------------------------------ handshake
    def register_nodes(self, grid: Grid, node_ids: Iterable[int], timeout: float) -> None:
        """Ask unknown nodes who they are; map stable client ids to current node ids.

        A node that has not answered is asked again, after :data:`HANDSHAKE_FIRST_WAIT` seconds,
        then twice as long each time, until ``timeout``: Flower's SuperNode drops a reply whose
        push fails (e.g. HTTP 500 while the SuperLink's database is busy), and the question is
        cheap and safe to repeat. A node that answered, even unusably, is not asked again."""
        nodes = list(node_ids)
        answered: set[int] = set()
        for attempt, wait in enumerate(_waits(HANDSHAKE_FIRST_WAIT, timeout)):
            known_nodes = set(self.node_of.values())
            pending = [n for n in nodes if n not in known_nodes and n not in answered]
            if not pending:
                return
            if attempt:
                log.warning("handshake: no answer yet from node(s) %s; asking again", ", ".join(map(str, pending)))
            messages = [
                Message(RecordDict({records.CONFIG: ConfigRecord({"server-round": 0})}),
                        dst_node_id=node_id, message_type=MessageType.QUERY, group_id="handshake")
                for node_id in pending
            ]
            for reply in grid.send_and_receive(messages, timeout=wait):
                answered.add(reply.metadata.src_node_id)
                self.register_reply(reply)

    def register_reply(self, reply: Message) -> str | None:
        """Record one handshake reply; the client id, or None when the reply is unusable."""
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("handshake: node %s failed: %s", node_id, reply.error.reason)
            return None
        try:
            hello = records.parse_handshake(reply.content)
        except Exception as err:  # noqa: BLE001 - whatever a client sends, it is only this client's problem
            log.warning("handshake: node %s excluded: %s", node_id, _reason(err))
            return None
        bound_node = self.node_of.get(hello.client_id)
        if bound_node is not None and bound_node != node_id:
            # the binding lasts while its node is connected (``start`` drops vanished nodes first)
            log.warning("handshake: node %s claims client id %r, which is bound to node %s; refused",
                        node_id, hello.client_id, bound_node)
            return None
        bound_client = next((c for c, n in self.node_of.items() if n == node_id), None)
        if bound_client is not None and bound_client != hello.client_id:
            log.warning("handshake: node %s, bound to client %r, claims client id %r; refused",
                        node_id, bound_client, hello.client_id)
            return None
        self.node_of[hello.client_id] = node_id
        self.clients[hello.client_id] = ClientRecord(
            hello.client_id, hello.arch, hello.model_id, hello.shared_spec, hello.same_arch_spec
        )
        return hello.client_id

    # ------------------------------------------------------------------ train
    def select_clients(self, server_round: int) -> list[str]:
        """A seeded fraction of the known clients (all of them at fraction 1)."""
        ids = sorted(self.node_of, key=client_sort_key)
        count = max(1, math.ceil(self.config.fraction_train * len(ids)))
        if count >= len(ids):
            return ids
        rng = random.Random(self.config.seed * 100_003 + server_round)
        return sorted(rng.sample(sorted(self.node_of), count), key=client_sort_key)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per selected client, carrying that client's own global state.

        ``arrays`` is unused: there is no single global model. ``config`` is extended with this
        round's instructions (:func:`round_config`)."""
        messages = []
        self._selected, self._sent_bytes, self._sent_messages, self._round_messages = {}, {}, {}, []
        instructions = {**dict(config), **dict(round_config(self.config, server_round))}
        for client_id in self.select_clients(server_round):
            # the client's saved state must reach its last completed round (it may have missed some)
            content = RecordDict({records.CONFIG: ConfigRecord(
                {**instructions, "last-round": self.last_round_of.get(client_id, 0)})})
            state = self.globals.get(client_id)
            if state is not None and self.config.strategy != "local":
                content[records.GLOBAL_SHARED] = records.encode_state(state.shared)
                content[records.GLOBAL_SAME_ARCH] = records.encode_state(state.same_arch)
            node_id = self.node_of[client_id]
            self._selected[client_id] = node_id
            self._sent_bytes[client_id] = records.content_bytes(content)
            message = Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN, group_id=str(server_round))
            self._sent_messages[client_id] = message
            self._round_messages.append((client_id, message))
            messages.append(message)
        return messages

    def train_replies(self, grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
        """Send the round's train messages and collect the replies within ``timeout`` seconds.

        A client whose reply has not come is asked again after :data:`TRAIN_FIRST_WAIT` seconds,
        then twice as long each time: Flower's SuperNode drops a reply whose push fails (e.g.
        HTTP 500 while the SuperLink's database is busy). The client answers a repeated question
        from the state it saved after training the round, so no round is trained twice."""
        replies: list[Message] = []
        pending = list(messages)
        for wait in _waits(TRAIN_FIRST_WAIT, timeout):
            replies += grid.send_and_receive(pending, timeout=wait)
            answered = set(self._reply_clients(replies))
            waiting = [c for c in self._sent_messages if c not in answered]
            if not waiting:
                break
            log.warning("round %s: no reply yet from client(s) %s; asking again",
                        messages[0].metadata.group_id, ", ".join(waiting))
            pending = []
            for client in waiting:
                sent = self._sent_messages[client]
                again = Message(sent.content, dst_node_id=sent.metadata.dst_node_id,
                                message_type=MessageType.TRAIN, group_id=sent.metadata.group_id)
                self._sent_messages[client] = again
                self._round_messages.append((client, again))
                pending.append(again)
        return replies

    def _client_of_reply(self, reply: Message) -> str:
        """The client a reply is about. An error reply that the SuperLink makes for a lost node
        (NODE_UNAVAILABLE) comes from the SuperLink's node id, so map it through the message it
        answers (the grid sets each sent message's id); else through the sender's node."""
        return self._reply_clients([reply])[0]

    def _reply_clients(self, replies: list[Message]) -> list[str]:
        """:meth:`_client_of_reply` of each reply (with one lookup table for all)."""
        by_message = {m.metadata.message_id: c for c, m in self._round_messages if m.metadata.message_id}
        by_node = {n: c for c, n in self._selected.items()}
        return [by_message.get(r.metadata.reply_to_message_id)
                or by_node.get(r.metadata.src_node_id, f"node-{r.metadata.src_node_id}") for r in replies]

    def parse_reply(
        self, reply: Message, server_round: int, shared_into: torch.Tensor | None = None, shared_spec: Spec | None = None
    ) -> tuple[ClientUpdate, dict[str, Any]]:
        """Decode one train reply of ``server_round`` and check it against the handshake and the
        message it answers: ProtocolError if unusable. ``shared_into``/``shared_spec``: where to
        decode the shared state (:func:`fedmosaic_flower.records.decode_state`)."""
        if reply.has_error():
            raise ProtocolError(f"error reply {_error_name(reply.error.code)} (code {reply.error.code}): "
                                f"{reply.error.reason}")
        if reply.metadata.group_id != str(server_round) or reply.metadata.message_type != MessageType.TRAIN:
            raise ProtocolError(
                f"stale or foreign reply: it answers a {reply.metadata.message_type!r} message of group "
                f"{reply.metadata.group_id!r}, not this round's train message (group '{server_round}')"
            )
        decoded = records.parse_train_reply(reply.content, self.config.max_reply_mb * 2**20, shared_into, shared_spec,
                                            want_shared=self.config.upload_shared,
                                            want_same_arch=self.config.upload_same_arch)
        known = self.clients.get(decoded.client_id)
        if known is None:
            raise ProtocolError(f"unknown client id {decoded.client_id!r} (no handshake)")
        expected_node = self._selected.get(decoded.client_id)
        if expected_node is None:
            raise ProtocolError(f"client {decoded.client_id!r} was not asked to train this round")
        if reply.metadata.src_node_id != expected_node:
            raise ProtocolError(
                f"reply for client {decoded.client_id!r} came from node {reply.metadata.src_node_id}, "
                f"not from its node {expected_node}"
            )
        if decoded.arch != known.arch:
            raise ProtocolError(f"architecture changed from {known.arch!r} to {decoded.arch!r} without a handshake")
        update = ClientUpdate(decoded.client_id, known.arch, decoded.shared, decoded.same_arch, decoded.task_vector)
        row: dict[str, Any] = {k.replace("-", "_"): v for k, v in decoded.metrics.items()
                               if k.replace("-", "_") not in ROW_FIELDS}
        row.update(client=decoded.client_id, arch=known.arch, model_id=known.model_id, bytes_up=decoded.size_bytes)
        if decoded.scores:
            row["scores"] = decoded.scores
        return update, row

    def expected_schemas(self) -> tuple[Spec | None, dict[str, Spec], dict[str, str]]:
        """The schemas the round is checked against, each declared at the handshake by a strict
        majority of the registered clients it applies to (the shared one by all clients, an
        architecture's same-arch one by that architecture's clients): never the first to
        register. A state the clients do not upload (:func:`round_config`) is expected empty, and
        a tie over its schema refuses no one. Returns (shared schema, same-arch schema per
        architecture, client id → reason for the clients whose schema is tied, so refused)."""
        def majority(specs: list[Spec], uploaded: bool) -> Spec | None:
            if specs and not uploaded:
                return {}
            votes = Counter(tuple(sorted(spec.items())) for spec in specs)
            ranked = votes.most_common(2)
            if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
                return None
            return dict(ranked[0][0])

        refused: dict[str, str] = {}
        records_ = list(self.clients.values())
        shared = majority([rec.schema_shared for rec in records_], self.config.upload_shared)
        if shared is None and records_:
            refused = {rec.client_id: "no majority for the shared schema among the handshakes (a tie); refused"
                       for rec in records_}
        same_arch: dict[str, Spec] = {}
        for arch in sorted({rec.arch for rec in records_}):
            members = [rec for rec in records_ if rec.arch == arch]
            spec = majority([rec.schema_same_arch for rec in members], self.config.upload_same_arch)
            if spec is None:
                for rec in members:
                    refused.setdefault(rec.client_id, f"no majority for the same-architecture schema of {arch!r} "
                                                      "among its clients' handshakes (a tie); refused")
            else:
                same_arch[arch] = spec
        return shared, same_arch, refused

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, log exclusions, and build every client's next global state.

        Returns no ArrayRecord (each client's global stays on the server, sent by the next
        ``configure_train``) and the round's MetricRecord; details in :attr:`last_outcome`."""
        outcome = RoundOutcome(server_round)
        updates: list[ClientUpdate] = []
        expected_shared, expected_same_arch, refused = self.expected_schemas()
        # The shared states are decoded straight into the rows of one round matrix, in client-id
        # order (the order of every sum), which the aggregation then mixes in place.
        replies = list(replies)
        ordered = [reply for _, reply in sorted(zip(self._reply_clients(replies), replies, strict=True),
                                                key=lambda pair: client_sort_key(pair[0]))]
        row_spec = dict(sorted(expected_shared.items())) if expected_shared else None
        width = sum(math.prod(shape) for shape in row_spec.values()) if row_spec else 0
        round_rows = torch.empty(len(ordered), width) if width else None
        for reply in ordered:
            into = round_rows[len(updates)] if round_rows is not None else None
            try:
                update, row = self.parse_reply(reply, server_round, into, row_spec)
            except Exception as err:  # noqa: BLE001 - any unreadable reply excludes its client, the round goes on
                client = self._client_of_reply(reply)
                log.warning("round %d: client %s excluded: %s", server_round, client, _reason(err))
                outcome.excluded[client] = _reason(err)
                continue
            if any(u.client_id == update.client_id for u in updates):
                log.warning("round %d: duplicate reply from %s ignored", server_round, update.client_id)
                continue
            row["bytes_down"] = self._sent_bytes.get(update.client_id, 0)
            row["round"] = server_round
            updates.append(update)
            outcome.rows.append(row)
        seen = {u.client_id for u in updates}
        outcome.selected = sorted(self._selected, key=client_sort_key)
        outcome.missing = sorted(set(self._selected) - seen - set(outcome.excluded), key=client_sort_key)
        for client in outcome.missing:
            log.warning("round %d: client %s did not reply in time; left out", server_round, client)
        # replies arrive in whatever order the clients finish: aggregate in client-id order so the
        # floating-point sums, and hence a whole run, are reproducible for a seed
        updates.sort(key=lambda u: client_sort_key(u.client_id))
        for update in [u for u in updates if u.client_id in refused]:
            outcome.excluded[update.client_id] = refused[update.client_id]
            log.warning("round %d: client %s excluded: %s", server_round, update.client_id, refused[update.client_id])
        updates = [u for u in updates if u.client_id not in refused]
        outcome.rows = [r for r in outcome.rows if r["client"] not in refused]
        result = aggregate_global_states(
            updates, dict(self.globals), mode=METHODS[self.config.strategy].aggregation,
            tau=self.config.tau,
            expected_shared=expected_shared, expected_same_arch=expected_same_arch,
            norm_bound=self.config.norm_bound, share_across_families=self.config.share_across_families,
            include_self=self.config.include_self or METHODS[self.config.strategy].include_self,
            peerless_global=self.config.peerless_global,
        )
        for client, reason in result.excluded.items():
            outcome.excluded[client] = reason
            log.warning("round %d: client %s excluded from aggregation: %s", server_round, client, reason)
        valid = set(result.client_ids)
        for client in valid:
            self.last_round_of[client] = server_round
        outcome.replied = sorted(valid, key=client_sort_key)
        outcome.rows = sorted((r for r in outcome.rows if r["client"] in valid),
                              key=lambda r: client_sort_key(str(r["client"])))
        for u in updates:
            if u.client_id in valid and u.task_vector is not None:
                self.task_vectors[u.client_id] = u.task_vector
        self.globals.update(result.globals)
        if result.weights is not None and result.weights.size:
            self.last_weights = result.weights
            self.last_weight_ids = list(result.client_ids)
        self.last_outcome = outcome
        losses = [float(r["train_loss"]) for r in outcome.rows if isinstance(r.get("train_loss"), float)]
        metrics: dict[str, int | float | list[int] | list[float]] = {"num-replied": len(outcome.replied), "num-excluded": len(outcome.excluded),
                   "num-missing": len(outcome.missing)}
        if losses and all(math.isfinite(x) for x in losses):
            metrics["train-loss"] = float(np.mean(losses))
        return None, MetricRecord(metrics)

    # ------------------------------------------------------------------ evaluate (in train)
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation rides in the train message (one model load per round): nothing to send."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        c = self.config
        log.info("FedMosaicStrategy: strategy=%s tau=%s fraction-train=%s min-clients=%s timeout=%ss",
                 c.strategy, c.tau, c.fraction_train, c.min_clients, c.round_timeout)

    # ------------------------------------------------------------------ the rounds
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run rounds up to ``num_rounds`` (default ``num-server-rounds``), resuming after the
        store's newest checkpoint when the config says ``resume``.

        ``initial_arrays``, ``evaluate_config`` and ``evaluate_fn`` are not used: clients start
        from their own zero-output adapters and evaluate inside the train round."""
        num_rounds = self.config.num_server_rounds if num_rounds is None else num_rounds
        timeout = self.config.round_timeout if timeout is None else timeout
        train_config = train_config or ConfigRecord()
        first_round = 1
        if self.store is not None:
            first_round, checkpoint = self.store.open()
            if checkpoint is not None:
                self.load_state(*checkpoint)
        self.last_round = first_round - 1
        self.summary()
        result = Result()
        for server_round in range(first_round, num_rounds + 1):
            nodes = wait_for_nodes(grid, self.config.min_clients, timeout)
            present = set(nodes)
            for client, node in list(self.node_of.items()):
                if node not in present:
                    del self.node_of[client]
            self.register_nodes(grid, nodes, timeout)
            if len(self.node_of) < self.config.min_clients:
                raise RuntimeError(f"round {server_round}: only {len(self.node_of)} client(s) registered, "
                                   f"min-clients={self.config.min_clients}")
            log.info("[ROUND %d/%d] %d clients", server_round, self.config.num_server_rounds, len(self.node_of))
            started = time.monotonic()
            messages = list(self.configure_train(server_round, ArrayRecord(), train_config, grid))
            replies = self.train_replies(grid, messages, timeout)
            _, metrics = self.aggregate_train(server_round, replies)
            outcome = self.last_outcome
            assert outcome is not None and metrics is not None
            elapsed = time.monotonic() - started
            for row in outcome.rows:
                row["strategy"] = self.config.strategy
                row["round_time_s"] = round(elapsed, 3)
            result.train_metrics_clientapp[server_round] = metrics
            if self.store is not None:
                self.store.record_round(server_round, outcome.rows, self.state_tensors(), self.state_meta(),
                                        outcome=outcome.log_entry())
            log.info("round %d done in %.1fs: %d replied, %d excluded, %d missing", server_round, elapsed,
                     len(outcome.replied), len(outcome.excluded), len(outcome.missing))
            self.last_round = server_round
        return result

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
                c: {"arch": r.arch, "model_id": r.model_id,
                    "schema_shared": {k: list(v) for k, v in r.schema_shared.items()},
                    "schema_same_arch": {k: list(v) for k, v in r.schema_same_arch.items()}}
                for c, r in self.clients.items()
            },
            "weight_ids": self.last_weight_ids,
            "last_rounds": dict(self.last_round_of),
        }

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Inverse of :meth:`state_tensors` / :meth:`state_meta`."""
        self.clients = {
            c: ClientRecord(c, r["arch"], r["model_id"],
                            {k: tuple(v) for k, v in r["schema_shared"].items()},
                            {k: tuple(v) for k, v in r["schema_same_arch"].items()})
            for c, r in meta.get("clients", {}).items()
        }
        self.last_round_of = {str(c): int(r) for c, r in meta.get("last_rounds", {}).items()}
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
        self.globals = {c: GlobalState(shared=g["shared"], same_arch=g["same-arch"]) for c, g in globals_.items()}
        self.last_weight_ids = list(meta.get("weight_ids", []))


def _reason(err: Exception) -> str:
    """A protocol error's own text; for anything else (a bug the message triggered) its type too."""
    return str(err) if isinstance(err, ProtocolError) else f"unreadable message ({type(err).__name__}: {err})"


def wait_for_nodes(grid: Grid, minimum: int, timeout: float, poll: float = 1.0) -> list[int]:
    """Node ids once at least ``minimum`` are connected (or whatever is there at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum or time.monotonic() >= deadline:
            return nodes
        time.sleep(poll)


def _error_name(code: int) -> str:
    """Flower's name of a Message error code (``NODE_UNAVAILABLE`` for a lost SuperNode)."""
    from flwr.common.constant import ErrorCode

    names = {v: k for k, v in vars(ErrorCode).items() if k.isupper() and isinstance(v, int)}
    return names.get(code, "UNKNOWN")
