"""The DRAKE on-disk layout and scenario files (docs/method.md, "DRAKE").

```
<root>/<Dataset>/{train,test}/dataset-<subset_id>.json      # one JSON list of records per task
record:   {"id": ..., "image": "path" | ["path", ...] (absent: text-only),
           "conversations": [{"from": "human", "value": "<image>\\n question"},
                             {"from": "gpt", "value": "answer"}]}
scenario: [{"client_id": 0, "model_id": "...",
            "datasets": [{"dataset": "Fashion200K", "subset_id": 0, "type": "multi-choice"}, ...]}]
```

Image paths in the published benchmark are relative to the directory *above* the root
(``dataset/<Dataset>/images/x.jpg``); DRAKE-mini writes them relative to the root. Both resolve.
Every reader validates first and raises :class:`DrakeDataError` naming file and record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from drake_data.errors import DrakeDataError, where
from fedmosaic_core.storage import atomic_write_text

SPLITS = ("train", "test")
TaskType = Literal["multi-choice", "open-ended"]
IMAGE_TOKEN = "<image>"


# ----------------------------------------------------------------------------------- records
class Turn(BaseModel):
    """One conversation turn: ``{"from": "human"|"gpt", "value": str}``."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    speaker: Literal["human", "gpt"] = Field(alias="from")
    value: str


class DrakeRecord(BaseModel):
    """A LLaVA-style record with exactly one question (human) and one answer (gpt).

    Extra keys (the published files carry some, e.g. ``object_class``) are kept untouched.
    """

    model_config = ConfigDict(extra="allow")
    id: str
    image: str | list[str] | None = None
    conversations: list[Turn]

    @field_validator("id", mode="before")
    @classmethod
    def _id_to_str(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ValueError(f"id must be a string or an integer, got {value!r}")
        return str(value)

    @field_validator("image")
    @classmethod
    def _images_nonempty(cls, value: str | list[str] | None) -> str | list[str] | None:
        paths = [value] if isinstance(value, str) else (value or [])
        if any(not p.strip() for p in paths):
            raise ValueError("image paths must be non-empty strings")
        return value

    @model_validator(mode="after")
    def _one_question_one_answer(self) -> DrakeRecord:
        speakers = [t.speaker for t in self.conversations]
        if speakers != ["human", "gpt"]:
            raise ValueError(
                f"conversations must be exactly [human, gpt] turns, got {speakers}"
            )
        return self

    @property
    def image_paths(self) -> list[str]:
        if self.image is None:
            return []
        return [self.image] if isinstance(self.image, str) else list(self.image)


def validate_record(record: Any, file: Path | str | None = None, index: int | None = None) -> DrakeRecord:
    """Parse one record or raise :class:`DrakeDataError` naming file, index and id."""
    record_id = record.get("id") if isinstance(record, dict) else None
    if not isinstance(record, dict):
        raise DrakeDataError(f"{where(file, index)}: a record must be a JSON object, got {type(record).__name__}")
    try:
        return DrakeRecord.model_validate(record)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}" for e in exc.errors()
        )
        raise DrakeDataError(f"{where(file, index, record_id)}: malformed record: {problems}") from None


# ------------------------------------------------------------------------------------- paths
def task_file(root: Path | str, dataset: str, subset_id: int, split: str) -> Path:
    """``<root>/<dataset>/<split>/dataset-<subset_id>.json``."""
    if split not in SPLITS:
        raise DrakeDataError(f"split must be one of {SPLITS}, got {split!r}")
    if not dataset or "/" in dataset or dataset.startswith("."):
        raise DrakeDataError(f"dataset name {dataset!r} is not a directory name")
    return Path(root) / dataset / split / f"dataset-{int(subset_id)}.json"


def resolve_image_path(root: Path, image: str) -> Path | None:
    """Find an image referenced by a record: absolute; relative to the root; relative to the root's
    parent (published DRAKE: ``dataset/<Dataset>/...``); or with leading components dropped."""
    p = Path(image)
    if p.is_absolute():
        return p if p.is_file() else None
    candidates = [root / p, root.parent / p]
    candidates += [root / Path(*p.parts[k:]) for k in range(1, len(p.parts))]
    for cand in candidates:
        if cand.is_file():
            return cand
    return None


