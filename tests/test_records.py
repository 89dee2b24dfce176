"""The message codec round-trips, and every malformed message is refused with its reason."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmosaic_flower import records
from fedmosaic_flower.records import ProtocolError

STATE = {"pq.0.q_proj.P": torch.arange(16.0).reshape(4, 4), "pq.0.q_proj.Q": torch.tensor([1.0, -2.0, 3.5, 0.0])}
SCHEMA = {"shared": {"pq.0.q_proj.P": [4, 4], "pq.0.q_proj.Q": [4]},
          "same-arch": {"lora.1.q_proj.A": [4, 8], "lora.1.q_proj.B": [8, 4]}}


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _reply(**change: object) -> RecordDict:
    info = {"client-id": "3", "arch": "arch-a", "model-id": "m", "scores": json.dumps({"self": {"t": 0.5}})}
    info.update({k: v for k, v in change.items() if k in info or k == "extra-info"})
    content = RecordDict({
        records.LOCAL_SHARED: records.encode_state(STATE),
        records.LOCAL_SAME_ARCH: records.encode_state({}),
        records.TASK_VECTOR: records.encode_task_vector(np.ones((2, 3), np.float32)),
        records.METRICS: MetricRecord({"train-loss": 1.5}),
        records.CLIENT_INFO: ConfigRecord({k: v for k, v in info.items() if v is not None}),
    })
    return content


def test_state_round_trip_is_exact_and_float32() -> None:
    decoded = records.decode_state(records.encode_state({**STATE, "half": torch.ones(2, dtype=torch.bfloat16)}), "s")
    assert list(decoded) == [*STATE, "half"]
    for key, value in STATE.items():
        assert decoded[key].dtype == torch.float32 and torch.equal(decoded[key], value)


def test_state_decodes_into_a_row_of_a_round_matrix_when_it_fits_the_schema() -> None:
    spec = {"pq.0.q_proj.P": (4, 4), "pq.0.q_proj.Q": (4,)}
    rows = torch.full((2, 20), float("nan"))
    decoded = records.decode_state(records.encode_state(STATE), "s", into=rows[1], spec=spec)
    assert torch.equal(rows[1], torch.cat([STATE["pq.0.q_proj.P"].reshape(-1), STATE["pq.0.q_proj.Q"]]))
    for key, value in STATE.items():  # views of the row, in the schema's key order
        assert torch.equal(decoded[key], value) and decoded[key].untyped_storage().data_ptr() == rows.untyped_storage().data_ptr()
    assert bool(rows[0].isnan().all())  # the other row is untouched
    # the same tensors in another key order land in the schema's order
    rows[1] = float("nan")
    decoded = records.decode_state(records.encode_state(dict(reversed(STATE.items()))), "s", into=rows[1], spec=spec)
    assert torch.equal(rows[1], torch.cat([STATE["pq.0.q_proj.P"].reshape(-1), STATE["pq.0.q_proj.Q"]]))
    # a record that does not fit (a key missing, a shape different) is decoded on its own
    for state in ({"pq.0.q_proj.P": STATE["pq.0.q_proj.P"]}, {**STATE, "pq.0.q_proj.Q": torch.ones(5)}):
        alone = records.decode_state(records.encode_state(state), "s", into=rows[0], spec=spec)
        assert alone.keys() == state.keys() and bool(rows[0].isnan().all())


def test_task_vector_round_trip() -> None:
    vector = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    assert np.array_equal(records.decode_task_vector(records.encode_task_vector(vector)), vector)
    assert records.decode_task_vector(records.encode_task_vector(None)) is None


def test_train_reply_round_trip() -> None:
    reply = records.parse_train_reply(_reply(), max_bytes=2**20)
    assert (reply.client_id, reply.arch, reply.model_id) == ("3", "arch-a", "m")
    assert torch.equal(reply.shared["pq.0.q_proj.Q"], STATE["pq.0.q_proj.Q"]) and reply.same_arch == {}
    assert reply.task_vector is not None and reply.task_vector.shape == (2, 3)
    assert reply.metrics == {"train-loss": 1.5} and reply.scores == {"self": {"t": 0.5}}
    assert reply.size_bytes >= 4 * (16 + 4 + 6)


def test_handshake_round_trip() -> None:
    info = records.make_client_info("c1", "arch-a", "m", schema=SCHEMA)
    hello = records.parse_handshake(RecordDict({records.CLIENT_INFO: info}))
    assert hello.client_id == "c1" and hello.shared_spec == {"pq.0.q_proj.P": (4, 4), "pq.0.q_proj.Q": (4,)}
    assert hello.same_arch_spec["lora.1.q_proj.B"] == (8, 4)


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (Array(np.arange(4, dtype=np.int64)), "dtype int64, expected float32"),
        (Array(np.ones(4, np.float64)), "dtype float64, expected float32"),
        (Array(np.ones(4, np.uint16)), "dtype uint16, expected float32"),
        (Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=_npy(np.ones(4, ">f4"))), "buffer holds >f4"),
        (Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=b"garbage bytes"), "not a numpy array buffer"),
        (Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=_npy(np.ones(4, np.float32))[:-3]),
         "buffer size does not match"),
        (Array(dtype="float32", shape=(10**12,), stype="numpy.ndarray",
               data=_npy(np.ones(4, np.float32)).replace(b"(4,)", b"(1000000000000,)")), "buffer size does not match"),
        (Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=_npy(np.ones(4, np.float32))), "metadata says"),
        (Array(dtype="float32", shape=(4,), stype="torch.pickle", data=_npy(np.ones(4, np.float32))), "unsupported array type"),
    ],
    ids=["int64", "float64", "uint16-bf16", "big-endian", "garbage", "truncated", "huge-header", "shape-lie", "stype"],
)
def test_malformed_arrays_are_refused(array: Array, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        records.decode_state(_with(records.STATE_VALUES, array), "local-shared")
    with pytest.raises(ProtocolError, match=reason):
        records.decode_task_vector(ArrayRecord({records.TASK_VECTOR: array}))


def _with(key: str, array: Array) -> ArrayRecord:
    """``STATE``'s record with one of its two arrays replaced."""
    record = records.encode_state({"pq.0.q_proj.Q": torch.ones(4)})
    record[key] = array
    return record


