"""The strategy tested the way Flower tests its strategies: ``configure_train`` then
``aggregate_train`` with mock replies carrying task-vector sketches, then the next round's
``configure_train`` — checked against golden values from ``tests/golden/rela_reference.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_fakes import InProcessGrid
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedmosaic_flower import records
from fedmosaic_flower.config import parse_run_config
from server_app.strategy import FedMosaicStrategy

GOLDEN = json.loads((Path(__file__).parent / "golden" / "rela_golden.json").read_text())
NODE = {cid: 200 + i for i, cid in enumerate(GOLDEN["ids"])}


def _tensors(state: dict[str, list]) -> dict[str, torch.Tensor]:  # type: ignore[type-arg]
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in state.items()}


def _handshake(cid: str) -> Message:
    spec = GOLDEN["inputs"][cid]
    schema = {part: {k: list(np.shape(v)) for k, v in spec[part].items()} for part in ("shared", "same-arch")}
    query = Message(RecordDict({records.CONFIG: ConfigRecord({"server-round": 0})}), dst_node_id=NODE[cid],
                    message_type=MessageType.QUERY, group_id="handshake")
    info = records.make_client_info(cid, spec["arch"], f"model-{spec['arch']}", schema=schema)
    return Message(RecordDict({records.CLIENT_INFO: info}), reply_to=query)


def _train_reply(message: Message, cid: str) -> Message:
    spec = GOLDEN["inputs"][cid]
    content = RecordDict({
        records.LOCAL_SHARED: records.encode_state(_tensors(spec["shared"])),
        records.LOCAL_SAME_ARCH: records.encode_state(_tensors(spec["same-arch"])),
        records.TASK_VECTOR: records.encode_task_vector(np.array(spec["sketch"], np.float32)),
        records.METRICS: MetricRecord({"train-loss": 1.0}),
        records.CLIENT_INFO: records.make_client_info(cid, spec["arch"], f"model-{spec['arch']}"),
    })
    return Message(content, reply_to=message)


@pytest.fixture()
def strategy(tmp_path: Path) -> FedMosaicStrategy:
    InProcessGrid({})  # sets Flower's task identity so that messages can be made
    config = parse_run_config({"tau": GOLDEN["tau"], "output-dir": str(tmp_path), "num-server-rounds": 2})
    strategy = FedMosaicStrategy(config)
    for cid in GOLDEN["ids"]:
        assert strategy.register_reply(_handshake(cid)) == cid
    return strategy


def test_aggregate_train_gives_the_reference_weights_and_per_client_globals(strategy: FedMosaicStrategy) -> None:
    grid = InProcessGrid({})
    messages = list(strategy.configure_train(1, records.ArrayRecord(), ConfigRecord({"x": 1}), grid))
    assert [m.metadata.dst_node_id for m in messages] == [NODE[c] for c in GOLDEN["ids"]]
    assert all(records.GLOBAL_SHARED not in m.content.array_records for m in messages)  # round 1: nothing yet
    assert messages[0].content.config_records[records.CONFIG]["x"] == 1
    by_node = {v: k for k, v in NODE.items()}
    replies = [_train_reply(m, by_node[m.metadata.dst_node_id]) for m in reversed(messages)]

    import fedmosaic_core.rela.aggregation as aggregation

    stacked: list[bool] = []
    real = aggregation._as_rows
    with pytest.MonkeyPatch.context() as patch:  # the replies' shared states arrive as rows of one matrix
        patch.setattr(aggregation, "_as_rows", lambda states, spec: stacked.append(real(states, spec) is not None)
                      or real(states, spec))
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert stacked[0]
    assert arrays is None and metrics is not None and metrics["num-replied"] == 4
    assert strategy.last_weight_ids == GOLDEN["ids"]
    np.testing.assert_allclose(strategy.last_weights, np.array(GOLDEN["weights"]), rtol=1e-6, atol=1e-7)

    sent = {by_node[m.metadata.dst_node_id]: m for m in strategy.configure_train(2, records.ArrayRecord(), ConfigRecord(), grid)}
    for cid, expected in GOLDEN["globals"].items():
        shared = records.decode_state(sent[cid].content.array_records[records.GLOBAL_SHARED], "g")
        same = records.decode_state(sent[cid].content.array_records[records.GLOBAL_SAME_ARCH], "g")
        assert shared.keys() == expected["shared"].keys() and same.keys() == expected["same-arch"].keys()
        for key, value in {**expected["shared"], **expected["same-arch"]}.items():
            got = shared.get(key, same.get(key))
            torch.testing.assert_close(got, torch.tensor(value, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    assert GOLDEN["globals"]["c2"]["same-arch"] == GOLDEN["inputs"]["c2"]["same-arch"]  # lone arch-b: its own


def test_a_reply_from_another_node_is_refused(strategy: FedMosaicStrategy) -> None:
    messages = list(strategy.configure_train(1, records.ArrayRecord(), ConfigRecord(), InProcessGrid({})))
    honest = [_train_reply(m, cid) for m, cid in zip(messages, GOLDEN["ids"], strict=True)]
    forged = _train_reply(messages[1], "c0")  # the node of c1 claims to be c0; c0 stays silent
    strategy.aggregate_train(1, [forged, honest[2], honest[3]])
    outcome = strategy.last_outcome
    assert outcome is not None
    assert "reply for client 'c0' came from node 201, not from its node 200" in outcome.excluded["c1"]
    assert outcome.missing == ["c0"] and outcome.replied == ["c2", "c3"]
