"""What one message costs a deployed ClientApp, without and with the node's warm worker.

In a deployment Flower starts a fresh ClientApp process for every message. This script records a
real handshake and round-1 train message (the strategy's own, on an in-process grid), then
answers each in fresh processes, as ``flwr-clientapp`` would: ``import client_app.app``, then the
message. Cold: the process answers itself (imports torch and transformers, loads data and model).
Warm: ``worker-socket`` names a running ``fedmosaic client-worker``, which has all that loaded.
Each repetition starts from an empty client state (its own ``state-dir``), so every train message
trains. Printed per kind: median wall seconds from process start to reply and the process's own
CPU seconds (the worker's time is inside the wall time), and the ratio cold / warm, one run.
With ``--model`` (a real pretrained model, e.g. ``smollm2-135m``), one client on that model
answers DRAKE-text's arithmetic tasks, its base in ``--quantization`` (default NF4): the cold
process then also loads the pretrained weights (converted and pre-quantised once, before timing).

    python bench/bench_clientapp_message.py [--repeats 5] [--model smollm2-135m [--quantization nf4]]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
app = typer.Typer(add_completion=False)

ANSWER = r"""
import json, resource, sys, time
started = time.monotonic()
from pathlib import Path
from flwr.app import Context, RecordDict
from flwr.common.serde import message_from_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
import client_app.app as clientapp
spec = json.loads(sys.argv[1])
msg = message_from_proto(ProtoMessage.FromString(Path(spec["message"]).read_bytes()))
context = Context(run_id=1, node_id=1, node_config=spec["node_config"], state=RecordDict(), run_config=spec["run_config"])
reply = clientapp.app(msg, context)
assert not reply.has_error(), reply.error
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": time.monotonic() - started, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "torch_loaded": "torch" in sys.modules}))
"""


def record_messages(work: Path, run_config: dict[str, object]) -> dict[str, Path]:
    """The handshake and round-1 train message the strategy sends client 0, as protobuf files."""
    from flower_fakes import InProcessGrid, run_federation
    from flwr.app import Context, Message, RecordDict
    from flwr.common.serde import message_to_proto

    from client_app.app import app as clientapp
    from fedmosaic_flower.config import parse_run_config

    config = parse_run_config({**run_config, "num-server-rounds": 1, "output-dir": str(work / "record")})
    saved: dict[str, Path] = {}
    context = Context(run_id=1, node_id=100, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config=config.to_flat())

    def node(msg: Message) -> Message:
        kind = msg.metadata.message_type
        if kind not in saved:
            saved[kind] = work / f"{kind}.pb"
            saved[kind].write_bytes(message_to_proto(msg).SerializeToString())
        reply: Message = clientapp(msg, context)
        return reply

    run_federation(InProcessGrid({100: node}), config)
    return saved


def answer(message: Path, node_config: dict[str, object], run_config: dict[str, object], env: dict[str, str]) -> dict[str, float]:
    spec = json.dumps({"message": str(message), "node_config": node_config, "run_config": run_config})
    out = subprocess.run([sys.executable, "-c", ANSWER, spec], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def one_client_text_scenario(work: Path, model: str) -> tuple[Path, Path]:
    """DRAKE-text and a scenario of one client on ``model`` with the arithmetic tasks of its client 0."""
    from drake_data.layout import write_scenario
    from drake_data.text.builder import SCENARIO, build_drake_text

    data_root = build_drake_text(work / "drake-text", seed=0)
    _, _, tasks = SCENARIO[0]
    scenario = work / "scenario-one-client.json"
    write_scenario(scenario, [{"client_id": 0, "model_id": model,
                               "datasets": [{"dataset": d, "subset_id": i, "type": "multi-choice"} for d, i in tasks]}])
    return data_root, scenario


@app.command()
def main(
    repeats: int = typer.Option(5, help="fresh processes per message kind and mode"),
    model: str = typer.Option("", help="a real pretrained model (e.g. smollm2-135m) on DRAKE-text; default: "
                                       "the tiny DRAKE-mini client"),
    quantization: str = typer.Option("nf4", help="the real model's base: none, nf4 or int8"),
) -> None:
    from drake_data.mini.builder import build_drake_mini
    from fedmosaic_cli.launch import start_client_worker, wait_for_workers
    from fedmosaic_flower.config import parse_run_config

    work = Path(tempfile.mkdtemp(prefix="bench-message-"))
    sockets = Path(tempfile.mkdtemp(prefix="fmb-"))
    env = dict(os.environ, FEDMOSAIC_CACHE=str(work / "cache"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    os.environ["FEDMOSAIC_CACHE"] = env["FEDMOSAIC_CACHE"]
    worker = None
    try:
        settings: dict[str, object] = {
            "local-steps": 2, "batch-size": 4, "eval-max-samples": 2, "eval-others-max-samples": 2,
            "rounds-per-task": 1, "pretrained": False, "align-bases": False, "eval-unseen": False,
            "min-clients": 1, "output-dir": str(work / "runs"), "run-name": "message",
        }
        if model:
            data_root, scenario = one_client_text_scenario(work, model)
            settings.update({"scenario": str(scenario), "quantization": quantization})
        else:
            data_root = build_drake_mini(work / "mini", seed=0, size="tiny")
        run_config = parse_run_config({**settings, "data-root": str(data_root)}).to_flat()
        messages = record_messages(work, run_config)  # also converts and pre-quantises a real model once
        socket_path = sockets / "worker.sock"
        worker = start_client_worker(socket_path, env, work / "worker.log")
        wait_for_workers([(socket_path, worker, work / "worker.log")])
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        for rep in range(repeats):
            for kind in ("query", "train"):
                for mode in ("cold", "warm"):
                    node_config: dict[str, object] = {"partition-id": 0, "state-dir": str(work / "state" / f"{mode}-{kind}-{rep}")}
                    if mode == "warm":
                        node_config["worker-socket"] = str(socket_path)
                    result = answer(messages[kind], node_config, run_config, env)
                    assert result["torch_loaded"] == (mode == "cold"), result
                    results.setdefault((kind, mode), []).append(result)
        where = f"{model} ({quantization}) on DRAKE-text" if model else "tiny DRAKE-mini"
        print(f"one message in a fresh ClientApp process, {where}, {repeats} repetitions, "
              f"{os.cpu_count()} CPUs, medians")
        print(f"{'message':8} {'mode':5} {'wall s':>7} {'own CPU s':>9}")
        for (kind, mode), rows in results.items():
            print(f"{kind:8} {mode:5} {median(r['wall_s'] for r in rows):>7.2f} {median(r['cpu_s'] for r in rows):>9.2f}")
        for kind in ("query", "train"):
            cold, warm = (median(r["wall_s"] for r in results[(kind, m)]) for m in ("cold", "warm"))
            print(f"{kind}: cold / warm wall = {cold / warm:.1f}")
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)


if __name__ == "__main__":
    app()