def _schema(text: str) -> Array:
    return Array(np.frombuffer(text.encode(), dtype=np.uint8).copy())


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        (_schema('{"pq.0.q_proj.Q": [5]}'), "the schema's shapes hold 5 values"),
        (_schema('{"pq.0.q_proj.Q": [2, 2], "pq.0.q_proj.P": [1]}'), "the schema's shapes hold 5 values"),
        (_schema('{"pq.0.q_proj.Q": [-4]}'), "shape must be a list of at most 4 sizes"),
        (_schema('{"pq.0.q_proj.Q": "4"}'), "shape must be a list"),
        (_schema('{"pq.0.q_proj.Q": [1, 1, 1, 1, 4]}'), "at most 4 sizes"),
        (_schema('["pq.0.q_proj.Q"]'), "expected an object of key"),
        (_schema('{"pq.0.q_proj.Q": [4]'), "not UTF-8 JSON"),
        (_schema("[" * 100_000 + "]" * 100_000), "not UTF-8 JSON|expected at most"),
        (Array(np.frombuffer(b"\xff\xfe{}", dtype=np.uint8).copy()), "not UTF-8 JSON"),
        (Array(np.zeros(4, np.float32)), "dtype float32, expected uint8"),
        (Array(np.zeros((2, 2), np.uint8)), "expected at most .* bytes of JSON"),
        (_schema(json.dumps({f"k{i}": [0] for i in range(records.MAX_ARRAYS + 1)})), "tensors \\(at most 4096\\)"),
    ],
    ids=["too-many-values", "other-keys-too-many", "negative", "string-shape", "5-d", "list", "cut-off", "deep",
         "not-utf8", "float-schema", "2-d-schema", "too-many-keys"],
)
def test_malformed_state_schemas_are_refused(schema: Array, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        records.decode_state(_with(records.STATE_SCHEMA, schema), "local-shared")


def test_state_records_hold_their_two_arrays_and_nothing_else() -> None:
    with pytest.raises(ProtocolError, match="expected an ArrayRecord, got ConfigRecord"):
        records.decode_state(ConfigRecord({"a": 1}), "local-shared")
    record = records.encode_state(STATE)
    assert sorted(record.keys()) == [records.STATE_SCHEMA, records.STATE_VALUES]
    assert json.loads(bytes(record[records.STATE_SCHEMA].numpy())) == {"pq.0.q_proj.P": [4, 4], "pq.0.q_proj.Q": [4]}
    record["pq.0.q_proj.P"] = Array(np.zeros((4, 4), np.float32))  # the per-tensor layout of before
    with pytest.raises(ProtocolError, match="expected the arrays 'schema' and 'values', got"):
        records.decode_state(record, "local-shared")
    # an empty state is an empty record (no arrays to move)
    assert len(records.encode_state({})) == 0 and records.decode_state(ArrayRecord(), "s") == {}


def test_task_vector_shape_and_keys() -> None:
    with pytest.raises(ProtocolError, match="expected 2-D"):
        records.decode_task_vector(records.encode_task_vector(np.ones(5, np.float32)))
    with pytest.raises(ProtocolError, match="unexpected keys"):
        records.decode_task_vector(ArrayRecord({"other": Array(np.ones((2, 2), np.float32))}))


def _deep(n: int) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"client-id": "²"}, "client id '²' is not"),
        ({"client-id": "x/y"}, "client id 'x/y' is not"),
        ({"client-id": "c0/shared"}, "client id 'c0/shared' is not"),
        ({"client-id": ""}, "client id '' is not"),
        ({"client-id": "a" * 65}, "is not 1-64"),
        ({"client-id": None}, "client id None is not"),
        ({"arch": ""}, "'arch'"),
        ({"model-id": None}, "'model-id'"),
        ({"scores": "{not json"}, "invalid JSON"),
        ({"scores": _deep(100_000)}, "invalid JSON \\(RecursionError\\)"),
        ({"scores": json.dumps([1, 2])}, "expected \\{split"),
        ({"scores": json.dumps({"self": {"t": "high"}})}, "expected \\{split"),
        ({"scores": "x" * (records.MAX_JSON_CHARS + 1)}, "at most"),
    ],
)
def test_bad_client_info_is_refused(change: dict[str, object], reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        records.parse_train_reply(_reply(**change), max_bytes=2**30)


@pytest.mark.parametrize("missing", [records.LOCAL_SHARED, records.LOCAL_SAME_ARCH, records.TASK_VECTOR, records.CLIENT_INFO])
def test_missing_records_are_refused(missing: str) -> None:
    content = _reply()
    del content[missing]
    with pytest.raises(ProtocolError, match=f"no '{missing}' record"):
        records.parse_train_reply(content, max_bytes=2**20)


@pytest.mark.parametrize("not_asked", [records.LOCAL_SHARED, records.LOCAL_SAME_ARCH])
def test_a_state_not_asked_for_may_be_missing_and_is_not_read(not_asked: str) -> None:
    flags = {"want_shared": not_asked != records.LOCAL_SHARED, "want_same_arch": not_asked != records.LOCAL_SAME_ARCH}
    part = "shared" if not_asked == records.LOCAL_SHARED else "same_arch"
    content = _reply()
    del content[not_asked]
    assert getattr(records.parse_train_reply(content, max_bytes=2**20, **flags), part) == {}
    content = _reply()
    content[not_asked] = ArrayRecord({"junk": Array(np.zeros(2, np.float32))})  # sent anyway, malformed: not read
    assert getattr(records.parse_train_reply(content, max_bytes=2**20, **flags), part) == {}
    with pytest.raises(ProtocolError, match="expected the arrays"):
        records.parse_train_reply(content, max_bytes=2**20)


def test_bad_metrics_and_oversized_replies() -> None:
    content = _reply()
    content[records.METRICS] = MetricRecord({"Client": 1.0})
    with pytest.raises(ProtocolError, match="bad metric 'Client'"):
        records.parse_train_reply(content, max_bytes=2**20)
    big = _reply(scores=json.dumps({"self": {f"task-{i}": 0.5 for i in range(20_000)}}))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        records.parse_train_reply(big, max_bytes=100_000)  # text counts, not only arrays


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        (None, "missing 'schema'"),
        ({"shared": {}}, "missing 'schema'"),
        ({"shared": {"pq.0.q_proj.P": 5}, "same-arch": {}}, "shape must be 1 or 2 positive integers"),
        ({"shared": [1], "same-arch": {}}, "must be an object"),
        ({"shared": {"pq.0.q_proj.P": ["x"]}, "same-arch": {}}, "shape must be"),
        ({"shared": {}, "same-arch": {"lora.x.q.A": [1, 2]}}, "malformed same-arch key"),
        ({"shared": {"gate.0.q.weight": [1, 2]}, "same-arch": {}}, "malformed shared key"),
    ],
)
def test_bad_handshake_schemas_are_refused(schema: object, reason: str) -> None:
    extra = {} if schema is None else {"schema": schema}
    info = records.make_client_info("c1", "arch-a", "m", **extra)
    with pytest.raises(ProtocolError, match=reason):
        records.parse_handshake(RecordDict({records.CLIENT_INFO: info}))


def test_client_sort_key_orders_numbers_numerically() -> None:
    assert sorted(["10", "b", "2", "a", "1"], key=records.client_sort_key) == ["1", "2", "10", "a", "b"]
