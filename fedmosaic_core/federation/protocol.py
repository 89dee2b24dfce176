"""What travels between the ServerApp and the ClientApps, and how it is (de)serialised.

Messages (``RecordDict`` keys):

* query (server → client): ``config`` (round 0).  Reply: ``client-info`` with the stable
  ``client-id``, the architecture ``arch``, ``model-id`` and the adapter ``schema`` (JSON:
  key → shape for the shared and the same-architecture state).
* train (server → client): ``config`` (round, what to evaluate) and, once the server has built
  them, ``global-shared`` / ``global-same-arch``.  Reply: ``local-shared``,
  ``local-same-arch``, ``task-vector``, ``metrics`` and ``client-info`` (incl. per-task
  ``scores`` as JSON).

Tensors travel as float32 (bfloat16 cannot go into an ``ArrayRecord``); NumPy arrays are
(de)serialised by Flower with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

CONFIG = "config"
CLIENT_INFO = "client-info"
GLOBAL_SHARED = "global-shared"
GLOBAL_SAME_ARCH = "global-same-arch"
LOCAL_SHARED = "local-shared"
LOCAL_SAME_ARCH = "local-same-arch"
TASK_VECTOR = "task-vector"
METRICS = "metrics"


class ProtocolError(ValueError):
    """A message does not have the expected content; the text says what is wrong."""


def encode_state(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors → ArrayRecord (float32, contiguous, on CPU)."""
    return ArrayRecord(
        {k: Array(v.detach().to("cpu", torch.float32).contiguous().numpy()) for k, v in state.items()}
    )


def decode_state(record: Any, what: str) -> dict[str, torch.Tensor]:
    """ArrayRecord → float32 tensors; anything else raises ProtocolError naming ``what``."""
    if not isinstance(record, ArrayRecord):
        raise ProtocolError(f"{what}: expected an ArrayRecord, got {type(record).__name__}")
    out: dict[str, torch.Tensor] = {}
    for key, array in record.items():
        try:
            value = array.numpy()
        except Exception as err:  # noqa: BLE001 - any decoding failure is a bad message
            raise ProtocolError(f"{what}[{key!r}]: cannot decode array ({err})") from None
        if value.dtype.kind not in "fiu":
            raise ProtocolError(f"{what}[{key!r}]: non-numeric dtype {value.dtype}")
        out[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    return out


def encode_task_vector(vector: np.ndarray | None) -> ArrayRecord:
    if vector is None:
        return ArrayRecord()
    return ArrayRecord({TASK_VECTOR: Array(np.ascontiguousarray(vector, dtype=np.float32))})


def decode_task_vector(record: Any) -> np.ndarray | None:
    if not isinstance(record, ArrayRecord):
        raise ProtocolError(f"{TASK_VECTOR}: expected an ArrayRecord, got {type(record).__name__}")
    if len(record) == 0:
        return None
    if list(record.keys()) != [TASK_VECTOR]:
        raise ProtocolError(f"{TASK_VECTOR}: unexpected keys {sorted(record.keys())}")
    return np.asarray(record[TASK_VECTOR].numpy(), dtype=np.float32)


def schema_of(state: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


def make_client_info(
    client_id: str, arch: str, model_id: str, **extra: Any
) -> ConfigRecord:
    info: dict[str, Any] = {"client-id": client_id, "arch": arch, "model-id": model_id}
    for key, value in extra.items():
        info[key] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
    return ConfigRecord(info)


def read_client_info(content: RecordDict) -> dict[str, Any]:
    """The ``client-info`` ConfigRecord as a dict; JSON fields (``schema``, ``scores``) decoded."""
    if CLIENT_INFO not in content.config_records:
        raise ProtocolError(f"reply has no {CLIENT_INFO!r} record")
    info = dict(content.config_records[CLIENT_INFO])
    for key in ("client-id", "arch", "model-id"):
        if not isinstance(info.get(key), str) or not info[key]:
            raise ProtocolError(f"{CLIENT_INFO}: missing or empty {key!r}")
    for key in ("schema", "scores"):
        if key in info:
            try:
                info[key] = json.loads(str(info[key]))
            except json.JSONDecodeError as err:
                raise ProtocolError(f"{CLIENT_INFO}[{key!r}]: invalid JSON ({err})") from None
    return info


def metrics_record(metrics: Mapping[str, float]) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in metrics.items()})


def content_bytes(content: RecordDict) -> int:
    """Bytes of the arrays in a message (what dominates the wire size)."""
    return sum(rec.count_bytes() for rec in content.array_records.values())
