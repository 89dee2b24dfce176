"""One hostile client among honest ones: more than 100 mutations of its handshake and replies.

For every mutation the bad client is client c4 (architecture arch-a, whose other clients c0 and
c1 outvote it on schemas). A federation of five mock clients runs one round of two, then resumes
for the second. Each case states its outcome:

* ``excluded``: c4 is left out with a logged reason naming it, and the honest clients' globals
  after the round are bit-identical to those of a run without c4;
* ``accepted``: the reply is used as it stands (harmless: e.g. a metric the log ignores).

In every case the run completes, the round log is strict JSON (no NaN), no temporary file is
left in the run folder, and ``resume`` finishes the second round.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_fakes import InProcessGrid, run_federation
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    RecordDict,
)
from test_server_strategy import MockClient, _clients, _config

from fedmosaic_flower import records as proto

BAD_NODE, BAD_ID = 104, "c4"
Mutation = Callable[[RecordDict], None]


class HostileClient(MockClient):
    """c4, whose handshake (``hello``) or train reply (``reply``) is mutated before it is sent."""

    def __init__(self, hello: Mutation | None = None, reply: Mutation | None = None,
                 message: Callable[[Message], None] | None = None, fault: str = "") -> None:
        super().__init__(BAD_ID, "arch-a", 1, fault=fault)
        self.hello, self.reply, self.message = hello, reply, message

    def __call__(self, msg: Message) -> Message | None:
        out = super().__call__(msg)
        assert out is not None
        query = msg.metadata.message_type == MessageType.QUERY
        mutate = self.hello if query else self.reply
        if mutate is not None:
            mutate(out.content)
        if self.message is not None and not query:
            self.message(out)
        return out


# -- building blocks of mutations ------------------------------------------------------------------
def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def raw_array(dtype: str, shape: tuple[int, ...], data: bytes, stype: str = "numpy.ndarray") -> Array:
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


def values(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Array], Array]:
    return lambda a: Array(np.ascontiguousarray(fn(a.numpy().copy())))


def header_claims(shape: tuple[int, ...]) -> Callable[[Array], Array]:
    """A float32 npy buffer whose header (and metadata) declare ``shape``, data unchanged."""
    def make(a: Array) -> Array:
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
        return raw_array("float32", shape, buffer.getvalue() + a.numpy().tobytes())
    return make


ARRAY_MUTATIONS: dict[str, Callable[[Array], Array]] = {
    "nan": values(lambda x: np.where(np.arange(x.size).reshape(x.shape) == 0, np.nan, x).astype(np.float32)),
    "inf": values(lambda x: np.full_like(x, np.inf)),
    "neg-inf": values(lambda x: np.where(np.arange(x.size).reshape(x.shape) == 1, -np.inf, x).astype(np.float32)),
    "reshaped": values(lambda x: x.reshape(-1) if x.ndim > 1 else x.reshape(1, -1)),
    "extra-row": values(lambda x: np.concatenate([x, x[:1]]) if x.ndim else x),
    "float64": lambda a: Array(a.numpy().astype(np.float64)),
    "float16": lambda a: Array(a.numpy().astype(np.float16)),
    "int32": lambda a: Array(a.numpy().astype(np.int32)),
    "uint16-bits": lambda a: Array(a.numpy().astype(np.float16).view(np.uint16)),
    "big-endian": lambda a: raw_array("float32", a.shape, npy(a.numpy().astype(">f4"))),
    "declared-float32-holds-float64": lambda a: raw_array("float32", a.shape, npy(a.numpy().astype(np.float64))),
    "garbage-bytes": lambda a: raw_array("float32", a.shape, b"\x93NUMPY garbage" * 7),
    "truncated": lambda a: raw_array("float32", a.shape, a.data[:-4]),
    "header-claims-1e12": header_claims((10**6, 10**6)),
    "pickled-object": lambda a: raw_array("object", a.shape, b"\x80\x04\x95pickle"),
    "torch-stype": lambda a: raw_array("float32", a.shape, a.data, stype="torch.Tensor"),
}
# an adapter state is one record of two arrays (values, schema): the mutations above hit the
# whole values array, and these hit one named tensor inside it
TENSOR_MUTATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "nan": lambda t: t.flatten().index_fill(0, torch.tensor([0]), float("nan")).view(t.shape),
    "inf": lambda t: torch.full_like(t, float("inf")),
    "neg-inf": lambda t: t.flatten().index_fill(0, torch.tensor([t.numel() - 1]), float("-inf")).view(t.shape),
    "reshaped": lambda t: t.reshape(-1) if t.ndim > 1 else t.reshape(1, -1),
    "extra-row": lambda t: torch.cat([t, t[:1]]),
}
TENSOR_TARGETS = {
    "shared-P": (proto.LOCAL_SHARED, "pq.0.q_proj.P"),
    "shared-Q": (proto.LOCAL_SHARED, "pq.1.q_proj.Q"),
    "same-arch-A": (proto.LOCAL_SAME_ARCH, "lora.0.q_proj.A"),
}
SCHEMA_MUTATIONS: dict[str, Callable[[Array], Array]] = {
    "garbage-bytes": lambda a: Array(np.frombuffer(b"\xff{not json", dtype=np.uint8).copy()),
    "json-list": lambda a: Array(np.frombuffer(b"[1, 2]", dtype=np.uint8).copy()),
    "float32": lambda a: Array(a.numpy().astype(np.float32)),
    "one-value-more": lambda a: Array(np.frombuffer(json.dumps({**json.loads(bytes(a.numpy())), "pq.9.q_proj.Q": [1]})
                                                    .encode(), dtype=np.uint8).copy()),
    "pickled-object": lambda a: raw_array("object", a.shape, b"\x80\x04\x95pickle"),
}


def set_array(record_name: str, key: str, make: Callable[[Array], Array]) -> Mutation:
    def mutate(content: RecordDict) -> None:
        record = content.array_records[record_name]
        record[key] = make(record[key])
    return mutate


def edit_state(record_name: str, edit: Callable[[dict[str, torch.Tensor]], object]) -> Mutation:
    """Decode an adapter state record, edit its tensors, encode it again."""
    def mutate(content: RecordDict) -> None:
        state = {k: v.clone() for k, v in proto.decode_state(content.array_records[record_name], record_name).items()}
        edit(state)
        content[record_name] = proto.encode_state(state)
    return mutate


def set_tensor(record_name: str, key: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Mutation:
    return edit_state(record_name, lambda state: state.__setitem__(key, make(state[key])))


def drop(kind: str, name: str) -> Mutation:
    def mutate(content: RecordDict) -> None:
        del getattr(content, kind)[name]
    return mutate


def replace_with_config(name: str) -> Mutation:
    def mutate(content: RecordDict) -> None:
        del content.array_records[name]
        content[name] = ConfigRecord({"x": 1})
    return mutate


def edit_record(name: str, edit: Callable[[ArrayRecord], None]) -> Mutation:
    return lambda content: edit(content.array_records[name])


def info(key: str, value: object) -> Mutation:
    def mutate(content: RecordDict) -> None:
        content.config_records[proto.CLIENT_INFO][key] = value
    return mutate


def del_info(key: str) -> Mutation:
    def mutate(content: RecordDict) -> None:
        del content.config_records[proto.CLIENT_INFO][key]
    return mutate


def metric(key: str, value: float) -> Mutation:
    def mutate(content: RecordDict) -> None:
        content.metric_records[proto.METRICS][key] = value
    return mutate


def deep(n: int) -> str:
    return "[" * n + "]" * n


def schema_edit(edit: Callable[[dict], object]) -> Mutation:
    def mutate(content: RecordDict) -> None:
        record = content.config_records[proto.CLIENT_INFO]
        schema = json.loads(str(record["schema"]))
        record["schema"] = json.dumps(edit(schema))
    return mutate


def _set(d: dict, path: tuple[str, ...], value: object) -> dict:
    d[path[0]][path[1]] = value
    return d


def _with_key(d: dict, part: str, key: str) -> dict:
    d[part][key] = [4, 4]
    return d


def _without_key(d: dict, part: str) -> dict:
    d[part].pop(sorted(d[part])[0])
    return d


def _rank8_same_arch(d: dict) -> dict:
    d["same-arch"] = {k: [8, v[1]] if k.endswith(".A") else [v[0], 8] for k, v in d["same-arch"].items()}
    return d


CASES: dict[str, tuple[dict, str]] = {}  # name → (HostileClient kwargs, "excluded" | "accepted")
for target, (record_name, key) in TENSOR_TARGETS.items():
    for name, change in TENSOR_MUTATIONS.items():
        CASES[f"{target}/{name}"] = ({"reply": set_tensor(record_name, key, change)}, "excluded")
for target, (record_name, key) in {"shared-values": (proto.LOCAL_SHARED, proto.STATE_VALUES),
                                   "same-arch-values": (proto.LOCAL_SAME_ARCH, proto.STATE_VALUES),
                                   "task-vector": (proto.TASK_VECTOR, proto.TASK_VECTOR)}.items():
    for name, make in ARRAY_MUTATIONS.items():
        CASES[f"{target}/{name}"] = ({"reply": set_array(record_name, key, make)}, "excluded")
for target, record_name in {"shared-schema": proto.LOCAL_SHARED, "same-arch-schema": proto.LOCAL_SAME_ARCH}.items():
    for name, make in SCHEMA_MUTATIONS.items():
        CASES[f"{target}/{name}"] = ({"reply": set_array(record_name, proto.STATE_SCHEMA, make)}, "excluded")
for record_name in (proto.LOCAL_SHARED, proto.LOCAL_SAME_ARCH, proto.TASK_VECTOR):
    CASES[f"missing-record/{record_name}"] = ({"reply": drop("array_records", record_name)}, "excluded")
    CASES[f"record-of-wrong-type/{record_name}"] = ({"reply": replace_with_config(record_name)}, "excluded")
CASES["missing-record/client-info"] = ({"reply": drop("config_records", proto.CLIENT_INFO)}, "excluded")
CASES["missing-record/metrics"] = ({"reply": drop("metric_records", proto.METRICS)}, "accepted")
for record_name, part in ((proto.LOCAL_SHARED, "shared"), (proto.LOCAL_SAME_ARCH, "same-arch")):
    first = "pq.0.q_proj.P" if part == "shared" else "lora.0.q_proj.A"
    CASES[f"{part}-keys/unknown-key"] = (
        {"reply": edit_state(record_name, lambda s, f=first: s.__setitem__(f.replace("q_proj", "v_proj"), s[f]))}, "excluded")
    CASES[f"{part}-keys/missing-key"] = ({"reply": edit_state(record_name, lambda s, f=first: s.__delitem__(f))}, "excluded")
    for bad_key in ("pq.x.q_proj.P", "../../escape", "", "lora.0.q_proj.A/../P", "pq.0.q_proj.P " * 3):
        CASES[f"{part}-keys/malformed {bad_key!r}"] = (
            {"reply": edit_state(record_name, lambda s, f=first, k=bad_key: s.__setitem__(k, s.pop(f)))}, "excluded")
    CASES[f"{part}-keys/5000-tensors"] = (
        {"reply": edit_state(record_name, lambda s: [s.__setitem__(f"pq.9.x{i}.P", torch.zeros(1)) for i in range(5000)])},
        "excluded")
    CASES[f"{part}-keys/per-tensor-arrays"] = (  # the layout of before: one array per tensor
        {"reply": lambda c, n=record_name: c.__setitem__(n, ArrayRecord({k: Array(v.numpy()) for k, v in
                                                                      proto.decode_state(c.array_records[n], n).items()}))},
        "excluded")
CASES["task-vector/extra-key"] = (
    {"reply": edit_record(proto.TASK_VECTOR, lambda r: r.__setitem__("x", r[proto.TASK_VECTOR]))}, "excluded")
CASES["task-vector/1-d"] = ({"reply": set_array(proto.TASK_VECTOR, proto.TASK_VECTOR, values(lambda x: x[0]))}, "excluded")
CASES["task-vector/3-d"] = ({"reply": set_array(proto.TASK_VECTOR, proto.TASK_VECTOR, values(lambda x: x[None]))}, "excluded")
CASES["task-vector/empty"] = ({"reply": edit_record(proto.TASK_VECTOR, lambda r: r.__delitem__(proto.TASK_VECTOR))}, "excluded")
for value in ("²", "x/y", "c0/shared", "", "a" * 65, 7, " c4", "c4\n", "c9", "c0", "-c4", "c4;rm"):
    CASES[f"reply-client-id/{value!r}"] = ({"reply": info("client-id", value)}, "excluded")
for key, value in (("arch", "arch-b"), ("arch", ""), ("arch", "a" * 300), ("arch", 5), ("model-id", ""), ("model-id", 3)):
    CASES[f"reply-{key}/{value!r:.20}"] = ({"reply": info(key, value)}, "excluded")
CASES["reply-client-info/no-client-id"] = ({"reply": del_info("client-id")}, "excluded")
for name, text in (("deep-json", deep(100_000)), ("not-json", "{oops"), ("list", "[1, 2]"),
                   ("string-score", json.dumps({"self": {"t": "x"}})), ("bool-score", json.dumps({"self": {"t": True}})),
                   ("nested-score", json.dumps({"self": {"t": {"u": 1}}})), ("2-MB", json.dumps({"self": {"x" * 2_000_000: 1}})),
                   ("number", "5")):
    CASES[f"scores/{name}"] = ({"reply": info("scores", text)}, "excluded")
CASES["scores/nan-score"] = ({"reply": info("scores", json.dumps({"self": {"t": float("nan")}}))}, "accepted")
for key in ("client", "bytes-up", "round", "arch", "scores"):  # log fields: the reply's value is ignored
    CASES[f"metric-overwrites/{key}"] = ({"reply": metric(key, 123.0)}, "accepted")
for key in ("Train-Loss", "bytes_up", "x" * 80, "train loss", "ü"):
    CASES[f"metric-key/{key!r:.20}"] = ({"reply": metric(key, 1.0)}, "excluded")
CASES["metric-value/nan"] = ({"reply": metric("train-loss", float("nan"))}, "accepted")
CASES["metric-value/inf"] = ({"reply": metric("grad-norm-max", float("inf"))}, "accepted")
CASES["size/oversized-array"] = ({"fault": "oversized"}, "excluded")
CASES["scaled-1e6/accepted-without-norm-bound"] = ({"fault": "scaled"}, "accepted")
CASES["message/stale-group"] = ({"message": lambda m: setattr(m.metadata, "group_id", "0")}, "excluded")
CASES["message/query-type"] = ({"message": lambda m: setattr(m.metadata, "message_type", MessageType.QUERY)}, "excluded")
CASES["message/handshake-group"] = ({"message": lambda m: setattr(m.metadata, "group_id", "handshake")}, "excluded")
# the handshake: c4 is then never registered (or refused at aggregation, for a schema outvoted)
for name, edit in (
    ("schema-not-a-dict", lambda d: "x"), ("schema-list", lambda d: [1, 2]), ("schema-no-shared", lambda d: {"same-arch": {}}),
    ("shape-is-int", lambda d: _set(d, ("shared", "pq.0.q_proj.P"), 5)),
    ("shape-of-strings", lambda d: _set(d, ("shared", "pq.0.q_proj.P"), ["x"])),
    ("negative-shape", lambda d: _set(d, ("shared", "pq.0.q_proj.P"), [-4, 4])),
    ("malformed-same-arch-key", lambda d: _with_key(d, "same-arch", "lora.q.A")),
    ("malformed-shared-key", lambda d: _with_key(d, "shared", "pq..P")),
):
    CASES[f"handshake-schema/{name}"] = ({"hello": schema_edit(edit)}, "excluded")
# a schema lie at the handshake is outvoted by c0 and c1; c4's real replies fit the majority's schema
CASES["handshake-schema/rank-8-same-arch-outvoted"] = ({"hello": schema_edit(_rank8_same_arch)}, "accepted")
CASES["handshake-schema/missing-shared-key-outvoted"] = ({"hello": schema_edit(lambda d: _without_key(d, "shared"))}, "accepted")
CASES["handshake/deep-json"] = ({"hello": info("schema", deep(100_000))}, "excluded")
for value in ("²", "x/y", "", 9, "c0"):
    CASES[f"handshake-client-id/{value!r}"] = ({"hello": info("client-id", value)}, "excluded")
CASES["handshake/no-client-info"] = ({"hello": drop("config_records", proto.CLIENT_INFO)}, "excluded")


def _globals(result) -> dict[str, dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    return {cid: {f"{part}/{k}": v for part in ("shared", "same_arch") for k, v in getattr(state, part).items()}
            for cid, state in result.strategy.globals.items()}


@pytest.fixture(scope="module")
def clean_globals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, torch.Tensor]]:
    """Round-1 globals of the honest clients in a run without c4."""
    honest = {n: c for n, c in _clients().items() if n != BAD_NODE}
    result = run_federation(InProcessGrid(honest), _config(tmp_path_factory.mktemp("clean")), stop_after=1)
    return _globals(result)


def test_there_are_more_than_100_mutations() -> None:
    assert len(CASES) > 100


def _strict_json(line: str) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(line, parse_constant=refuse)


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_hostile_client(case: str, tmp_path: Path, clean_globals: dict, caplog: pytest.LogCaptureFixture) -> None:
    kwargs, expected = CASES[case]
    clients = _clients()
    clients[BAD_NODE] = HostileClient(**kwargs)
    config = _config(tmp_path, **{"num-server-rounds": 2})
    with caplog.at_level(logging.WARNING):
        result = run_federation(InProcessGrid(dict(clients)), config, stop_after=1)
    assert result.last_round == 1
    outcome = result.strategy.last_outcome
    assert outcome is not None
    run_dir = result.run_dir
    assert [p for p in run_dir.rglob("*") if ".tmp" in p.name or p.name.startswith(".")] == []
    rows = [_strict_json(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert {r["client"] for r in rows} <= {"c0", "c1", "c2", "c3", "c4"}  # type: ignore[index]
    if expected == "excluded":
        assert BAD_ID not in outcome.replied
        messages = [r.getMessage() for r in caplog.records]
        assert any(("c4" in m or "node 104" in m or "node-104" in m) for m in messages), messages
        got = _globals(result)
        for cid, state in clean_globals.items():
            assert set(got[cid]) == set(state)
            for key, value in state.items():
                assert torch.equal(got[cid][key], value), (cid, key)
    else:
        assert BAD_ID in outcome.replied
        row = next(r for r in rows if r["client"] == BAD_ID)  # type: ignore[index]
        assert row["arch"] == "arch-a" and row["round"] == 1  # type: ignore[index]
    resumed = run_federation(InProcessGrid(dict(clients)), _config(tmp_path, **{"num-server-rounds": 2, "resume": True}))
    assert resumed.last_round == 2


def test_an_unexpected_error_while_reading_a_reply_excludes_only_that_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_globals: dict
) -> None:
    """Not every failure is a ProtocolError (a bug a message triggers): it still costs only its client."""
    real = proto.parse_train_reply

    def fragile(content: RecordDict, max_bytes: float, *into: object, **wanted: bool):  # type: ignore[no-untyped-def]
        if content.config_records[proto.CLIENT_INFO]["client-id"] == BAD_ID:
            raise KeyError("boom")
        return real(content, max_bytes, *into, **wanted)

    monkeypatch.setattr(proto, "parse_train_reply", fragile)
    result = run_federation(InProcessGrid(dict(_clients())), _config(tmp_path, **{"num-server-rounds": 2}), stop_after=1)
    outcome = result.strategy.last_outcome
    assert outcome is not None and outcome.excluded[BAD_ID] == "unreadable message (KeyError: 'boom')"
    got = _globals(result)
    for cid, state in clean_globals.items():
        for key, value in state.items():
            assert torch.equal(got[cid][key], value)