# ---------------------------------------------------------------------------------- reading
def _read_json(path: Path) -> Any:
    try:
        with path.open("r", encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DrakeDataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None


def available_subsets(root: Path | str, dataset: str, split: str) -> list[int]:
    """Subset ids present for ``dataset``/``split`` under ``root`` (sorted)."""
    folder = Path(root) / dataset / split
    ids: list[int] = []
    if folder.is_dir():
        for f in folder.glob("dataset-*.json"):
            stem = f.stem.removeprefix("dataset-")
            if stem.isdigit():
                ids.append(int(stem))
    return sorted(ids)


def load_task(
    root: Path | str, dataset: str, subset_id: int, split: str, *, check_images: bool = True
) -> list[dict[str, Any]]:
    """Read one task file; every record is validated (and its images found, unless
    ``check_images=False``). Returns the records unchanged, in file order."""
    root = Path(root)
    path = task_file(root, dataset, subset_id, split)
    if not path.is_file():
        have = available_subsets(root, dataset, split)
        hint = (f"subsets present for {dataset}/{split}: {have}" if have else
                f"no {dataset}/{split} folder under {root}")
        raise DrakeDataError(f"{path}: task file not found ({dataset} subset {subset_id}, {split}); {hint}")
    data = _read_json(path)
    if not isinstance(data, list):
        raise DrakeDataError(f"{path}: a task file must hold a JSON list of records, got {type(data).__name__}")
    seen: dict[str, int] = {}
    for i, raw in enumerate(data):
        rec = validate_record(raw, path, i)
        if rec.id in seen:
            raise DrakeDataError(f"{where(path, i, rec.id)}: duplicate id (first at record #{seen[rec.id]})")
        seen[rec.id] = i
        if check_images:
            for img in rec.image_paths:
                if resolve_image_path(root, img) is None:
                    raise DrakeDataError(f"{where(path, i, rec.id)}: image file not found: {img!r} (root {root})")
    return data


# ---------------------------------------------------------------------------------- writing
def dump_json(obj: Any) -> str:
    """The one JSON style of this package (stable bytes for a given object)."""
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def write_task(
    root: Path | str, dataset: str, subset_id: int, split: str, records: Sequence[dict[str, Any]]
) -> Path:
    """Validate ``records`` and write them atomically as one task file; returns its path."""
    path = task_file(root, dataset, subset_id, split)
    seen: set[str] = set()
    for i, raw in enumerate(records):
        rec = validate_record(raw, path, i)
        if rec.id in seen:
            raise DrakeDataError(f"{where(path, i, rec.id)}: duplicate id")
        seen.add(rec.id)
    atomic_write_text(path, dump_json(list(records)))
    return path


# -------------------------------------------------------------------------------- scenarios
class TaskRef(BaseModel):
    """One task of a scenario: ``{"dataset", "subset_id", "type"}`` (+ optional ``metric``)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    dataset: str = Field(min_length=1)
    subset_id: int = Field(ge=0)
    type: TaskType
    metric: str | None = None

    @property
    def key(self) -> str:
        """``"<dataset>-<subset_id>"``, the task's name everywhere in this project."""
        return f"{self.dataset}-{self.subset_id}"


class ScenarioEntry(BaseModel):
    """One client of a scenario."""

    model_config = ConfigDict(extra="allow")
    client_id: int = Field(ge=0)
    model_id: str = Field(min_length=1)
    datasets: list[TaskRef] = Field(min_length=1)


class Scenario(BaseModel):
    """A scenario file: a list of clients, each with its model and its ordered tasks."""

    clients: list[ScenarioEntry]
    source: str | None = None

    @property
    def client_ids(self) -> list[int]:
        return [c.client_id for c in self.clients]

    def client(self, client_id: int) -> ScenarioEntry:
        for c in self.clients:
            if c.client_id == client_id:
                return c
        raise DrakeDataError(f"{self.source or 'scenario'}: no client_id {client_id} (have {self.client_ids})")

    def task_owner(self) -> dict[str, int]:
        """task key → owning client id."""
        return {t.key: c.client_id for c in self.clients for t in c.datasets}

    def tasks(self) -> list[TaskRef]:
        return [t for c in self.clients for t in c.datasets]

    def to_json(self) -> list[dict[str, Any]]:
        return [c.model_dump(mode="json", exclude_none=True) for c in self.clients]


def parse_scenario(data: Any, source: str = "<scenario>") -> Scenario:
    """Validate a scenario's JSON value; errors name ``source`` and the record (client entry)."""
    if not isinstance(data, list) or not data:
        raise DrakeDataError(f"{source}: a scenario must be a non-empty JSON list of client entries")
    clients: list[ScenarioEntry] = []
    for i, raw in enumerate(data):
        cid = raw.get("client_id") if isinstance(raw, dict) else None
        try:
            clients.append(ScenarioEntry.model_validate(raw))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'entry'}: {e['msg']}" for e in exc.errors()
            )
            raise DrakeDataError(f"{source}, record #{i} (client_id={cid!r}): malformed entry: {problems}") from None
    ids: dict[int, int] = {}
    owner: dict[str, tuple[int, int]] = {}
    for i, c in enumerate(clients):
        if c.client_id in ids:
            raise DrakeDataError(f"{source}, record #{i}: client_id {c.client_id} repeated (first at record #{ids[c.client_id]})")
        ids[c.client_id] = i
        for t in c.datasets:
            if t.key in owner:
                prev_client, prev_i = owner[t.key]
                raise DrakeDataError(
                    f"{source}, record #{i} (client_id={c.client_id}): task {t.key} is already assigned to "
                    f"client_id {prev_client} (record #{prev_i}); each task belongs to one client"
                )
            owner[t.key] = (c.client_id, i)
    return Scenario(clients=clients, source=source)


