"""What travels between the ServerApp and the ClientApps: the one codec of FedMosaic messages.

Messages (``RecordDict`` keys):

* query (server → client): ``config``. Reply: ``client-info`` with the stable ``client-id``,
  the architecture ``arch``, ``model-id`` and the adapter ``schema`` (JSON: key → shape for the
  shared and the same-architecture state; keys as :mod:`fedmosaic_core.pqlora.state` defines).
* train (server → client): ``config`` (round, what to evaluate) and, once the server has built
  them, ``global-shared`` / ``global-same-arch``. Reply: ``local-shared`` and
  ``local-same-arch`` (each only when the config's ``upload-shared`` / ``upload-same-arch`` asks
  for it), ``task-vector``, ``metrics`` and ``client-info`` (with per-task ``scores`` as JSON).

An adapter state travels as one ``ArrayRecord`` of two arrays: its float32 values in one flat
array and its key → shape schema as JSON (:func:`encode_state`). Everything received is
checked before it is decoded: anything else raises :class:`ProtocolError` with the reason.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.lib.format as npy_format
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmosaic_core.pqlora.state import Spec, parse_spec

CONFIG = "config"
CLIENT_INFO = "client-info"
GLOBAL_SHARED = "global-shared"
GLOBAL_SAME_ARCH = "global-same-arch"
LOCAL_SHARED = "local-shared"
LOCAL_SAME_ARCH = "local-same-arch"
TASK_VECTOR = "task-vector"
STATE_SCHEMA = "schema"  # the two arrays of an adapter state record (encode_state)
STATE_VALUES = "values"
METRICS = "metrics"

MAX_ARRAYS = 4096
MAX_JSON_CHARS = 1 << 20
_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", re.ASCII)
_METRIC_KEY = re.compile(r"^[a-z][a-z0-9-]{0,63}$", re.ASCII)


class ProtocolError(ValueError):
    """A message does not have the expected content; the text says what is wrong."""


# -- client ids ----------------------------------------------------------------------------------
def check_client_id(value: object) -> str:
    """A client id: 1–64 ASCII letters, digits, ``_``, ``.`` or ``-``, starting with a letter or
    digit (it names folders and checkpoint keys)."""
    if not isinstance(value, str) or not _CLIENT_ID.match(value):
        raise ProtocolError(f"client id {value!r} is not 1-64 of [A-Za-z0-9_.-] starting with a letter or digit")
    return value


def client_sort_key(client_id: str) -> tuple[int, int, str]:
    """Numeric ids in numeric order, then the others by name: the order of every table and sum."""
    return (0, int(client_id), "") if client_id.isascii() and client_id.isdigit() else (1, 0, client_id)


# -- adapter states ------------------------------------------------------------------------------
def encode_state(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors → an ArrayRecord of two arrays: ``values``, every tensor as float32 (bfloat16
    cannot go into an ``ArrayRecord``), flattened and concatenated in the state's key order, and
    ``schema``, the UTF-8 JSON of key → shape in that order.

    Two arrays, not one per tensor: Flower moves every array as its own object, one request per
    hop, so a state of 112 tensors cost ~600 requests per client and round on a deployment. An
    empty state is an empty record."""
    if not state:
        return ArrayRecord()
    schema = json.dumps({key: list(value.shape) for key, value in state.items()}, separators=(",", ":"))
    values = torch.cat([v.detach().to("cpu", torch.float32).reshape(-1) for v in state.values()])
    return ArrayRecord({
        STATE_SCHEMA: Array(np.frombuffer(schema.encode(), dtype=np.uint8).copy()),
        STATE_VALUES: Array(values.numpy()),
    })


