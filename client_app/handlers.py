"""What the FedMosaic ClientApp does with each message (``client_app.app`` dispatches here, in its
own process or in the node's warm worker, ``client_app.worker``; the logic lives in
``client_app.training``).

The client is identified by a **stable client id**: ``client-id`` from ``--node-config`` in a
deployment; in simulation the scenario's client at the partition id's position (ids in
increasing order). Its state lives under ``state-dir`` (node config) or
``<run dir>/clients``; its data under ``data-root`` (node config) or the run's data root.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedmosaic_flower.logs import quiet_libraries

quiet_libraries()  # before the libraries are imported

from flwr.app import Context, Message, RecordDict  # noqa: E402

from client_app.resources import get_resources  # noqa: E402
from client_app.training import FedMosaicClient  # noqa: E402
from drake_data.layout import Scenario  # noqa: E402
from fedmosaic_flower import records as proto  # noqa: E402
from fedmosaic_flower.config import FederationConfig, parse_run_config  # noqa: E402

log = logging.getLogger("fedmosaic.client")


def client_id_of(node_config: dict, scenario: Scenario) -> str:  # type: ignore[type-arg]
    """``client-id`` as given; a simulation's ``partition-id`` k is the scenario's k-th client id in
    increasing order (the id itself when the ids are 0 … n − 1)."""
    if "client-id" in node_config:
        return str(node_config["client-id"])
    if "partition-id" in node_config:
        ids = sorted(scenario.client_ids)
        partition = int(node_config["partition-id"])
        if not 0 <= partition < len(ids):
            raise ValueError(f"partition-id {partition} is out of range: {scenario.source or 'the scenario'} "
                             f"has {len(ids)} clients (num-supernodes must be {len(ids)})")
        return str(ids[partition])
    raise ValueError("node config has neither 'client-id' nor 'partition-id'; start the SuperNode "
                     "with --node-config \"client-id=<n>\"")


def build_client(context: Context) -> tuple[FederationConfig, FedMosaicClient]:
    """The client for this message: the config of the run it belongs to, cached data and models."""
    config = parse_run_config(context.run_config)
    node = dict(context.node_config)
    data_root = str(node["data-root"]) if node.get("data-root") else None
    resources = get_resources(config, data_root)
    state_root = Path(str(node["state-dir"])) if node.get("state-dir") else config.run_dir / "clients"
    return config, FedMosaicClient(config, resources, client_id_of(node, resources.scenario), state_root)


def query(msg: Message, context: Context) -> Message:
    """Handshake: who am I (stable id), which architecture, which adapter schema."""
    _, client = build_client(context)
    info = client.info()
    record = proto.make_client_info(client.client_id, info["arch"], info["model-id"], schema=info["schema"])
    return Message(RecordDict({proto.CLIENT_INFO: record}), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    """One round: load G_i, train, probe, evaluate, save state; reply with the local states the
    round config asks for (``upload-shared``, ``upload-same-arch``). A
    round this run already trained from the same G_i (the server asks again after a lost reply) is
    answered from the saved state."""
    config, client = build_client(context)
    round_cfg = msg.content.config_records[proto.CONFIG]
    records = msg.content.array_records
    global_shared = proto.decode_state(records[proto.GLOBAL_SHARED], proto.GLOBAL_SHARED) if proto.GLOBAL_SHARED in records else None
    global_same = proto.decode_state(records[proto.GLOBAL_SAME_ARCH], proto.GLOBAL_SAME_ARCH) if proto.GLOBAL_SAME_ARCH in records else None
    server_round = int(str(round_cfg["server-round"]))
    run_name = str(round_cfg.get("run-name", config.resolved_run_name))
    result = client.saved_result(server_round, run_name, global_shared, global_same, context.run_id) or client.run_round(
        server_round,
        global_shared,
        global_same,
        eval_others=bool(round_cfg.get("eval-others", False)),
        eval_unseen=bool(round_cfg.get("eval-unseen", False)),
        run_name=run_name,
        last_round=int(str(round_cfg.get("last-round", 0))),
        run_id=context.run_id,
    )
    content = RecordDict(
        {
            proto.TASK_VECTOR: proto.encode_task_vector(result.task_vector),
            proto.METRICS: proto.metrics_record(result.metrics),
            proto.CLIENT_INFO: proto.make_client_info(client.client_id, result.arch, result.model_id, scores=result.scores),
        }
    )
    # only the states the server aggregates (a server that does not say wants both)
    if bool(round_cfg.get("upload-shared", True)):
        content[proto.LOCAL_SHARED] = proto.encode_state(result.local_shared)
    if bool(round_cfg.get("upload-same-arch", True)):
        content[proto.LOCAL_SAME_ARCH] = proto.encode_state(result.local_same_arch)
    return Message(content, reply_to=msg)
