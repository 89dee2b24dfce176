"""What travels between the ServerApp and the ClientApps: the one codec of FedMosaic messages.

Messages (``RecordDict`` keys):

* query (server → client): ``config``. Reply: ``client-info`` with the stable ``client-id``,
  the architecture ``arch``, ``model-id`` and the adapter ``schema`` (JSON: key → shape for the
  shared and the same-architecture state; keys as :mod:`fedmosaic_core.pqlora.state` defines).
* train (server → client): ``config`` (round, what to evaluate) and, once the server has built
  them, ``global-shared`` / ``global-same-arch``. Reply: ``local-shared``, ``local-same-arch``,
  ``task-vector``, ``metrics`` and ``client-info`` (with per-task ``scores`` as JSON).

Adapter states travel as float32 ``ArrayRecord``\\ s built from and read back to torch state
dicts by Flower itself (bfloat16 cannot go into an ``ArrayRecord``). Everything received is
checked before it is decoded: anything else raises :class:`ProtocolError` with the reason.
"""

from __future__ import annotations

import io
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
    """Tensors → ArrayRecord (float32, contiguous, on CPU), through Flower's torch conversion."""
    return ArrayRecord({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()})


def _check_array(array: Array, what: str) -> int:
    """The array is a float32 npy buffer whose header agrees with its metadata and its size;
    returns where its data start in ``array.data``."""
    if array.stype != "numpy.ndarray":
        raise ProtocolError(f"{what}: unsupported array type {array.stype!r}")
    if array.dtype != "float32":
        raise ProtocolError(f"{what}: dtype {array.dtype}, expected float32")
    buffer = io.BytesIO(array.data)
    try:
        version = npy_format.read_magic(buffer)
        read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, fortran, dtype = read_header(buffer)
    except Exception as err:  # noqa: BLE001 - any malformed header is a bad message
        raise ProtocolError(f"{what}: not a numpy array buffer ({err})") from None
    if dtype != np.dtype("<f4") or fortran or list(shape) != list(array.shape):
        raise ProtocolError(f"{what}: buffer holds {dtype} {shape}, metadata says float32 {tuple(array.shape)}")
    if math.prod(shape) * 4 != len(array.data) - buffer.tell():
        raise ProtocolError(f"{what}: buffer size does not match its shape {tuple(shape)}")
    return buffer.tell()


def decode_state(
    record: Any, what: str, into: torch.Tensor | None = None, spec: Spec | None = None
) -> dict[str, torch.Tensor]:
    """ArrayRecord → float32 tensors, every array checked first.

    With ``into`` (a 1-D float32 CPU tensor of ``spec``'s total size) and a record that holds
    exactly ``spec``'s keys and shapes, the arrays are copied straight from the message's bytes
    into ``into``, in ``spec``'s key order, and the tensors returned are views of it: the server
    decodes a round's replies into the rows of one matrix that the aggregation mixes in place. A
    record that does not fit ``spec`` is decoded on its own (the aggregation names what is wrong)."""
    if not isinstance(record, ArrayRecord):
        raise ProtocolError(f"{what}: expected an ArrayRecord, got {type(record).__name__}")
    if len(record) > MAX_ARRAYS:
        raise ProtocolError(f"{what}: {len(record)} arrays (at most {MAX_ARRAYS})")
    starts = {key: _check_array(array, f"{what}[{key!r}]") for key, array in record.items()}
    if into is not None and spec is not None and _fits(record, spec, into):
        target = into.numpy()
        out: dict[str, torch.Tensor] = {}
        offset = 0
        for key, shape in spec.items():
            size = math.prod(shape)
            target[offset : offset + size] = np.frombuffer(record[key].data, dtype="<f4", count=size, offset=starts[key])
            out[key] = into[offset : offset + size].view(shape)
            offset += size
        return out
    try:
        return dict(record.to_torch_state_dict())
    except Exception as err:  # noqa: BLE001 - checked above; anything left is still a bad message
        raise ProtocolError(f"{what}: cannot decode ({err})") from None


def _fits(record: ArrayRecord, spec: Spec, into: torch.Tensor) -> bool:
    return (
        set(record.keys()) == set(spec)
        and all(tuple(record[key].shape) == tuple(shape) for key, shape in spec.items())
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
    content: RecordDict, max_bytes: float, shared_into: torch.Tensor | None = None, shared_spec: Spec | None = None
) -> TrainReply:
    """Decode one train reply; ProtocolError with the reason when it is unusable. ``shared_into``,
    ``shared_spec``: decode the shared state into that buffer (:func:`decode_state`)."""
    size = content_bytes(content)
    if size > max_bytes:
        raise ProtocolError(f"reply of {size / 2**20:.1f} MB exceeds the limit of {max_bytes / 2**20:.1f} MB")
    info = read_client_info(content)
    records = content.array_records
    for key in (LOCAL_SHARED, LOCAL_SAME_ARCH, TASK_VECTOR):
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
        shared=decode_state(records[LOCAL_SHARED], LOCAL_SHARED, shared_into, shared_spec),
        same_arch=decode_state(records[LOCAL_SAME_ARCH], LOCAL_SAME_ARCH),
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
