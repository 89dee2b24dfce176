"""drake_data: the DRAKE benchmark's format and protocol, and DRAKE-mini (offline, real data).

Public API: layout (`load_task`, `write_task`, `load_scenario`, `Scenario`), prompts
(`render_sample`, `RenderedSample`), answers (`extract_choice`, `token_f1`, `score_sample`),
streams (`build_stream`, `ReplayMemory`), metrics, the DRAKE registry (`drake_data.benchmark`) and
the DRAKE-mini builder (`drake_data.mini.build_drake_mini`, `load_public`).
"""

from drake_data.answers import extract_choice, score_sample, token_f1
from drake_data.errors import DrakeDataError
from drake_data.layout import (
    DrakeRecord,
    Scenario,
    ScenarioEntry,
    TaskRef,
    load_scenario,
    load_task,
    write_scenario,
    write_task,
)
from drake_data.metrics import a_auc, a_last, self_others, task_score, unseen_score
from drake_data.prompts import RenderedSample, parse_choices, render_sample
from drake_data.streams import ReplayMemory, Stream, build_stream, sample_key

__all__ = [
    "DrakeDataError", "DrakeRecord", "RenderedSample", "ReplayMemory", "Scenario", "ScenarioEntry",
    "Stream", "TaskRef", "a_auc", "a_last", "build_stream", "extract_choice", "load_scenario",
    "load_task", "parse_choices", "render_sample", "sample_key", "score_sample", "self_others",
    "task_score", "token_f1", "unseen_score", "write_scenario", "write_task",
]
