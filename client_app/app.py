"""The FedMosaic ClientApp (thin: what it does with a message is in ``client_app.handlers``).

With ``worker-socket`` in the SuperNode's ``--node-config``, each message goes to the node's warm
worker (``client_app.worker``), and this process imports only Flower; without it, or when no
worker answers there, the message is answered here. The client is identified by a **stable
client id**: ``client-id`` from ``--node-config`` in a deployment; in simulation the scenario's
client at the partition id's position (``client_app.handlers.client_id_of``).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client_app.worker import SOCKET_KEY, answer_with_worker

app = ClientApp()


def _answer(handler: str, msg: Message, context: Context) -> Message:
    socket_path = context.node_config.get(SOCKET_KEY)
    if socket_path:
        content = answer_with_worker(Path(str(socket_path)), handler, msg, context)
        if content is not None:
            return Message(content, reply_to=msg)
    from client_app import handlers  # torch and transformers: only when this process answers

    answer: Message = getattr(handlers, handler)(msg, context)
    return answer


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Handshake: who am I (stable id), which architecture, which adapter schema."""
    return _answer("query", msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: load G_i, train, probe, evaluate, save state; reply with the local states."""
    return _answer("train", msg, context)
