"""How many objects Flower moves for one FedMosaic message, with adapter states packed into two
arrays (values and a key → shape schema; ``fedmosaic_flower.records.encode_state``) against one
array per tensor (the layout before, and what ``ArrayRecord(state_dict)`` gives).

Flower sends a message as a tree of content-addressed objects (the message, each record, each
array, each array's 5 MiB chunks) and every object is one request per hop: the ServerApp pushes
it to the SuperLink, the SuperNode pulls it, the ClientApp pulls it from the SuperNode, and a
reply goes the same way back. This script records the real messages of a 2-round in-process
federation (the strategy and the ClientApp, default DRAKE-mini scenario: tiny-llama-s/-m and
tiny-qwen2-s clients) and prints, per kind of message, the objects in each layout, their ratio,
and the time to deflate them (what a push serialises), measured in one run.

    python bench/bench_message_objects.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
app = typer.Typer(add_completion=False)


def per_tensor(message):  # type: ignore[no-untyped-def]
    """The same message with each adapter state record as one array per tensor."""
    from flwr.app import Array, ArrayRecord, Message, RecordDict

    from fedmosaic_flower import records

    content = RecordDict()
    for name, record in message.content.items():
        if isinstance(record, ArrayRecord) and set(record.keys()) == {records.STATE_SCHEMA, records.STATE_VALUES}:
            state = records.decode_state(record, name)
            record = ArrayRecord({key: Array(value.numpy()) for key, value in state.items()})
        content[name] = record
    if message.metadata.reply_to_message_id:
        return Message(content, reply_to=message)
    return Message(content, dst_node_id=message.metadata.dst_node_id, message_type=message.metadata.message_type,
                   group_id=message.metadata.group_id)


def objects_and_deflate_ms(message) -> tuple[int, float]:  # type: ignore[no-untyped-def]
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    times = []
    for _ in range(5):
        started = time.perf_counter()
        objects = get_all_nested_objects(message)
        for obj in objects.values():
            obj.deflate()
        times.append(time.perf_counter() - started)
    return len(objects), 1000 * median(times)


@app.command()
def main() -> None:
    from flower_fakes import InProcessGrid, run_federation
    from flwr.app import Context, Message, RecordDict

    from client_app.app import app as clientapp
    from drake_data.mini.builder import build_drake_mini
    from fedmosaic_flower.config import parse_run_config

    work = Path(tempfile.mkdtemp(prefix="bench-objects-"))
    os.environ["FEDMOSAIC_CACHE"] = str(work / "cache")
    data_root = build_drake_mini(work / "mini", seed=0, size="tiny")
    config = parse_run_config({
        "data-root": str(data_root), "num-server-rounds": 2, "local-steps": 2, "batch-size": 4,
        "eval-max-samples": 2, "eval-others-max-samples": 2, "rounds-per-task": 1, "pretrained": False,
        "align-bases": False, "eval-unseen": False, "output-dir": str(work / "runs"), "run-name": "objects",
    })
    seen: dict[str, tuple[Message, Message]] = {}  # model id → (round-2 train message, its reply)

    def node_for(partition: int):  # type: ignore[no-untyped-def]
        context = Context(run_id=1, node_id=100 + partition, node_config={"partition-id": partition},
                          state=RecordDict(), run_config=config.to_flat())

        def node(msg: Message) -> Message:
            reply: Message = clientapp(msg, context)
            if msg.metadata.group_id == "2" and not reply.has_error():
                info = reply.content.config_records["client-info"]
                seen.setdefault(str(info["model-id"]), (msg, reply))
            return reply
        return node

    clients = json.loads((data_root / f"scenario-{config.scenario}.json").read_text())
    run_federation(InProcessGrid({100 + p: node_for(p) for p in range(len(clients))}), config)
    print(f"Flower objects per round-2 message, default DRAKE-mini scenario ({len(clients)} clients), one run")
    print("| model | message | tensors | objects, per tensor | objects, packed | ratio | deflate ms, per tensor | packed |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for model_id, (sent, reply) in sorted(seen.items()):
        for kind, message in (("train (down)", sent), ("reply (up)", reply)):
            old_objects, old_ms = objects_and_deflate_ms(per_tensor(message))
            new_objects, new_ms = objects_and_deflate_ms(message)
            tensors = sum(len(r) for r in per_tensor(message).content.array_records.values())
            print(f"| {model_id} | {kind} | {tensors} | {old_objects} | {new_objects} | {old_objects / new_objects:.1f} "
                  f"| {old_ms:.2f} | {new_ms:.2f} |")


if __name__ == "__main__":
    app()