def _check_array(array: Array, what: str, dtype: str = "float32") -> int:
    """The array is a little-endian ``dtype`` npy buffer whose header agrees with its metadata and
    its size; returns where its data start in ``array.data``."""
    if array.stype != "numpy.ndarray":
        raise ProtocolError(f"{what}: unsupported array type {array.stype!r}")
    if array.dtype != dtype:
        raise ProtocolError(f"{what}: dtype {array.dtype}, expected {dtype}")
    buffer = io.BytesIO(array.data)
    try:
        version = npy_format.read_magic(buffer)
        read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, fortran, found = read_header(buffer)
    except Exception as err:  # noqa: BLE001 - any malformed header is a bad message
        raise ProtocolError(f"{what}: not a numpy array buffer ({err})") from None
    want = np.dtype(dtype).newbyteorder("<")
    if found != want or fortran or list(shape) != list(array.shape):
        raise ProtocolError(f"{what}: buffer holds {found} {shape}, metadata says {dtype} {tuple(array.shape)}")
    if math.prod(shape) * want.itemsize != len(array.data) - buffer.tell():
        raise ProtocolError(f"{what}: buffer size does not match its shape {tuple(shape)}")
    return buffer.tell()


def _state_schema(record: ArrayRecord, what: str) -> dict[str, tuple[int, ...]]:
    """The ``schema`` array of a state record → key → shape, in order; ProtocolError if malformed."""
    array = record[STATE_SCHEMA]
    start = _check_array(array, f"{what}[{STATE_SCHEMA!r}]", dtype="uint8")
    if len(array.shape) != 1 or array.shape[0] > MAX_JSON_CHARS:
        raise ProtocolError(f"{what}[{STATE_SCHEMA!r}]: expected at most {MAX_JSON_CHARS} bytes of JSON, "
                            f"got shape {tuple(array.shape)}")
    try:
        raw = json.loads(array.data[start:].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ProtocolError(f"{what}[{STATE_SCHEMA!r}]: not UTF-8 JSON ({type(err).__name__})") from None
    if not isinstance(raw, dict):
        raise ProtocolError(f"{what}[{STATE_SCHEMA!r}]: expected an object of key → shape, got {type(raw).__name__}")
    if len(raw) > MAX_ARRAYS:
        raise ProtocolError(f"{what}: {len(raw)} tensors (at most {MAX_ARRAYS})")
    schema: dict[str, tuple[int, ...]] = {}
    for key, shape in raw.items():
        if (not isinstance(shape, list) or len(shape) > 4
                or not all(type(size) is int and 0 <= size <= 1 << 31 for size in shape)):
            raise ProtocolError(f"{what}[{key!r}]: shape must be a list of at most 4 sizes, got {shape!r:.80}")
        schema[key] = tuple(shape)
    return schema


def decode_state(
    record: Any, what: str, into: torch.Tensor | None = None, spec: Spec | None = None
) -> dict[str, torch.Tensor]:
    """An ArrayRecord from :func:`encode_state` → float32 tensors, everything checked first.

    With ``into`` (a 1-D float32 CPU tensor of ``spec``'s total size) and a record that holds
    exactly ``spec``'s keys and shapes, the values are copied straight from the message's bytes
    into ``into``, in ``spec``'s key order, and the tensors returned are views of it: the server
    decodes a round's replies into the rows of one matrix that the aggregation mixes in place. A
    record that does not fit ``spec`` is decoded on its own (the aggregation names what is wrong)."""
    if not isinstance(record, ArrayRecord):
        raise ProtocolError(f"{what}: expected an ArrayRecord, got {type(record).__name__}")
    if len(record) == 0:
        return {}
    if set(record.keys()) != {STATE_SCHEMA, STATE_VALUES}:
        raise ProtocolError(f"{what}: expected the arrays {STATE_SCHEMA!r} and {STATE_VALUES!r}, "
                            f"got {sorted(record.keys())[:8]}")
    schema = _state_schema(record, what)
    values = record[STATE_VALUES]
    start = _check_array(values, f"{what}[{STATE_VALUES!r}]")
    sizes = [math.prod(shape) for shape in schema.values()]
    if len(values.shape) != 1 or values.shape[0] != sum(sizes):
        raise ProtocolError(f"{what}: the schema's shapes hold {sum(sizes)} values, "
                            f"{STATE_VALUES!r} has shape {tuple(values.shape)}")
    flat = np.frombuffer(values.data, dtype="<f4", count=sum(sizes), offset=start)
    if into is not None and spec is not None and _fits(schema, spec, into):
        target = into.numpy()
        if list(schema) == list(spec):
            target[:] = flat
        else:  # the same tensors in another order
            offsets = dict(zip(schema, itertools.accumulate(sizes, initial=0), strict=False))
            position = 0
            for key, shape in spec.items():
                size = math.prod(shape)
                target[position : position + size] = flat[offsets[key] : offsets[key] + size]
                position += size
        return _views(into, spec)
    return _views(torch.from_numpy(flat.copy()), schema)


def _views(flat: torch.Tensor, schema: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Tensors of ``schema``'s shapes that are consecutive views of ``flat``, in its key order."""
    out: dict[str, torch.Tensor] = {}
    position = 0
    for key, shape in schema.items():
        size = math.prod(shape)
        out[key] = flat[position : position + size].view(shape)
        position += size
    return out


def _fits(schema: Mapping[str, tuple[int, ...]], spec: Spec, into: torch.Tensor) -> bool:
    return (
        schema.keys() == spec.keys()
        and all(schema[key] == tuple(shape) for key, shape in spec.items())
        and into.dtype == torch.float32 and into.device.type == "cpu" and into.ndim == 1 and into.is_contiguous()
        and into.numel() == sum(math.prod(shape) for shape in spec.values())
    )


def encode_task_vector(vector: np.ndarray | None) -> ArrayRecord:
    if vector is None:
        return ArrayRecord()
    return ArrayRecord({TASK_VECTOR: Array(np.ascontiguousarray(vector, dtype=np.float32))})


def decode_task_vector(record: Any) -> np.ndarray | None:
    """The task vector (2-D float32) or None when the client sent none."""
    if not isinstance(record, ArrayRecord):
        raise ProtocolError(f"{TASK_VECTOR}: expected an ArrayRecord, got {type(record).__name__}")
    if len(record) == 0:
        return None
    if list(record.keys()) != [TASK_VECTOR]:
        raise ProtocolError(f"{TASK_VECTOR}: unexpected keys {sorted(record.keys())[:8]}")
    array = record[TASK_VECTOR]
    _check_array(array, TASK_VECTOR)
    if len(array.shape) != 2:
        raise ProtocolError(f"{TASK_VECTOR}: shape {tuple(array.shape)}, expected 2-D")
    return np.asarray(array.numpy(), dtype=np.float32)


# -- client info ---------------------------------------------------------------------------------
def make_client_info(client_id: str, arch: str, model_id: str, **extra: Any) -> ConfigRecord:
    info: dict[str, Any] = {"client-id": client_id, "arch": arch, "model-id": model_id}
    for key, value in extra.items():
        info[key] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
    return ConfigRecord(info)


def _json_field(info: Mapping[str, Any], key: str) -> Any:
    text = info[key]
    if not isinstance(text, str) or len(text) > MAX_JSON_CHARS:
        raise ProtocolError(f"{CLIENT_INFO}[{key!r}]: expected a JSON string of at most {MAX_JSON_CHARS} characters")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ProtocolError(f"{CLIENT_INFO}[{key!r}]: invalid JSON ({type(err).__name__})") from None


def read_client_info(content: RecordDict) -> dict[str, Any]:
    """The ``client-info`` record: ``client-id`` (checked), ``arch``, ``model-id`` (non-empty
    strings) and the JSON fields ``schema`` / ``scores`` decoded."""
    if CLIENT_INFO not in content.config_records:
        raise ProtocolError(f"reply has no {CLIENT_INFO!r} record")
    info: dict[str, Any] = dict(content.config_records[CLIENT_INFO])
    for key in ("arch", "model-id"):
        value = info.get(key)
        if not isinstance(value, str) or not value or len(value) > 256:
            raise ProtocolError(f"{CLIENT_INFO}: missing, empty or over-long {key!r}")
    info["client-id"] = check_client_id(info.get("client-id"))
    for key in ("schema", "scores"):
        if key in info:
            info[key] = _json_field(info, key)
    return info


@dataclass
class Handshake:
    """What a client says about itself in reply to the query."""

    client_id: str
    arch: str
    model_id: str
    shared_spec: Spec
    same_arch_spec: Spec


def parse_handshake(content: RecordDict) -> Handshake:
    info = read_client_info(content)
    schema = info.get("schema")
    if not isinstance(schema, dict) or {"shared", "same-arch"} - set(schema):
        raise ProtocolError(f"{CLIENT_INFO}: missing 'schema' with 'shared' and 'same-arch'")
    try:
        shared, same_arch = parse_spec(schema["shared"], "shared"), parse_spec(schema["same-arch"], "same-arch")
    except ValueError as err:
        raise ProtocolError(f"{CLIENT_INFO}: schema: {err}") from None
    return Handshake(info["client-id"], info["arch"], info["model-id"], shared, same_arch)


# -- train replies -------------------------------------------------------------------------------
@dataclass
class TrainReply:
    """A decoded train reply (identity not yet checked against the handshake)."""

    client_id: str
    arch: str
    model_id: str
    shared: dict[str, torch.Tensor]
    same_arch: dict[str, torch.Tensor]
    task_vector: np.ndarray | None
    metrics: dict[str, float] = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    size_bytes: int = 0


def _scores(value: Any) -> dict[str, dict[str, float]]:
    if value is None:
        return {}
    ok = isinstance(value, dict) and all(
        isinstance(split, str) and isinstance(tasks, dict)
        and all(isinstance(t, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for t, v in tasks.items())
        for split, tasks in value.items()
    )
    if not ok:
        raise ProtocolError(f"{CLIENT_INFO}['scores']: expected {{split: {{task: number}}}}")
    return {split: {t: float(v) for t, v in tasks.items()} for split, tasks in value.items()}


def parse_train_reply(
    content: RecordDict, max_bytes: float, shared_into: torch.Tensor | None = None, shared_spec: Spec | None = None,
    *, want_shared: bool = True, want_same_arch: bool = True,
) -> TrainReply:
    """Decode one train reply; ProtocolError with the reason when it is unusable. ``shared_into``,
    ``shared_spec``: decode the shared state into that buffer (:func:`decode_state`).
    ``want_shared`` / ``want_same_arch`` False: that state was not asked for; it is not read (an
    empty state), and a reply that carries it anyway is not refused for it."""
    size = content_bytes(content)
    if size > max_bytes:
        raise ProtocolError(f"reply of {size / 2**20:.1f} MB exceeds the limit of {max_bytes / 2**20:.1f} MB")
    info = read_client_info(content)
    records = content.array_records
    wanted = {LOCAL_SHARED: want_shared, LOCAL_SAME_ARCH: want_same_arch, TASK_VECTOR: True}
    for key in (key for key, want in wanted.items() if want):
        if key not in records:
            raise ProtocolError(f"reply has no {key!r} record")
    metrics: dict[str, float] = {}
    for key, value in content.metric_records.get(METRICS, MetricRecord()).items():
        if not _METRIC_KEY.match(key) or not isinstance(value, (int, float)):
            raise ProtocolError(f"{METRICS}: bad metric {key!r} (lower-case kebab-case name, one number)")
        metrics[key] = float(value)
    return TrainReply(
        client_id=info["client-id"],
        arch=info["arch"],
        model_id=info["model-id"],
        shared=decode_state(records[LOCAL_SHARED], LOCAL_SHARED, shared_into, shared_spec) if want_shared else {},
        same_arch=decode_state(records[LOCAL_SAME_ARCH], LOCAL_SAME_ARCH) if want_same_arch else {},
        task_vector=decode_task_vector(records[TASK_VECTOR]),
        metrics=metrics,
        scores=_scores(info.get("scores")),
        size_bytes=size,
    )


def metrics_record(metrics: Mapping[str, float]) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in metrics.items()})


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's content: arrays, plus the text and numbers of its other records."""
    total = sum(rec.count_bytes() for rec in content.array_records.values())
    for config in content.config_records.values():
        total += sum(len(str(k)) + len(str(v)) for k, v in config.items())
    for metrics in content.metric_records.values():
        total += sum(len(str(k)) + 8 for k in metrics)
    return total
