"""RELA: relevance-guided aggregation (docs/method.md, "RELA").

Client: :class:`TaskVectorProbe` (closed-form probe gradient), :class:`TaskVectorAccumulator`
(sanitise, round mean, smoothing; a heuristic, not differential privacy) and
:func:`compress_task_vector` (shared-seed sketch). Server: :func:`task_similarity`,
:func:`relevance_weights`, :func:`aggregate_global_states`.
"""

from fedmosaic_core.rela.accumulator import TaskVectorAccumulator, selected_rows
from fedmosaic_core.rela.aggregation import (
    MODES,
    AggregationResult,
    ClientUpdate,
    GlobalState,
    aggregate_global_states,
)
from fedmosaic_core.rela.compression import TaskVectorCompression, compress, compress_task_vector
from fedmosaic_core.rela.probe import TaskVectorProbe
from fedmosaic_core.rela.similarity import relevance_weights, task_similarity

__all__ = [
    "MODES",
    "AggregationResult",
    "ClientUpdate",
    "GlobalState",
    "TaskVectorAccumulator",
    "TaskVectorCompression",
    "TaskVectorProbe",
    "aggregate_global_states",
    "compress",
    "compress_task_vector",
    "relevance_weights",
    "selected_rows",
    "task_similarity",
]
