"""An in-process Flower ``Grid`` that hands each message to a Python callable (no SuperLink).

Used to drive the ServerApp's strategy and round loop with mock (or in-process ClientApp)
replies. A callable that returns ``None`` simulates a client that does not answer in time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedmosaic_flower.config import FederationConfig
from server_app.run_store import RunStore
from server_app.strategy import FedMosaicStrategy

Handler = Callable[[Message], Message | None]


class InProcessGrid(Grid):
    def __init__(self, handlers: dict[int, Handler]) -> None:
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 0
        self.handlers = handlers
        self.sent: list[Message] = []

    def set_run(self, run):  # type: ignore[no-untyped-def]
        self._run = run

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return getattr(self, "_run", None)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.handlers)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do when pushing
            self.sent.append(message)
            reply = self.handlers[message.metadata.dst_node_id](message)
            if reply is not None:
                replies.append(reply)
        return replies


@dataclass
class RunOutcome:
    strategy: FedMosaicStrategy
    rows: list[dict[str, Any]]
    run_dir: Path
    last_round: int


def run_federation(grid: Grid, config: FederationConfig, *, stop_after: int | None = None) -> RunOutcome:
    """What the ServerApp does, on a given grid: the strategy's ``start`` with a run store
    (``stop_after``: stop after that round, as a crashed server would)."""
    with RunStore(config) as store:
        strategy = FedMosaicStrategy(config, store)
        strategy.start(grid, num_rounds=stop_after or config.num_server_rounds)
    return RunOutcome(strategy, store.rows, store.dir, strategy.last_round)


def seeded(*parts: object) -> int:
    """A seed that is the same in every process (unlike ``hash()``)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little")