def load_scenario(path: Path | str, root: Path | str | None = None) -> Scenario:
    """Read and validate a scenario file; with ``root``, also check that every task exists there."""
    path = Path(path)
    if not path.is_file():
        raise DrakeDataError(f"{path}: scenario file not found")
    scenario = parse_scenario(_read_json(path), str(path))
    if root is not None:
        check_scenario_tasks(scenario, root)
    return scenario


def check_scenario_tasks(scenario: Scenario, root: Path | str, splits: Iterable[str] = SPLITS) -> None:
    """Every (dataset, subset) of the scenario must have its task files under ``root``."""
    root = Path(root)
    for i, c in enumerate(scenario.clients):
        for j, t in enumerate(c.datasets):
            for split in splits:
                f = task_file(root, t.dataset, t.subset_id, split)
                if not f.is_file():
                    have = available_subsets(root, t.dataset, split)
                    known = f"known subsets: {have}" if have else f"unknown dataset {t.dataset!r} under {root}"
                    raise DrakeDataError(
                        f"{scenario.source}, record #{i} (client_id={c.client_id}), datasets[{j}]: "
                        f"{t.key} has no {split} file {f} ({known})"
                    )


def write_scenario(path: Path | str, scenario: Scenario | Sequence[dict[str, Any]]) -> Path:
    """Validate and write a scenario file atomically."""
    path = Path(path)
    sc = scenario if isinstance(scenario, Scenario) else parse_scenario(list(scenario), str(path))
    atomic_write_text(path, dump_json(sc.to_json()))
    return path


def load_task_refs(path: Path | str) -> list[TaskRef]:
    """A JSON list of task references (e.g. an unseen-task list)."""
    path = Path(path)
    if not path.is_file():
        raise DrakeDataError(f"{path}: task list not found")
    data = _read_json(path)
    if not isinstance(data, list):
        raise DrakeDataError(f"{path}: a task list must be a JSON list")
    refs: list[TaskRef] = []
    for i, raw in enumerate(data):
        try:
            refs.append(TaskRef.model_validate(raw))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise DrakeDataError(f"{path}, record #{i}: malformed task reference: {problems}") from None
    return refs
